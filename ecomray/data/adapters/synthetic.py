"""The built-in synthetic shop: generate it (once per config) beside the prepared data, then read it."""

from __future__ import annotations

import os

import polars as pl


def raw_dir(dataset: dict, paths: dict) -> str:
    return os.path.join(paths["data"], "_raw", dataset["name"])


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    from ecomray.data import synthetic

    out = raw_dir(dataset, paths)
    synthetic.generate(dataset["synthetic"], out)
    files = sorted(f for f in os.listdir(os.path.join(out, "raw")) if f.endswith(".parquet"))
    return [(os.path.join(out, "raw", f), pl.scan_parquet(os.path.join(out, "raw", f))) for f in files]


def extra_manifest(dataset: dict, paths: dict) -> dict:
    """Where the generator's ground truth lives, so evaluation can score an oracle."""
    return {"truth_dir": raw_dir(dataset, paths)}
