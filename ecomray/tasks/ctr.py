"""Click-through-rate prediction over categorical fields (marketing-effect prediction): did the user click / use
the item in this context? A binary classifier over a labelled table (`schema: table`, one column per field).

Features: each field's vocabulary is fitted on the train split only (values seen at least `task.min_count` times,
sorted), index 0 of every field is the out-of-vocabulary slot, so a value never seen in training (at evaluation
or serving time) gets a learned "unknown" embedding rather than an error. A row is (F,) global ids into one
embedding table: the field's offset + its index (`field_offsets`).

Loss: binary cross-entropy plus `task.embedding_l2 / 2 * ||E||^2` over the model's embedding tables (the BARS /
FuxiCTR `embedding_regularizer`), when set. Metrics: AUC and log-loss (scikit-learn), on the whole split.
Serving (`POST /v1/ctr`): rows of field values in, a click probability per row out; unknown values go to the
out-of-vocabulary slot and are counted in the response.
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
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from ecomray import serving
from ecomray.data import shards
from ecomray.tasks import RequestError

KEY_METRICS = ("auc", "logloss")
ROUTE = "ctr"


@dataclass
class CTRData:
    fields: list[str]
    vocab: dict[str, list[str]]                      # field -> values of index 1..n (0 = out of vocabulary)
    splits: dict[str, dict[str, torch.Tensor]]      # split -> {"x": (N, F) int64 global ids, "label": (N,)}
    label: str
    rank: int = 0
    world: int = 1
    examples: list[dict] = field(default_factory=list)
    oov_rate: dict[str, float] = field(default_factory=dict)
    cfg: dict = field(repr=False, default_factory=dict)


def cardinalities(vocab: dict[str, list[str]], fields: list[str]) -> list[int]:
    """Rows per field in the embedding table: its vocabulary plus the out-of-vocabulary slot."""
    return [len(vocab[f]) + 1 for f in fields]


def field_offsets(cards: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)


def encode(frame: pl.DataFrame, fields: list[str], vocab: dict[str, list[str]]) -> np.ndarray:
    """(N, F) global ids: per field, its offset + (1-based index in its vocabulary, 0 when unseen or null)."""
    offsets = field_offsets(cardinalities(vocab, fields))
    cols = []
    for k, f in enumerate(fields):
        index = {v: n + 1 for n, v in enumerate(vocab[f])}
        local = frame[f].cast(pl.Utf8).replace_strict(index, default=0, return_dtype=pl.Int64).fill_null(0)
        cols.append(local.to_numpy() + offsets[k])
    return np.stack(cols, 1) if cols else np.zeros((frame.height, 0), np.int64)


def build_data(cfg: dict, rank: int = 0, world_size: int = 1) -> CTRData:
    t = cfg["task"]
    manifest = shards.load_manifest(shards.dataset_dir(cfg))
    label = t.get("label") or manifest["schema"]["label"]
    fields = list(t.get("fields") or [c for c in manifest["schema"]["columns"] if c not in (label, "split")])
    df = shards.read_frame(cfg, columns=[*fields, label, "split", "_file", "_row"])
    parts = {s: df.filter(pl.col("split") == s) for s in ("train", "val", "test")}
    min_count = int(t.get("min_count", 1))
    vocab = {}
    for f in fields:
        counts = parts["train"].group_by(pl.col(f).cast(pl.Utf8)).len().drop_nulls(f)
        vocab[f] = sorted(counts.filter(pl.col("len") >= min_count)[f].to_list())
    splits = {s: {"x": torch.from_numpy(encode(p, fields, vocab)),
                  "label": torch.from_numpy(p[label].cast(pl.Float32).to_numpy(writable=True))} for s, p in parts.items()}
    offsets = torch.from_numpy(field_offsets(cardinalities(vocab, fields)))
    oov = {s: float((v["x"] == offsets).float().mean()) if len(v["label"]) else 0.0 for s, v in splits.items()}
    examples = [{"rows": parts["train"].select(fields).cast(pl.Utf8).head(2).to_dicts()}]
    return CTRData(fields, vocab, splits, label, rank, world_size, examples, oov, cfg)


def model_kwargs(data: CTRData) -> dict:
    return {"cardinalities": cardinalities(data.vocab, data.fields)}


def build_model(cfg: dict, data: CTRData) -> nn.Module:
    return instantiate(cfg["model"], **model_kwargs(data))


def train_batches(data: CTRData, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    train = data.splits["train"]
    mine = torch.arange(data.rank, len(train["label"]), data.world)      # each worker its slice of the rows
    order = mine[torch.randperm(len(mine), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))]
    l2 = float(data.cfg["task"].get("embedding_l2") or 0.0)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        batch = {"x": train["x"][idx], "label": train["label"][idx]}
        if l2:            # a setting of the loss, carried with the batch because loss_step sees only (model, batch)
            batch["embedding_l2"] = torch.tensor(l2)
        yield batch


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(model(batch["x"]), batch["label"])
    if "embedding_l2" in batch:
        core = model.module if hasattr(model, "module") else model
        loss = loss + float(batch["embedding_l2"]) / 2 * sum(p.pow(2).sum() for p in core.embedding_parameters())
    return loss


@torch.no_grad()
def probabilities(model: nn.Module, x: torch.Tensor, batch_size: int = 65536) -> np.ndarray:
    was = model.training
    if was:  # eval()/train() walk every submodule: skipped when the mode is already right (serving)
        model.eval()
    device = next(model.parameters()).device
    out = [torch.sigmoid(model(x[lo:lo + batch_size].to(device)).float()).cpu() for lo in range(0, len(x), batch_size)]
    if was:
        model.train()
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


EVAL_OPTIONS: tuple[str, ...] = ()     # evaluate.task: every setting builds the fields or their vocabularies


def evaluate(model: nn.Module, data: CTRData, split: str) -> dict[str, float]:
    t = data.splits[split]
    y, p = t["label"].numpy(), probabilities(model, t["x"])
    return {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
            "oov_rate": data.oov_rate.get(split, 0.0)}


def metadata(data: CTRData) -> dict:
    return {"fields": data.fields, "vocab": data.vocab, "label": data.label, "model_kwargs": model_kwargs(data),
            "oov_rate": data.oov_rate, "examples": data.examples}


def predict(model: nn.Module, meta: dict, inputs: pa.Table | list[dict[str, Any]]) -> np.ndarray:
    """Click probabilities for rows (an Arrow table or dicts) of field values; unknown values -> the OOV slot."""
    frame = pl.from_arrow(inputs) if isinstance(inputs, pa.Table) else pl.DataFrame(
        {f: [None if r.get(f) is None else str(r[f]) for r in inputs] for f in meta["fields"]},
        schema={f: pl.Utf8 for f in meta["fields"]})
    x = torch.from_numpy(encode(frame, meta["fields"], meta["vocab"]))
    return probabilities(model, x)


# ----------------------------------------------------------------------------------------------- batch prediction
def batch_inputs(cfg: dict, split: str) -> shards.ShardScan:
    return shards.scan(cfg, split)


BATCH_OPTIONS: tuple[str, ...] = ()     # batch_score takes no options


def batch_score(model: nn.Module, meta: dict, batch: pa.Table, options: dict) -> pa.Table:
    cols = {meta["label"]: batch[meta["label"]]} if meta.get("label") in batch.column_names else {}
    return pa.table({**cols, "probability": pa.array(predict(model, meta, batch), pa.float32())})


# ----------------------------------------------------------------------------------------------- serving
FieldValue = Union[Annotated[str, StringConstraints(max_length=256)], serving.Integer]


class CTRResponse(serving.Response):
    probabilities: list[float | None] = Field(description="click probability per row")
    unknown: list[int] = Field(description="per row: how many field values were not seen in training (OOV slot)")


def api(meta: dict, limits: dict) -> tuple[type[BaseModel], type[BaseModel]]:
    """POST /v1/ctr: rows with exactly the model's fields, each a string or an integer id."""
    from pydantic import create_model

    fields = {f"f{n}": (FieldValue, Field(..., alias=name)) for n, name in enumerate(meta["fields"])}
    Row = create_model("CTRRow", __base__=serving.Strict, **fields)  # type: ignore[call-overload]

    class CTRRequest(serving.Strict):
        rows: list[Row] = Field(min_length=1, max_length=int(limits.get("max_rows", 256)),  # type: ignore[valid-type]
                                description="one impression per row: field -> value")

    return CTRRequest, CTRResponse


def prepare_serving(model: nn.Module, meta: dict) -> None:
    meta["_known"] = {f: set(meta["vocab"][f]) for f in meta["fields"]}


def serve_batch(model: nn.Module, meta: dict, requests: list[dict], options: dict) -> list[dict | RequestError]:
    """All rows of the batch in one `predict` call."""
    known = meta.get("_known") or {f: set(meta["vocab"][f]) for f in meta["fields"]}
    rows = [r for req in requests for r in req["rows"]]
    p = predict(model, meta, rows)
    out, lo = [], 0
    for req in requests:
        hi = lo + len(req["rows"])
        unknown = [sum(str(r[f]) not in known[f] for f in meta["fields"]) for r in req["rows"]]
        warnings = [f"{sum(unknown)} field value(s) not seen in training: scored with the unknown-value embedding"] \
            if any(unknown) else []
        out.append({"probabilities": [float(x) if math.isfinite(x) else None for x in p[lo:hi]],
                    "unknown": unknown, "warnings": warnings})
        lo = hi
    return out
