"""Next-item recommendation over user sequences built from prepared event shards.

The sequence of a user: rows in shard order (ts, then source position), kept when `event` is in
`task.sequence_events`, and with `task.dedupe: first_interaction` only the first interaction with each item.
(A view -> click -> cart -> purchase funnel repeats one item; predicting it again would be trivial.)
Leave-one-out on that sequence: last item -> test target, second-last -> val target, the rest train. Prepare's
row-level `split` column is not used here because the sequence, not the raw row, is the unit of this protocol;
for one-item-per-row logs (the Amazon files) the two coincide.

Workers read shard files rank::world_size (users are hash-partitioned, so no user is split); the item vocabulary
is the sorted set of item ids over all shards, identical on every worker.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from ecomray.data.prepare import load_manifest
from ecomray.metrics import KS, rank_targets, ranking_sums


@dataclass
class SeqData:
    item_ids: list[str]                  # vocabulary: item id k+1 <-> item_ids[k]
    users: list[str]
    seqs: list[np.ndarray]               # per user, full sequence of item indices (1-based)
    max_len: int
    popularity: np.ndarray               # (I,) training counts, for the cold-start fallback and baselines
    cfg: dict = field(repr=False, default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def dataset_dir(cfg: dict) -> str:
    return os.path.join(cfg["paths"]["data"], cfg["dataset"]["name"])


def read_sequences(folder: str, task: dict, files: list[str]) -> pl.DataFrame:
    """user_id -> list of item ids, in sequence order, from the given shard files."""
    lf = pl.scan_parquet([os.path.join(folder, f) for f in files]) if files else None
    if lf is None:
        return pl.DataFrame({"user_id": [], "items": []}, schema={"user_id": pl.Utf8, "items": pl.List(pl.Utf8)})
    events = task.get("sequence_events")
    if events:
        lf = lf.filter(pl.col("event").is_in(list(events)))
    # Shards are already in this order (the data plane's contract); sorting again is cheap and makes the sequence
    # independent of how the rows were laid out. (_file, _row) breaks timestamp ties by source position.
    lf = lf.sort(["user_id", "ts", "_file", "_row"]).with_row_index("_pos")
    if task.get("dedupe") == "first_interaction":
        lf = lf.unique(subset=["user_id", "item_id"], keep="first").sort("_pos")
    return lf.group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("items")).collect()


def build_data(cfg: dict, rank: int = 0, world_size: int = 1) -> SeqData:
    folder = dataset_dir(cfg)
    manifest = load_manifest(folder)
    files = [s["file"] for s in manifest["shards"]]
    # The catalogue: every item of the kept events over all shards (not only this worker's), sorted, so every
    # worker and every later re-load numbers items identically.
    lf = pl.scan_parquet([os.path.join(folder, f) for f in files])
    if cfg["task"].get("sequence_events"):
        lf = lf.filter(pl.col("event").is_in(list(cfg["task"]["sequence_events"])))
    vocab = lf.select("item_id").unique().sort("item_id").collect()["item_id"].to_list()
    index = {item: k + 1 for k, item in enumerate(vocab)}
    mine = read_sequences(folder, cfg["task"], files[rank::world_size])
    seqs = [np.fromiter((index[i] for i in items), dtype=np.int64, count=len(items)) for items in mine["items"]]
    pop = np.zeros(len(vocab), dtype=np.float64)
    for s in seqs:
        train_part = s[:-2] if len(s) >= 3 else s
        np.add.at(pop, train_part - 1, 1.0)
    return SeqData(vocab, mine["user_id"].to_list(), seqs, int(cfg["model"].get("max_len", 50)), pop, cfg)


def build_model(cfg: dict, data: SeqData) -> nn.Module:
    return instantiate(cfg["model"], num_items=data.num_items)


def _left_pad(rows: list[np.ndarray], length: int) -> torch.Tensor:
    """(B, L) int64, each row's last `length` items right-aligned, 0 on the left; L is the longest row, at most
    `length` (the model's positions count from the right, so padding further would change nothing)."""
    length = max(1, min(length, max((len(s) for s in rows), default=1)))
    out = np.zeros((len(rows), length), dtype=np.int64)
    for r, s in enumerate(rows):
        s = s[-length:]
        if len(s):
            out[r, length - len(s):] = s
    return torch.from_numpy(out)


def train_batches(data: SeqData, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of (input, target) windows over each user's training part (the sequence minus its last two)."""
    train = [s[:-2] if len(s) >= 3 else s for s in data.seqs]
    train = [s for s in train if len(s) >= 2]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(train), generator=g).tolist()
    negatives = int(data.cfg["task"].get("num_negatives", 0))
    smoothing = float(data.cfg["task"].get("label_smoothing") or 0.0)
    for lo in range(0, len(order), batch_size):
        rows = [train[k] for k in order[lo:lo + batch_size]]
        batch = {"seq": _left_pad([r[:-1] for r in rows], data.max_len),
                 "target": _left_pad([r[1:] for r in rows], data.max_len)}
        if negatives:
            batch["negatives"] = torch.randint(1, data.num_items + 1, (negatives,), generator=g)
        if smoothing:   # a setting of the loss, carried with the batch because loss_step sees only (model, batch)
            batch["label_smoothing"] = torch.tensor(smoothing)
        yield batch


def _member_loss(h: torch.Tensor, weights: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor | None,
                 label_smoothing: float) -> torch.Tensor:
    """One model's loss: h (N, D) hidden states at real positions, weights (I, D), targets t (N,) in 1..I."""
    if negatives is None:
        return F.cross_entropy(h @ weights.T, t - 1, label_smoothing=label_smoothing)
    pos_logit = (h * weights[t - 1]).sum(-1, keepdim=True)            # (N, 1)
    neg_logit = h @ weights[negatives - 1].T                          # (N, S) shared negatives
    hit = negatives[None, :] == t[:, None]                            # (N, S) accidental hits: the target itself
    logits = torch.cat([pos_logit, neg_logit.masked_fill(hit, float("-inf"))], 1)                 # (N, 1 + S)
    logp = torch.log_softmax(logits, 1)
    nll = -logp[:, 0]
    if not label_smoothing:
        return nll.mean()
    # Smoothing spreads its mass over the real candidates only: the -inf accidental hits would make it infinite
    # (what F.cross_entropy(label_smoothing=) does). Same definition as PyTorch's otherwise: (1-e) nll + e mean(-logp).
    valid = torch.cat([torch.ones_like(hit[:, :1]), ~hit], 1)
    smooth = -(logp.masked_fill(~valid, 0.0).sum(1) / valid.sum(1))
    return ((1 - label_smoothing) * nll + label_smoothing * smooth).mean()


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full-softmax CE over the catalogue, or sampled softmax with shared negatives when batch has them.

    Only real (non-padding) target positions count. An ensemble (`SASRecEnsemble`: hidden (K, B, T, D)) trains
    each member on its own loss; the sum is returned, so each member's gradient is what it would be alone.
    """
    hidden = model(batch["seq"])                      # (B, T, D), or (K, B, T, D) for an ensemble
    target = batch["target"]                          # (B, T), 0 = padding
    real = target > 0
    t = target[real]                                  # (N,)
    core = model.module if hasattr(model, "module") else model
    weights = core.item_weights()                     # (I, D), or (K, I, D)
    if hidden.dim() == 3:
        hidden, weights = hidden[None], weights[None]
    smoothing = float(batch["label_smoothing"]) if "label_smoothing" in batch else 0.0
    negatives = batch.get("negatives")
    return sum(_member_loss(hidden[k][real], weights[k], t, negatives, smoothing) for k in range(len(hidden)))


def eval_rows(data: SeqData, split: str) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """(user rows, histories, targets) of the users with a held-out item for `split`."""
    cut = {"val": 2, "test": 1}[split]
    rows = [k for k, s in enumerate(data.seqs) if len(s) >= 3]
    hist = [data.seqs[k][:-cut] for k in rows]
    target = np.array([data.seqs[k][-cut] for k in rows], dtype=np.int64)
    return rows, hist, target


@torch.no_grad()
def score_histories(model: nn.Module, histories: list[np.ndarray], max_len: int) -> torch.Tensor:
    """(B, I) scores of every item for the next position after each history: the dot products of one model, or
    the mean of the members' log-softmax for an ensemble."""
    core = model.module if hasattr(model, "module") else model
    seq = _left_pad(histories, max_len).to(next(core.parameters()).device)
    h = core(seq)[..., -1, :]                         # (B, D), or (K, B, D)
    weights = core.item_weights()                     # (I, D), or (K, I, D)
    if h.dim() == 2:
        return (h @ weights.T).float().cpu()
    logits = torch.bmm(h, weights.transpose(1, 2)).float()             # (K, B, I)
    return torch.log_softmax(logits, -1).mean(0).cpu()


def _reduce(sums: dict[str, float], count: int) -> dict[str, float]:
    """Add metric sums over Train workers (when distributed) and divide by the user count."""
    import torch.distributed as dist

    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vec)
    n = max(vec[-1].item(), 1.0)
    return {k: vec[i].item() / n for i, k in enumerate(keys)}


