"""AdvertiseGen (ADGEN): `train_head5000.jsonl` (the first 5,000 train rows) and `dev.json` (the full 1,070-row dev,
the published benchmark's evaluation set), JSON lines `{"content": "类型#上衣*...", "summary": "<copy>"}`.

Splits: dev -> `test` (never trained or tuned on); the train rows -> `train` / `val`, drawn by attribute set: a row
goes to val when a seeded hash of its attribute string falls in the first `split.val_fraction` of the range, so every
row with the same attributes lands in the same split (no attribute set is in both).
"""

from __future__ import annotations

import os

import polars as pl
import polars_hash  # noqa: F401  (registers .nchash: a hash that does not change across Polars versions)

from ecomray.data.adapters import dataset_path
from ecomray.data.adapters.copy_common import copy_checks, read_jsonl

FILES = (("train", "train_head5000.jsonl"), ("test", "dev.json"))
COLUMNS = {"content": "attributes", "summary": "target"}


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    root = dataset_path(dataset, paths)
    split = dataset.get("split") or {}
    seed, val = int(split.get("seed", 42)), float(split.get("val_fraction", 0.1))
    out = []
    for kind, name in FILES:
        path = os.path.join(root, name)
        df = copy_checks(read_jsonl(path, COLUMNS))
        if kind == "test":
            df = df.with_columns(split=pl.lit("test"))
        else:
            draw = (pl.lit(f"{seed}:") + pl.col("attributes").fill_null("")).nchash.xxhash64() % 1_000_000
            df = df.with_columns(split=pl.when(draw < int(val * 1_000_000)).then(pl.lit("val"))
                                 .otherwise(pl.lit("train")))
        out.append((path, df.lazy()))
    return out
