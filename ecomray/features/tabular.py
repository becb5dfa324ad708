"""Pure pyarrow feature transforms for tabular families: fit on the training split, apply offline and online.

`fit_tabular(table, spec)` returns JSON-able statistics (stored in the registry version); `transform_tabular`
applies them to any table (a shard, or a serving request) and returns model-ready columns:
numeric -> float32, log1p for columns listed in `spec["log"]`, then standardized, or, for columns listed in
`spec["quantile"]`, mapped through the training distribution's quantiles onto a standard normal (rank-Gauss,
piecewise linear between stored knots); categorical -> int32 index into the fitted vocabulary, 0 for values never
seen in training (out of vocabulary).
"""

from __future__ import annotations

from typing import Any

from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

QUANTILE_KNOTS = 101


def _numeric(col: pa.ChunkedArray | pa.Array, log: bool) -> pa.Array:
    x = pc.cast(col, pa.float64())
    if log:
        x = pc.ln(pc.add(pc.max_element_wise(x, 0.0), 1.0))
    return x


def fit_tabular(table: pa.Table, spec: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {"numeric": {}, "categorical": {}, "log": list(spec.get("log", []))}
    quantile = set(spec.get("quantile") or [])
    for name in spec.get("numeric", []):
        x = _numeric(table[name], name in stats["log"])
        if name in quantile:
            stats["numeric"][name] = {"knots": _quantile_knots(x)}
            continue
        mean = pc.mean(x).as_py() or 0.0
        std = pc.stddev(x).as_py() or 1.0
        stats["numeric"][name] = {"mean": mean, "std": std if std > 1e-12 else 1.0}
    for name in spec.get("categorical", []):
        values = pc.unique(pc.cast(table[name], pa.string())).to_pylist()
        stats["categorical"][name] = sorted(v for v in values if v is not None)
    return stats


def _quantile_knots(x: pa.Array) -> list[list[float]]:
    """[(value, z)] knots: the training quantiles and the normal scores of their probabilities. A value that many
    rows share (a mass of zeros) becomes one knot at the mean score of the probabilities it spans."""
    probs = np.linspace(0.0, 1.0, QUANTILE_KNOTS)
    values = np.asarray(pc.quantile(pc.drop_null(x), q=probs.tolist(), interpolation="linear").to_pylist())
    normal = NormalDist()
    z = np.array([normal.inv_cdf(min(max(p, 1e-3), 1 - 1e-3)) for p in probs])
    uniq, inverse = np.unique(values, return_inverse=True)
    zs = np.bincount(inverse, weights=z) / np.bincount(inverse)
    return [[float(v), float(s)] for v, s in zip(uniq, zs)]


def transform_tabular(table: pa.Table, stats: dict[str, Any]) -> pa.Table:
    cols, names = [], []
    for name, s in stats["numeric"].items():
        x = _numeric(table[name], name in stats["log"])
        if "knots" in s:   # np.interp clamps outside the training range, so serving can't produce extreme inputs
            v, z = np.asarray(s["knots"], dtype=np.float64).T
            raw = x.to_numpy(zero_copy_only=False) if isinstance(x, pa.Array) else x.combine_chunks().to_numpy(zero_copy_only=False)
            mask = np.isnan(raw)
            out = np.interp(np.where(mask, v[0], raw), v, z)
            x = pa.array(out, mask=mask)
        else:
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
