"""Purchase propensity: a binary classifier over a labelled session table (prepared with the `table` schema).

The split is prepare's seeded stratified `split` column. Features are fitted on train with the pure Arrow
functions in `ecomray/features/tabular.py`; their statistics go to the registry with the model, and serving
calls the same `transform_tabular`. Metrics: AUC, log-loss, accuracy, and F1 at the threshold that maximizes
F1 on validation (the test F1 uses the validation threshold).

A model's forward returns logits (B,), or (B, K) for an ensemble of K members (`ecomray/models/dcn_ensemble.py`):
each member is trained on its own loss, and the predicted probability is the mean of the members' sigmoids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator, Union

import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pydantic import BaseModel, Field, StringConstraints
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_curve, roc_auc_score
from torch import nn

from ecomray import serving
from ecomray.data import shards
from ecomray.features.tabular import cardinalities, fit_tabular, numeric_columns, transform_tabular
from ecomray.tasks import RequestError

KEY_METRICS = ("auc", "logloss", "f1")
ROUTE = "score/propensity"


@dataclass
class TableData:
    stats: dict
    label: str
    splits: dict[str, dict[str, torch.Tensor]]   # split -> {"numeric", "categorical", "label"}
    rank: int = 0
    world: int = 1
    threshold: float = 0.5
    examples: list[dict] = field(default_factory=list)
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
    manifest = shards.load_manifest(shards.dataset_dir(cfg))
    label = cfg["task"].get("label") or manifest["schema"]["label"]
    df = shards.read_frame(cfg)
    parts = {s: df.filter(pl.col("split") == s).to_arrow() for s in ("train", "val", "test")}
    spec = {k: list(cfg["task"].get(k) or []) for k in ("numeric", "categorical", "log", "quantile", "ple")}
    spec["ple_bins"] = int(cfg["task"].get("ple_bins") or 16)
    stats = fit_tabular(parts["train"], spec)
    splits = {s: _tensors(t, stats, label) for s, t in parts.items()}
    features = list(stats["numeric"]) + list(stats["categorical"])
    examples = [{"rows": parts["train"].select(features).slice(0, 2).to_pylist()}] if parts["train"].num_rows else []
    return TableData(stats, label, splits, rank, world_size, examples=examples, cfg=cfg)


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
    if was:  # eval()/train() walk every submodule: skipped when the mode is already right (serving)
        model.eval()
    p = torch.sigmoid(model(t["numeric"], t["categorical"]).float())      # (B,) or (B, K)
    p = (p if p.dim() == 1 else p.mean(1)).numpy()
    if was:
        model.train()
    return p


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    return float(thr[int(np.argmax(f1[:-1]))]) if len(thr) else 0.5


EVAL_OPTIONS: tuple[str, ...] = ()     # evaluate.task: every setting builds the features


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
            "model_kwargs": model_kwargs(data.stats), "examples": data.examples}


def predict(model: nn.Module, meta: dict, inputs: pa.Table | list[dict[str, Any]]) -> np.ndarray:
    """Purchase probabilities for rows given as an Arrow table or a list of dicts (serving)."""
    table = inputs if isinstance(inputs, pa.Table) else pa.Table.from_pylist(list(inputs))
    return probabilities(model, _tensors(table, meta["stats"], None))


# ----------------------------------------------------------------------------------------------- evaluation
def evaluation_table(model: nn.Module, meta: dict, data: TableData, split: str, baselines: bool = True) -> dict:
    """The model at the decision threshold it chose on validation when it was trained (stored in its meta; scoring
    `val` itself chooses it again, on the same rows, so it is the same)."""
    data.threshold = float(meta.get("threshold", data.threshold))
    return {"model": evaluate(model, data, split)}


# ----------------------------------------------------------------------------------------------- batch prediction
def batch_inputs(cfg: dict, split: str) -> shards.ShardScan:
    """The prepared rows themselves (prepare's `split` column selects train / val / test, or all)."""
    return shards.scan(cfg, split)


BATCH_OPTIONS: tuple[str, ...] = ()     # batch_score takes no options


def batch_score(model: nn.Module, meta: dict, batch: pa.Table, options: dict) -> pa.Table:
    """`probability` per row, beside the label (the id columns to keep are the generic `keep_columns`)."""
    cols = {meta["label"]: batch[meta["label"]]} if meta.get("label") in batch.column_names else {}
    return pa.table({**cols, "probability": pa.array(predict(model, meta, batch), pa.float32())})


# ----------------------------------------------------------------------------------------------- serving
Categorical = Union[Annotated[str, StringConstraints(max_length=1024)], serving.Integer, serving.Number, bool, None]


class PropensityResponse(serving.Response):
    probabilities: list[float | None] = Field(description="purchase probability per row (null if not finite)")


def api(meta: dict, limits: dict) -> tuple[type[BaseModel], type[BaseModel]]:
    """POST /v1/score/propensity: rows with exactly the version's features (numerics as numbers or null,
    categoricals as text, number or bool; an unseen category goes to the out-of-vocabulary slot), at most
    `limits.max_rows` rows."""
    from pydantic import create_model

    # Fields named f0, f1, ... with the feature names as aliases: a feature name need not be a Python identifier.
    features = [(f, Union[serving.Number, None]) for f in meta["stats"]["numeric"]]
    features += [(f, Categorical) for f in meta["stats"]["categorical"]]
    fields = {f"f{n}": (kind, Field(..., alias=f)) for n, (f, kind) in enumerate(features)}
    Row = create_model("PropensityRow", __base__=serving.Strict, **fields)  # type: ignore[call-overload]

    class PropensityRequest(serving.Strict):
        rows: list[Row] = Field(min_length=1, max_length=int(limits.get("max_rows", 256)),  # type: ignore[valid-type]
                                description="one session per row: feature name -> value, as in the training table")

    return PropensityRequest, PropensityResponse


def prepare_serving(model: nn.Module, meta: dict) -> None:
    meta["_numeric"], meta["_categorical"] = list(meta["stats"]["numeric"]), list(meta["stats"]["categorical"])


def serve_batch(model: nn.Module, meta: dict, requests: list[dict], options: dict) -> list[dict | RequestError]:
    """Every row the model needs is checked first (a request with a missing feature or a non-numeric number fails
    alone); the valid requests' rows are scored in one `predict` call."""
    out: list[Any] = [None] * len(requests)
    good: list[int] = []
    for n, req in enumerate(requests):
        error = _check_rows(req["rows"], meta)
        if error is not None:
            out[n] = error
        else:
            good.append(n)
    if good:
        rows = [r for n in good for r in requests[n]["rows"]]
        p = predict(model, meta, pa.Table.from_pydict(_columns(rows, meta)))
        lo = 0
        for n in good:
            hi = lo + len(requests[n]["rows"])
            out[n] = {"probabilities": [float(x) if math.isfinite(x) else None for x in p[lo:hi]]}
            lo = hi
    return out


def _check_rows(rows: list[dict[str, Any]], meta: dict) -> RequestError | None:
    """Every feature the model needs, numerics as numbers (or null); the first problem names its field."""
    for n, row in enumerate(rows):
        for f in meta["_numeric"]:
            v = row.get(f, ...)
            if v is ...:
                return RequestError(["body", "rows", n, f], "field required", "missing")
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                return RequestError(["body", "rows", n, f], "must be a finite number or null", "float_type")
        for f in meta["_categorical"]:
            if f not in row:
                return RequestError(["body", "rows", n, f], "field required", "missing")
    return None


def _columns(rows: list[dict[str, Any]], meta: dict) -> dict[str, list[Any]]:
    """Arrow-ready columns with the training table's conventions: numerics as float, categoricals as text, with
    booleans spelled as Arrow casts them ("true"/"false"), so a value maps to the same vocabulary slot."""
    cols: dict[str, list[Any]] = {f: [None if r[f] is None else float(r[f]) for r in rows] for f in meta["_numeric"]}
    for f in meta["_categorical"]:
        cols[f] = [None if r[f] is None else ("true" if r[f] is True else "false" if r[f] is False else
                                              str(int(r[f])) if isinstance(r[f], float) and r[f].is_integer()
                                              else str(r[f])) for r in rows]
    return cols
