"""Pure pyarrow feature transforms for tabular families: fit on the training split, apply offline and online.

`fit_tabular(table, spec)` returns JSON-able statistics (stored in the registry version); `transform_tabular`
applies them to any table (a shard, or a serving request) and returns model-ready columns:
numeric -> float32, log1p for columns listed in `spec["log"]`, then standardized; categorical -> int32 index
into the fitted vocabulary, 0 for values never seen in training (out of vocabulary).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


def _numeric(col: pa.ChunkedArray | pa.Array, log: bool) -> pa.Array:
    x = pc.cast(col, pa.float64())
    if log:
        x = pc.ln(pc.add(pc.max_element_wise(x, 0.0), 1.0))
    return x


def fit_tabular(table: pa.Table, spec: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {"numeric": {}, "categorical": {}, "log": list(spec.get("log", []))}
    for name in spec.get("numeric", []):
        x = _numeric(table[name], name in stats["log"])
        mean = pc.mean(x).as_py() or 0.0
        std = pc.stddev(x).as_py() or 1.0
        stats["numeric"][name] = {"mean": mean, "std": std if std > 1e-12 else 1.0}
    for name in spec.get("categorical", []):
        values = pc.unique(pc.cast(table[name], pa.string())).to_pylist()
        stats["categorical"][name] = sorted(v for v in values if v is not None)
    return stats


def transform_tabular(table: pa.Table, stats: dict[str, Any]) -> pa.Table:
    cols, names = [], []
    for name, s in stats["numeric"].items():
        x = _numeric(table[name], name in stats["log"])
        x = pc.divide(pc.subtract(x, s["mean"]), s["std"])
        cols.append(pc.cast(pc.fill_null(x, 0.0), pa.float32()))
        names.append(name)
    for name, vocab in stats["categorical"].items():
        idx = pc.index_in(pc.cast(table[name], pa.string()), value_set=pa.array(vocab, pa.string()))
        cols.append(pc.cast(pc.fill_null(pc.add(idx, 1), 0), pa.int32()))  # 0 = out of vocabulary
        names.append(name)
    return pa.table(cols, names=names)


def cardinalities(stats: dict[str, Any]) -> list[int]:
    """Embedding table sizes: the vocabulary plus the out-of-vocabulary slot."""
    return [len(v) + 1 for v in stats["categorical"].values()]
