"""Next-item recommendation over user sequences built from prepared event shards.

The sequence of a user: rows in shard order (ts, then source position), kept when `event` is in
`task.sequence_events`, and with `task.dedupe: first_interaction` only the first interaction with each item.
(A view -> click -> cart -> purchase funnel repeats one item; predicting it again would be trivial.)
Leave-one-out on that sequence: last item -> test target, second-last -> val target, the rest train. Prepare's
row-level `split` column is not used here because the sequence, not the raw row, is the unit of this protocol;
for one-item-per-row logs (the Amazon files) the two coincide.

Workers read shard files rank::world_size (users are hash-partitioned, so no user is split); the item vocabulary
is the sorted set of item ids over all shards, identical on every worker.

Serving (`POST /v1/recommend`): a history of item ids in, the top k items out. Unknown ids are dropped with a
warning; an empty or all-unknown history gets the most popular items (`fallback: true`); `filters.category` keeps
items of the wanted categories, from the item -> category map stored in the registry version.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator, Union

import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pydantic import BaseModel, Field, StringConstraints
from torch import nn

from ecomray import serving
from ecomray.data import shards
from ecomray.metrics import KS, rank_targets, ranking_sums
from ecomray.tasks import RequestError
from ecomray.runtime import UserError

KEY_METRICS = ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "ndcg@5", "hr@5")
ROUTE = "recommend"
REORDER_USERS = 1 << 20   # users moved at once when merging per-shard sequences into the global user order


class Sequences:
    """Every user's item sequence (1-based item ids) as one flat int32 array and offsets, not one Python object per
    user: at 100M events (~5M users) that is the difference between a few hundred MB and many GB.

    `seqs[k]` is user k's sequence as an int64 array; slices give lists of them; `lengths` is (U,)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets     # (N,) int32, (U + 1,) int64

    @classmethod
    def from_arrays(cls, rows: list[np.ndarray]) -> "Sequences":
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, dtype=np.int32)
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"user row {k} out of range for {len(self)} sequences")
        return self.flat[self.offsets[k]:self.offsets[k + 1]].astype(np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))


@dataclass
class SeqData:
    item_ids: list[str]                  # vocabulary: item id k+1 <-> item_ids[k]
    users: list[str]
    seqs: Sequences | list[np.ndarray]   # per user, full sequence of item indices (1-based)
    max_len: int
    popularity: np.ndarray               # (I,) training counts, for the cold-start fallback and baselines
    cfg: dict = field(repr=False, default_factory=dict)
    files: list[str] = field(repr=False, default_factory=list)    # every shard file of the dataset
    _categories: dict[str, str] | None = field(repr=False, default=None)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def _sequence_rows(task: dict, lf: pl.LazyFrame) -> pl.LazyFrame:
    """The rows that make the sequences, in sequence order (user_id, then position): the family's one definition."""
    events = task.get("sequence_events")
    if events:
        lf = lf.filter(pl.col("event").is_in(list(events)))
    # Shards are already in this order (the data plane's contract); sorting again is cheap and makes the sequence
    # independent of how the rows were laid out. (_file, _row) breaks timestamp ties by source position.
    lf = lf.sort(["user_id", "ts", "_file", "_row"])
    if task.get("dedupe") == "first_interaction":
        lf = lf.unique(subset=["user_id", "item_id"], keep="first", maintain_order=True)
    return lf


def read_sequences(task: dict, files: list[str]) -> pl.DataFrame:
    """user_id -> list of item ids, in sequence order, from the given shard files (absolute paths)."""
    if not files:
        return pl.DataFrame({"user_id": [], "items": []}, schema={"user_id": pl.Utf8, "items": pl.List(pl.Utf8)})
    rows = _sequence_rows(task, pl.scan_parquet(files))
    return rows.group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("items")).collect()


def _vocabulary(task: dict, files: list[str]) -> list[str]:
    """The sorted item ids of the kept events over `files`, one file at a time (memory: one shard's column)."""
    found: list[pl.Series] = []
    for f in files:
        lf = pl.scan_parquet(f)
        if task.get("sequence_events"):
            lf = lf.filter(pl.col("event").is_in(list(task["sequence_events"])))
        found.append(lf.select(pl.col("item_id").unique()).collect().to_series())
    return pl.concat(found).unique().sort().to_list() if found else []