def evaluate(model: nn.Module | None, data: SeqData, split: str, scorer: Any = None) -> dict[str, float]:
    """HR@K / NDCG@K (K in 5, 10, 20) over full ranking, plus `sampled_*` over `task.eval_sampled` seeded negatives
    when > 0. History items are excluded from the candidates when `task.exclude_history` (the target never is).

    `scorer(histories, rows) -> (B, I) scores` replaces the model: baselines run through this same harness.
    """
    task = data.cfg["task"]
    exclude = bool(task.get("exclude_history", True))
    sampled_n = int(task.get("eval_sampled", 0))
    seed = int(task.get("eval_seed", 0))
    rows, hist, target = eval_rows(data, split)
    # Score users in order of history length: each batch is padded only to its longest history (the sums do not
    # depend on the order, and sampled negatives are keyed by user).
    order = np.argsort([len(h) for h in hist], kind="stable")
    rows, hist, target = [rows[k] for k in order], [hist[k] for k in order], target[order]
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()
    sums: dict[str, float] = {f"{p}{m}@{k}": 0.0 for p in ("", "sampled_")[:1 + bool(sampled_n)]
                              for m in ("hr", "ndcg") for k in KS}  # same keys on every worker (all_reduce)
    bs = int(task.get("eval_batch_size", 512))
    for lo in range(0, len(rows), bs):
        h, t = hist[lo:lo + bs], target[lo:lo + bs]
        batch_rows = rows[lo:lo + bs]
        scores = scorer(h, batch_rows) if scorer is not None else score_histories(model, h, data.max_len)
        h0 = [x - 1 for x in h]                                   # 1-based ids -> 0-based columns
        for name, value in ranking_sums(rank_targets(scores, t - 1, h0, exclude)).items():
            sums[name] += value
        if sampled_n:
            keys = [zlib.crc32(data.users[r].encode()) for r in batch_rows]  # same negatives on any worker layout
            ranks = rank_targets(scores, t - 1, h0, exclude, sampled=sampled_n, seed=seed, user_keys=keys)
            for name, value in ranking_sums(ranks).items():
                sums[f"sampled_{name}"] += value
    if model is not None and was_training:
        model.train()
    return _reduce(sums, len(rows))


