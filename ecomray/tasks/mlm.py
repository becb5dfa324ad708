"""In-domain masked-language-model pretraining of the review encoder (ecomray/models/text_encoder.py), one more task
on the same training loop: `python -m jobs.train experiment=<mlm experiment>`, then fine-tune with
`task=sentiment model.init_from=<registry name>`.

Corpus: the unlabeled text of the train split of the dataset and of every dataset in `task.corpora`. Every text
(normalized: NFKC, whitespace removed) of any of their val or test splits is excluded from the corpus and from
the tokenizer fit, so a model pretrained here never saw an evaluation text (counted in the metadata). The
character tokenizer is fitted on that corpus and stored in the version's meta.json; fine-tuning reuses it.

Masking (BERT-style): `task.mask_prob` of the non-special tokens are chosen; 80% become [MASK], 10% a random
character, 10% stay. Draws are functions of (seed, epoch), so a resumed run replays them. Metrics on held-out
val/test texts (fixed masks): `mlm_acc` (masked-token accuracy) and `loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from ecomray.features.text import MASK_ID, encode, fit_tokenizer, load_tokenizer, text_key_expr
from ecomray.tasks.sentiment import _length_batches, epoch_part, read_reviews, set_threads

FIRST_REAL_ID = 5   # ids below are the special tokens
KEY_METRICS = ("mlm_acc", "loss")


@dataclass
class MLMData:
    tok_json: str
    vocab_size: int
    max_chars: int
    max_len: int
    ids: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    mask_prob: float
    counts: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    cfg: dict = field(repr=False, default_factory=dict)


def corpus(cfg: dict) -> tuple[list[str], dict[str, list[str]], dict[str, Any]]:
    t = cfg["task"]
    names = [cfg["dataset"]["name"], *(t.get("corpora") or [])]
    frames = [read_reviews(cfg, n) for n in names]
    all_rows = pl.concat([f.select("text", "split", "_dataset") for f in frames])
    eval_keys = all_rows.filter(pl.col("split") != "train").select(text_key_expr("text").alias("k"))["k"]
    train = all_rows.filter(pl.col("split") == "train")
    leak = text_key_expr("text").is_in(eval_keys.implode())
    counts = {"datasets": names, "train_texts_before_guard": train.height,
              "train_texts_equal_to_eval_text_dropped": int(train.select(leak.sum()).item())}
    train = train.filter(~leak)
    counts["corpus_texts"] = train.height
    n_eval = int(t.get("eval_texts", 2000))
    main = frames[0]
    evals = {s: main.filter(pl.col("split") == s)["text"].head(n_eval).to_list() for s in ("val", "test")}
    return train["text"].to_list(), evals, counts


def build_data(cfg: dict, rank: int = 0, world_size: int = 1) -> MLMData:
    t = cfg["task"]
    set_threads(cfg)
    train, evals, counts = corpus(cfg)
    max_chars = int(t.get("max_chars", 160))
    tk = t.get("tokenizer") or {}
    tok = fit_tokenizer(train, int(tk.get("vocab_size", 6000)), int(tk.get("min_frequency", 2)))
    ids, lengths = {}, {}
    for s, texts in {"train": train, **evals}.items():
        ids[s], lengths[s] = encode(tok, [x[:max_chars] for x in texts], max_chars + 1)
    return MLMData(tok.to_str(), tok.get_vocab_size(), max_chars, max_chars + 1, ids, lengths,
                   float(t.get("mask_prob", 0.15)), counts, rank, world_size, cfg)


def build_model(cfg: dict, data: MLMData) -> nn.Module:
    return instantiate({k: v for k, v in cfg["model"].items() if k != "init_from"}, **model_kwargs(data))


def model_kwargs(data: MLMData) -> dict:
    return {"vocab_size": data.vocab_size, "num_classes": 2, "max_len": data.max_len}


def mask_tokens(ids: np.ndarray, prob: float, vocab_size: int, g: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) ids -> (masked ids, labels with -100 where nothing is predicted). At least one token per row."""
    real = ids >= FIRST_REAL_ID
    chosen = real & (g.random(ids.shape) < prob)
    none = ~chosen.any(1) & real.any(1)
    if none.any():   # one position for rows that drew none
        for r in np.flatnonzero(none):
            chosen[r, g.choice(np.flatnonzero(real[r]))] = True
    labels = np.where(chosen, ids, -100)
    out = ids.copy()
    u = g.random(ids.shape)
    out[chosen & (u < 0.8)] = MASK_ID
    rand = chosen & (u >= 0.8) & (u < 0.9)
    out[rand] = g.integers(FIRST_REAL_ID, vocab_size, size=int(rand.sum()))
    return out, labels


def train_batches(data: MLMData, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    n = len(data.ids["train"])
    mine, g = epoch_part(np.arange(data.rank, n, data.world), epoch, seed, data.cfg["task"].get("epoch_fraction", 1.0))
    lengths = data.lengths["train"]
    for b in _length_batches(lengths, mine, batch_size, g):
        L = int(lengths[b].max())
        masked, labels = mask_tokens(data.ids["train"][b, :L], data.mask_prob, data.vocab_size, g)
        yield {"ids": torch.from_numpy(masked), "labels": torch.from_numpy(labels)}


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["labels"].ne(-100)
    return F.cross_entropy(model(batch["ids"], mlm_mask=mask), batch["labels"][mask])


EVAL_OPTIONS = ("eval_texts",)     # evaluate.task: how many val/test texts are scored


@torch.no_grad()
def evaluate(model: nn.Module, data: MLMData, split: str) -> dict[str, float]:
    was = model.training
    model.eval()
    g = np.random.default_rng(12345)   # the same masks every epoch
    ids, lengths = data.ids[split], data.lengths[split]
    correct = total = 0
    loss = 0.0
    for lo in range(0, len(ids), 256):
        L = int(lengths[lo:lo + 256].max())
        masked, labels = mask_tokens(ids[lo:lo + 256, :L], data.mask_prob, data.vocab_size, g)
        lab = torch.from_numpy(labels)
        mask = lab.ne(-100)
        logits = model(torch.from_numpy(masked), mlm_mask=mask)
        loss += float(F.cross_entropy(logits, lab[mask], reduction="sum"))
        correct += int((logits.argmax(-1) == lab[mask]).sum())
        total += int(mask.sum())
    model.train(was)
    return {"mlm_acc": correct / max(total, 1), "loss": loss / max(total, 1)}


def metadata(data: MLMData) -> dict:
    return {"tokenizer": data.tok_json, "tokenizer_kind": "char", "max_chars": data.max_chars, "max_len": data.max_len,
            "model_kwargs": model_kwargs(data), "counts": data.counts, "registry_name": data.cfg.get("registry_name")}


def predict(model: nn.Module, meta: dict, texts: list[str]) -> list[list[str]]:
    """For each text, the most likely character at every "[MASK]" in it (the tokenizer keeps [MASK] whole)."""
    tok = load_tokenizer(meta["tokenizer"])
    ids, _ = encode(tok, [x[: int(meta["max_chars"])] for x in texts], int(meta["max_len"]))
    mask = torch.from_numpy(ids == MASK_ID)
    with torch.no_grad():
        pred = model(torch.from_numpy(ids), mlm_mask=mask).argmax(-1).tolist()
    out, k = [], 0
    for row in mask.numpy():
        n = int(row.sum())
        out.append([tok.id_to_token(i) for i in pred[k:k + n]])
        k += n
    return out