def _encode_sequences(task: dict, files: list[str], vocab: list[str]) -> tuple[list[str], Sequences]:
    """(users sorted by id, their sequences), one shard file at a time; item ids mapped to 1-based ints by Polars.

    A user's rows are all in one shard (hash partitioning), so per-shard sequences are whole; sorting the users of
    all files by id afterwards gives the order `read_sequences` gives over the files at once."""
    users, lengths, codes = [], [], []
    for f in files:
        code = pl.col("item_id").replace_strict(vocab, list(range(1, len(vocab) + 1)), return_dtype=pl.Int32)
        df = _sequence_rows(task, pl.scan_parquet(f)).select("user_id", code).collect()
        if df.height == 0:
            continue
        per_user = df.group_by("user_id", maintain_order=True).len()
        users.append(per_user["user_id"])
        lengths.append(per_user["len"].to_numpy().astype(np.int64))
        codes.append(df["item_id"].to_numpy())
    if not users:
        return [], Sequences(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64))
    user_col, length, flat = pl.concat(users), np.concatenate(lengths), np.concatenate(codes)
    del users, lengths, codes
    if len(files) > 1:  # move each user's run of `flat` to its place in the global user order
        order = user_col.arg_sort().to_numpy()
        start = (np.cumsum(length) - length)[order]
        user_col, length = user_col.gather(order), length[order]
        offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int64)
        moved = np.empty_like(flat)
        for lo in range(0, len(order), REORDER_USERS):  # in blocks: the index arrays stay small
            hi = min(lo + REORDER_USERS, len(order))
            n = length[lo:hi]
            moved[offsets[lo]:offsets[hi]] = flat[np.repeat(start[lo:hi] - offsets[lo:hi], n)
                                                  + np.arange(offsets[lo], offsets[hi])]
        flat = moved
    return user_col.to_list(), Sequences(flat, np.concatenate([[0], np.cumsum(length)]).astype(np.int64))


def _train_lengths(lengths: np.ndarray) -> np.ndarray:
    """Length of each sequence's training part: all but the last two (val, test) items when it has >= 3."""
    return np.where(lengths >= 3, lengths - 2, lengths)


def build_data(cfg: dict, rank: int = 0, world_size: int = 1) -> SeqData:
    files = shards.shard_files(shards.dataset_dir(cfg))
    if world_size > len(files):
        # a worker reads whole shards: one without any would have no user, and the loop takes the same number of
        # steps on every worker (the fewest): none
        raise UserError(f"{shards.dataset_dir(cfg)} has {len(files)} shard(s) for {world_size} training workers: "
                        f"prepare it with prepare.shards={world_size} or more (a multiple of {world_size} spreads "
                        f"users evenly), or train with scaling.num_workers={len(files)} or fewer")
    if world_size > 1 and len(files) % world_size and rank == 0:
        print(f"[train] {len(files)} shards over {world_size} workers: some read more users than others, and every "
              f"epoch takes the fewest workers' steps (prepare.shards a multiple of {world_size} evens it)",
              flush=True)
    # The catalogue: every item of the kept events over all shards (not only this worker's), sorted, so every
    # worker and every later re-load numbers items identically.
    vocab = _vocabulary(cfg["task"], files)
    users, seqs = _encode_sequences(cfg["task"], files[rank::world_size], vocab)
    # training counts: +1 where a user's training part starts, -1 where it ends; the running sum marks its items
    edge = np.zeros(len(seqs.flat) + 1, dtype=np.int8)
    edge[seqs.offsets[:-1]] += 1                                   # offsets are distinct, and so are the ends
    edge[seqs.offsets[:-1] + _train_lengths(seqs.lengths)] -= 1
    in_train = np.cumsum(edge[:-1], dtype=np.int8).astype(bool)
    pop = np.bincount(seqs.flat[in_train] - 1, minlength=len(vocab)).astype(np.float64)
    return SeqData(vocab, users, seqs, int(cfg["model"].get("max_len", 50)), pop, cfg, files)


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


