"""Pure pyarrow feature transforms for tabular families: fit on the training split, apply offline and online.

`fit_tabular(table, spec)` returns JSON-able statistics (stored in the registry version); `transform_tabular`
applies them to any table (a shard, or a serving request) and returns model-ready columns:
numeric -> float32, log1p for columns listed in `spec["log"]`, then standardized, or, for columns listed in
`spec["quantile"]`, mapped through the training distribution's quantiles onto a standard normal (rank-Gauss,
piecewise linear between stored knots), or, for columns listed in `spec["ple"]`, piecewise-linear encoded over
bins at the training quantiles (one float32 column per bin, `<name>#<k>`: 0 below the bin, 1 above it, linear
inside; Gorishniy et al. 2022, "On Embeddings for Numerical Features in Tabular Deep Learning"); categorical ->
int32 index into the fitted vocabulary, 0 for values never seen in training (out of vocabulary).
`numeric_columns(stats)` names the numeric model inputs in order.
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
        # skip_nulls=False: a null stays null, imputed like any other column's (max skipped it: null became 0)
        x = pc.ln(pc.add(pc.max_element_wise(x, 0.0, skip_nulls=False), 1.0))
    return x


def fit_tabular(table: pa.Table, spec: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {"numeric": {}, "categorical": {}, "log": list(spec.get("log", []))}
    quantile = set(spec.get("quantile") or [])
    ple = set(spec.get("ple") or [])
    for name in spec.get("numeric", []):
        x = _numeric(table[name], name in stats["log"])
        if name in ple:
            stats["numeric"][name] = {"edges": _ple_edges(x, int(spec.get("ple_bins") or 16))}
            continue
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


def _ple_edges(x: pa.Array, bins: int) -> list[float]:
    """Bin edges at the training quantiles; repeated values (a mass of zeros) collapse into one edge."""
    probs = np.linspace(0.0, 1.0, bins + 1).tolist()
    values = pc.quantile(pc.drop_null(x), q=probs, interpolation="linear").to_pylist()
    return [float(v) for v in np.unique(np.asarray(values, dtype=np.float64))]


def _to_numpy(x: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return (x if isinstance(x, pa.Array) else x.combine_chunks()).to_numpy(zero_copy_only=False)


def ple_encode(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """(R,) float -> (R, max(len(edges) - 1, 1)): bin k is clip((x - e_k) / (e_{k+1} - e_k), 0, 1); NaN -> 0."""
    e = np.asarray(edges, dtype=np.float64)
    if len(e) < 2:                                   # a constant column: one all-zero input
        return np.zeros((len(values), 1), dtype=np.float32)
    lo, width = e[:-1], np.diff(e)
    out = np.clip((values[:, None] - lo[None, :]) / width[None, :], 0.0, 1.0)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def numeric_columns(stats: dict[str, Any]) -> list[str]:
    """The numeric model inputs, in order: one per plain numeric, one per bin of a PLE-encoded numeric."""
    out = []
    for name, s in stats["numeric"].items():
        out += [f"{name}#{k}" for k in range(max(len(s["edges"]) - 1, 1))] if "edges" in s else [name]
    return out


def transform_tabular(table: pa.Table, stats: dict[str, Any]) -> pa.Table:
    cols, names = [], []
    for name, s in stats["numeric"].items():
        x = _numeric(table[name], name in stats["log"])
        if "edges" in s:
            enc = ple_encode(_to_numpy(x).astype(np.float64), s["edges"])
            for k in range(enc.shape[1]):
                cols.append(pa.array(enc[:, k], pa.float32()))
                names.append(f"{name}#{k}")
            continue
        if "knots" in s:   # np.interp clamps outside the training range, so serving can't produce extreme inputs
            v, z = np.asarray(s["knots"], dtype=np.float64).T
            raw = _to_numpy(x)
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