def metadata(data: SeqData) -> dict:
    top = np.argsort(-data.popularity, kind="stable")[:1000]
    return {"item_ids": data.item_ids, "max_len": data.max_len, "num_items": data.num_items,
            "popular": [data.item_ids[k] for k in top]}


def predict(model: nn.Module, meta: dict, histories: list[list[str]], k: int = 10,
            exclude_history: bool = True) -> list[list[tuple[str, float]]]:
    """Top-k (item id, score) per history of item ids (oldest first); unknown ids are skipped."""
    index = {item: n + 1 for n, item in enumerate(meta["item_ids"])}
    seqs = [np.array([index[i] for i in h if i in index], dtype=np.int64) for h in histories]
    model.eval()
    scores = score_histories(model, seqs, int(meta["max_len"]))
    out = []
    for r, s in enumerate(seqs):
        row = scores[r]
        if exclude_history and len(s):
            row = row.clone()
            row[torch.from_numpy(s - 1)] = float("-inf")
        top = torch.topk(row, min(k, len(row)))
        out.append([(meta["item_ids"][int(i)], float(v)) for v, i in zip(top.values, top.indices)])
    return out


def baselines(data: SeqData) -> dict[str, Any]:
    """Scorers for `evaluate(None, data, split, scorer=...)`: most-popular and item-kNN (next_item_baselines.py)."""
    from ecomray.tasks.next_item_baselines import scorers

    return scorers(data, data.cfg["task"].get("baselines"))