def _windows(flat: np.ndarray, start: np.ndarray, n: np.ndarray, length: int) -> torch.Tensor:
    """`_left_pad` of the rows flat[start:start + n] without a Python loop: (B, L) int64, L = max(1, min(length,
    longest row))."""
    length = max(1, min(length, int(n.max(initial=1))))
    cols = np.arange(length)
    src = (start + n - length)[:, None] + cols[None, :]                 # (B, L) where column j reads from
    real = cols[None, :] >= (length - np.minimum(n, length))[:, None]   # (B, L) False on the left padding
    return torch.from_numpy(np.where(real, flat[np.where(real, src, 0)], 0).astype(np.int64))


def _flat(data: SeqData) -> Sequences:
    """The sequences as one flat array (SeqData built by hand may hold a list of arrays)."""
    return data.seqs if isinstance(data.seqs, Sequences) else Sequences.from_arrays(list(data.seqs))


def num_batches(data: SeqData, epoch: int, seed: int, batch_size: int) -> int:
    """How many batches `train_batches` yields (the loop then never holds an epoch of them)."""
    seqs = _flat(data)
    return -(-int((_train_lengths(seqs.lengths) >= 2).sum()) // batch_size)


def train_batches(data: SeqData, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of (input, target) windows over each user's training part (the sequence minus its last two)."""
    seqs = _flat(data)
    train_len = _train_lengths(seqs.lengths)
    users = np.nonzero(train_len >= 2)[0]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = users[torch.randperm(len(users), generator=g).numpy()]
    negatives = int(data.cfg["task"].get("num_negatives", 0))
    smoothing = float(data.cfg["task"].get("label_smoothing") or 0.0)
    for lo in range(0, len(order), batch_size):
        rows = order[lo:lo + batch_size]
        start, n = seqs.offsets[rows], train_len[rows] - 1     # input r[:-1] and target r[1:] of each training part
        batch = {"seq": _windows(seqs.flat, start, n, data.max_len),
                 "target": _windows(seqs.flat, start + 1, n, data.max_len)}
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
        from ecomray.train.loop import collective_device

        vec = vec.to(collective_device())       # NCCL (scaling=gpu*) reduces CUDA tensors only
        dist.all_reduce(vec)
        vec = vec.cpu()
    n = max(vec[-1].item(), 1.0)
    return {k: vec[i].item() / n for i, k in enumerate(keys)}


EVAL_OPTIONS = ("exclude_history", "eval_sampled", "eval_seed", "eval_batch_size", "baselines")   # evaluate.task


def _scoring_settings(task: dict, num_items: int) -> tuple[bool, int, int, int]:
    """(exclude_history, eval_sampled, eval_seed, eval_batch_size), typed: `eval_sampled: -5` gave every side a
    perfect sampled score, `exclude_history: "no"` counted as true, a batch size of 0 was a traceback."""
    from ecomray.runtime import check_number

    exclude = task.get("exclude_history", True)
    if not isinstance(exclude, bool):
        raise UserError(f"task.exclude_history={exclude!r}: true or false")
    sampled = task.get("eval_sampled") or 0
    check_number("task.eval_sampled", sampled, lambda v: 0 <= v < num_items, f"in 0 .. {num_items - 1} (the "
                 f"negatives drawn per user, from the {num_items} items; 0: full ranking only)", integer=True)
    seed = task.get("eval_seed") or 0
    check_number("task.eval_seed", seed, lambda v: v >= 0, ">= 0", integer=True)
    bs = task.get("eval_batch_size", 512)
    check_number("task.eval_batch_size", bs, lambda v: v >= 1, ">= 1", integer=True)
    return exclude, int(sampled), int(seed), int(bs)


def evaluate(model: nn.Module | None, data: SeqData, split: str, scorer: Any = None) -> dict[str, float]:
    """HR@K / NDCG@K (K in 5, 10, 20) over full ranking, plus `sampled_*` over `task.eval_sampled` seeded negatives
    when > 0. History items are excluded from the candidates when `task.exclude_history` (the target never is).

    `scorer(histories, rows) -> (B, I) scores` replaces the model: baselines run through this same harness.
    """
    task = data.cfg["task"]
    exclude, sampled_n, seed, bs = _scoring_settings(task, data.num_items)
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


def item_categories(data: SeqData) -> dict[str, str] | None:
    """item id -> its most frequent category (ties: the smallest), from the `category` column of the shards; None
    when the dataset has no categories. Computed once per data object (metadata() runs every epoch)."""
    if data._categories is None:
        lf = pl.scan_parquet(data.files)
        if "category" not in lf.collect_schema().names():
            data._categories = {}
        else:
            df = (lf.select("item_id", pl.col("category").cast(pl.Utf8)).drop_nulls().group_by("item_id")
                  .agg(pl.col("category").mode().min()).collect())
            data._categories = dict(zip(df["item_id"].to_list(), df["category"].to_list()))
    return data._categories or None


def metadata(data: SeqData) -> dict:
    top = np.argsort(-data.popularity, kind="stable")[:1000]
    examples = [{"history": [data.item_ids[k - 1] for k in s[:-2][-5:]], "k": 5}
                for s in data.seqs if len(s) >= 4][:3]
    return {"item_ids": data.item_ids, "max_len": data.max_len, "num_items": data.num_items,
            "model_kwargs": {"num_items": data.num_items},
            "popular": [data.item_ids[k] for k in top], "item_categories": item_categories(data),
            "examples": examples}


def upgrade_meta(meta: dict, config: dict) -> dict:
    """Registry format 1 -> 2 (`jobs.registry migrate`): `model_kwargs`, and the item -> category map from the
    prepared shards the version was trained on, when they are still there (else no category filters)."""
    meta = {**meta, "model_kwargs": meta.get("model_kwargs") or {"num_items": meta["num_items"]}}
    if "item_categories" not in meta:
        try:
            files = shards.shard_files(shards.dataset_dir(config))
            meta["item_categories"] = item_categories(SeqData([], [], [], 0, np.zeros(0), config, files))
        except Exception:  # noqa: BLE001 - optional: the shards may be gone
            meta["item_categories"] = None
    meta.setdefault("examples", [{"history": list(meta.get("popular") or [])[:3], "k": 5}])
    return meta


def predict(model: nn.Module, meta: dict, histories: list[list[str]], k: int = 10,
            exclude_history: bool = True) -> list[list[tuple[str, float]]]:
    """Top-k (item id, score) per history of item ids (oldest first); unknown ids are skipped."""
    index = meta.get("_index") or {item: n + 1 for n, item in enumerate(meta["item_ids"])}
    seqs = [np.array([index[i] for i in h if i in index], dtype=np.int64) for h in histories]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if model.training:  # eval() walks every submodule: skipped when the mode is already right (serving)
        model.eval()
    scores = score_histories(model, seqs, int(meta["max_len"]))
    out = []
    for r, s in enumerate(seqs):
        row, n = scores[r], min(k, len(scores[r]))
        if exclude_history and len(s):
            row = row.clone()
            row[torch.from_numpy(s - 1)] = float("-inf")
            n = min(k, len(row) - len(np.unique(s)))   # a k past the rest of the catalogue: never the history
        top = torch.topk(row, n)
        out.append([(meta["item_ids"][i], v) for v, i in zip(top.values.tolist(), top.indices.tolist())])
    return out


# ----------------------------------------------------------------------------------------------- evaluation
def evaluation_table(model: nn.Module, meta: dict, data: SeqData, split: str, baselines: bool = True) -> dict:
    """The model beside most-popular and item-kNN (next_item_baselines.py) in the same harness, and on the synthetic
    shop an oracle that ranks by the generator's true preferences."""
    from ecomray.tasks.next_item_baselines import scorers

    rows = {"model": evaluate(model, data, split)}
    if baselines:
        train = [s[:-2] if len(s) >= 3 else s for s in data.seqs]
        settings = data.cfg["task"].get("baselines")
        try:
            fitted = scorers(train, data.num_items, data.popularity, settings)
        except TypeError as err:     # a misspelt item_knn setting was a traceback
            raise UserError(f"task.baselines={settings!r}: {err}") from None
        for who, scorer in fitted.items():
            rows[who] = evaluate(None, data, split, scorer=scorer)
        manifest = shards.load_manifest(shards.dataset_dir(data.cfg))
        if manifest.get("truth_dir"):
            rows["oracle"] = evaluate(None, data, split, scorer=_oracle(manifest["truth_dir"], data))
    return rows


def _oracle(truth_dir: str, data: SeqData):
    """Scores every item by the generator's true preference for the user (given the history)."""
    from ecomray.data import synthetic

    truth = synthetic.load_truth(truth_dir)
    col = np.array([truth.item_index()[i] for i in data.item_ids])  # vocab order -> truth order

    def score(histories: list[np.ndarray], rows: list[int]) -> torch.Tensor:
        users = [data.users[r] for r in rows]
        hist = [[data.item_ids[k - 1] for k in h] for h in histories]
        return torch.from_numpy(synthetic.true_scores(truth, users, hist)[:, col]).float()

    return score


# ----------------------------------------------------------------------------------------------- batch prediction
def batch_inputs(cfg: dict, split: str) -> pa.Table:
    """(user_id, history) per user from the task's own sequence code: `all` keeps the whole sequence (what a
    campaign scores); `val` / `test` hold out the last 2 / 1 items of users with >= 3 (as in evaluation)."""
    df = read_sequences(cfg["task"], shards.shard_files(shards.dataset_dir(cfg)))
    if split in ("val", "test"):
        cut = {"val": 2, "test": 1}[split]
        df = df.filter(pl.col("items").list.len() >= 3).with_columns(
            pl.col("items").list.head(pl.col("items").list.len() - cut))
    elif split != "all":
        raise ValueError(f"split {split!r}: next_item scores all, val or test")
    return df.rename({"items": "history"}).to_arrow()


BATCH_OPTIONS = ("k", "exclude_history")


def batch_score(model: nn.Module, meta: dict, batch: pa.Table, options: dict) -> pa.Table:
    """Top-k per user: `user_id`, `items`, `scores` (options: k, exclude_history)."""
    exclude = options.get("exclude_history", True)
    if not isinstance(exclude, bool):       # ("maybe" was true, as any non-empty text is)
        raise ValueError(f"exclude_history must be true or false, got {exclude!r}")
    top = predict(model, meta, batch["history"].to_pylist(), k=options.get("k", 10),   # (predict checks k: 2.5 was 2)
                  exclude_history=exclude)
    return pa.table({"user_id": batch["user_id"],
                     "items": pa.array([[i for i, _ in t] for t in top], pa.list_(pa.string())),
                     "scores": pa.array([[s for _, s in t] for t in top], pa.list_(pa.float32()))})


# ----------------------------------------------------------------------------------------------- serving
MAX_K = 1000
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Category = Annotated[str, StringConstraints(min_length=1, max_length=256)]


MAX_FILTER_CATEGORIES = 1000


class RecommendFilters(serving.Strict):
    # (capped: a 300k-entry list of numbers made pydantic build an error per entry, a second on the event loop)
    category: Union[Category, Annotated[list[Category], Field(max_length=MAX_FILTER_CATEGORIES)], None] = Field(
        None, description="keep only items of this category (or any of these categories)")


class ScoredItem(BaseModel):
    item_id: str
    score: float | None = Field(description="model score (higher is better); null for cold-start fallback items")


class RecommendResponse(serving.Response):
    user_id: str | None = None
    items: list[ScoredItem]
    fallback: bool = Field(description="true when the history had no known item: most popular items instead")


def api(meta: dict, limits: dict) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request and response of POST /v1/recommend; `limits.max_history_items` caps the list (the body cap and
    `max_history` truncation apply as well)."""
    cap = int(limits.get("max_history_items", 10_000))

    class RecommendRequest(serving.Strict):
        user_id: Annotated[str, StringConstraints(max_length=256)] | None = Field(
            None, description="echoed back; the model ranks from the history only")
        history: list[ItemId] = Field(default_factory=list, max_length=cap,
                                      description="item ids the user interacted with, oldest first")
        k: serving.Int = Field(10, ge=1, le=MAX_K, description="number of items to return")
        exclude_history: bool = Field(True, description="never recommend an item already in the history")
        filters: RecommendFilters | None = None

    return RecommendRequest, RecommendResponse


def prepare_serving(model: nn.Module, meta: dict) -> None:
    if torch.cuda.is_available():          # a replica given a GPU (conf/serve/cluster.yaml) scores on it
        model.to("cuda")
    meta["_index"] = {item: n + 1 for n, item in enumerate(meta["item_ids"])}


def serve_batch(model: nn.Module, meta: dict, requests: list[dict], options: dict) -> list[dict | RequestError]:
    """One `predict` call per exclude_history group of the batch, with the group's largest k (a category filter
    ranks the whole catalogue, then keeps the first k of the wanted categories)."""
    max_history = int(options.get("max_history", 200))
    index = meta.get("_index") or {item: n + 1 for n, item in enumerate(meta["item_ids"])}
    cat_of = meta.get("item_categories")
    out: list[Any] = [None] * len(requests)
    ranked: dict[bool, list[int]] = {}
    plans = []
    for n, req in enumerate(requests):
        warnings: list[str] = []
        full = history = list(req.get("history") or [])
        k, exclude = int(req.get("k", 10)), bool(req.get("exclude_history", True))
        older: set[str] = set()     # known items before the part scored: still never recommended when excluded
        if len(history) > max_history:
            warnings.append(f"history has {len(history)} items; only the most recent {max_history} are used")
            history = history[-max_history:]
            if exclude:
                older = {i for i in full[:-max_history] if i in index} - set(history)
        unknown = [i for i in history if i not in index]
        known = [i for i in history if i in index]
        if unknown:
            shown = ", ".join(repr(serving.clip(i, 40)) for i in unknown[:5]) + (
                f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            warnings.append(f"{len(unknown)} unknown item id(s) dropped from the history: {shown}")
        wanted = _wanted_categories(req.get("filters"))
        if wanted is not None and not cat_of:
            out[n] = RequestError(["body", "filters", "category"],
                                  "category filters are not available: the model's dataset has no categories")
            continue
        plans.append((n, req, full, known, k, exclude, wanted, warnings, older))
        if known:
            ranked.setdefault(exclude, []).append(len(plans) - 1)
    results: dict[int, list[tuple[str, float]]] = {}
    for exclude, members in ranked.items():
        k_max = max(len(meta["item_ids"]) if plans[m][6] is not None else plans[m][4] + len(plans[m][8])
                    for m in members)
        k_max = min(k_max, len(meta["item_ids"]))
        tops = predict(model, meta, [plans[m][3] for m in members], k=k_max, exclude_history=exclude)
        results.update(zip(members, tops))
    for m, (n, req, full, known, k, exclude, wanted, warnings, older) in enumerate(plans):
        fallback = not known
        if fallback:
            warnings.append("no known item in the history: most popular items (cold-start fallback)")
            seen = set(full) if exclude else set()
            pool = [(i, None) for i in meta.get("popular") or [] if i not in seen]
        else:
            pool = [(i, s) for i, s in results[m] if i not in older] if older else results[m]
        if wanted is not None:
            pool = [(i, s) for i, s in pool if cat_of.get(i) in wanted]
        items = [{"item_id": i, "score": (s if s is not None and math.isfinite(s) else None)} for i, s in pool[:k]]
        if len(items) < k:
            warnings.append(f"only {len(items)} item(s) match; asked for {k}")
        out[n] = {"user_id": req.get("user_id"), "items": items, "fallback": fallback, "warnings": warnings}
    return out


def _wanted_categories(filters: dict[str, Any] | None) -> set[str] | None:
    cat = (filters or {}).get("category")
    if cat is None:
        return None
    return {cat} if isinstance(cat, str) else set(cat)
