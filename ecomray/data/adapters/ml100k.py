"""MovieLens-100K in RecBole atomic format (`ml-100k.inter`: user_id, item_id, rating, timestamp; TSV).

Every rating is an interaction: `event` is `purchase`, `ts` the rating's epoch seconds; ties keep file order.
"""

from __future__ import annotations

import polars as pl

from ecomray.data.adapters import dataset_path
from ecomray.runtime import UserError


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    import os

    path = dataset_path(dataset, paths)
    if not os.path.exists(path):
        raise UserError(f"input not found: {path} (set ECOMRAY_DATASETS or paths.datasets to the datasets root)")
    lf = pl.scan_csv(path, separator="\t", infer_schema=False)
    rename = {c: c.split(":")[0] for c in lf.collect_schema().names()}
    lf = lf.rename(rename)
    return [(path, lf.select("user_id", "item_id", pl.lit("purchase").alias("event"), pl.col("timestamp").alias("ts")))]
