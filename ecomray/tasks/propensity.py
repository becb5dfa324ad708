"""Purchase propensity: a binary classifier over a labelled session table (prepared with the `table` schema).

The split is prepare's seeded stratified `split` column. Features are fitted on train with the pure Arrow
functions in `ecomray/features/tabular.py`; their statistics go to the registry with the model, and serving
calls the same `transform_tabular`. Metrics: AUC, log-loss, accuracy, and F1 at the threshold that maximizes
F1 on validation (the test F1 uses the validation threshold).

A model's forward returns logits (B,), or (B, K) for an ensemble of K members (`ecomray/models/dcn_ensemble.py`):
each member is trained on its own loss, and the predicted probability is the mean of the members' sigmoids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_curve, roc_auc_score
from torch import nn

from ecomray.data.prepare import load_manifest
from ecomray.features.tabular import cardinalities, fit_tabular, numeric_columns, transform_tabular


@dataclass
class TableData:
    stats: dict
    label: str
    splits: dict[str, dict[str, torch.Tensor]]   # split -> {"numeric", "categorical", "label"}
    rank: int = 0
    world: int = 1
    threshold: float = 0.5
    cfg: dict = field(repr=False, default_factory=dict)


def _tensors(table: pa.Table, stats: dict, label: str | None) -> dict[str, torch.Tensor]:
    feats = transform_tabular(table, stats)
    num = numeric_columns(stats)
    cat = [n for n in stats["categorical"]]
    out = {"numeric": torch.from_numpy(np.stack([feats[n].to_numpy() for n in num], 1) if num else
                                       np.zeros((table.num_rows, 0), np.float32)),
           "categorical": torch.from_numpy(np.stack([feats[n].to_numpy() for n in cat], 1).astype(np.int64) if cat else
                                           np.zeros((table.num_rows, 0), np.int64))}
    if label is not None:
        out["label"] = torch.from_numpy(np.asarray(table[label].to_numpy(zero_copy_only=False), dtype=np.float32))
    return out


def build_data(cfg: dict, rank: int = 0, world_size: int = 1) -> TableData:
    folder = os.path.join(cfg["paths"]["data"], cfg["dataset"]["name"])
    manifest = load_manifest(folder)
    label = cfg["task"].get("label") or manifest["schema"]["label"]
    df = pl.read_parquet([os.path.join(folder, s["file"]) for s in manifest["shards"]]).sort("_file", "_row")
    parts = {s: df.filter(pl.col("split") == s).to_arrow() for s in ("train", "val", "test")}
    spec = {k: list(cfg["task"].get(k) or []) for k in ("numeric", "categorical", "log", "quantile", "ple")}
    spec["ple_bins"] = int(cfg["task"].get("ple_bins") or 16)
    stats = fit_tabular(parts["train"], spec)
    splits = {s: _tensors(t, stats, label) for s, t in parts.items()}
    return TableData(stats, label, splits, rank, world_size, cfg=cfg)


def build_model(cfg: dict, data: TableData) -> nn.Module:
    return instantiate(cfg["model"], **model_kwargs(data.stats))


def model_kwargs(stats: dict) -> dict:
    return {"num_numeric": len(numeric_columns(stats)), "cardinalities": cardinalities(stats)}


def train_batches(data: TableData, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    train = data.splits["train"]
    n = len(train["label"])
    mine = torch.arange(data.rank, n, data.world)          # each worker trains on its slice of the rows
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = mine[torch.randperm(len(mine), generator=g)]
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        yield {k: v[idx] for k, v in train.items()}


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["numeric"], batch["categorical"])                  # (B,) or (B, K) ensemble members
    if logits.dim() == 1:
        return F.binary_cross_entropy_with_logits(logits, batch["label"])
    # Members train independently: each gets its own mean-over-batch loss, summed, so a member's gradient (and
    # hence how strongly weight decay acts on it) is the same as if it were trained alone.
    y = batch["label"][:, None].expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0).sum()


@torch.no_grad()
def probabilities(model: nn.Module, t: dict[str, torch.Tensor]) -> np.ndarray:
    """(B,) purchase probabilities for tensors built by `_tensors` (an ensemble: the mean of its members' sigmoids)."""
    was = model.training
    model.eval()
    p = torch.sigmoid(model(t["numeric"], t["categorical"]).float())      # (B,) or (B, K)
    p = (p if p.dim() == 1 else p.mean(1)).numpy()
    model.train(was)
    return p


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    return float(thr[int(np.argmax(f1[:-1]))]) if len(thr) else 0.5


def evaluate(model: nn.Module, data: TableData, split: str) -> dict[str, float]:
    t = data.splits[split]
    y, p = t["label"].numpy(), probabilities(model, t)
    if split == "val":
        data.threshold = best_threshold(y, p)
    thr = data.threshold
    return {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7))),
            "f1": float(f1_score(y, p >= thr)), "accuracy": float(accuracy_score(y, p >= thr)), "threshold": thr}


def metadata(data: TableData) -> dict:
    return {"stats": data.stats, "label": data.label, "threshold": data.threshold,
            "model_kwargs": model_kwargs(data.stats)}


def predict(model: nn.Module, meta: dict, inputs: pa.Table | list[dict[str, Any]]) -> np.ndarray:
    """Purchase probabilities for rows given as an Arrow table or a list of dicts (serving)."""
    table = inputs if isinstance(inputs, pa.Table) else pa.Table.from_pylist(list(inputs))
    return probabilities(model, _tensors(table, meta["stats"], None))
