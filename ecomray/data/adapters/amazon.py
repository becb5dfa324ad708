"""Amazon review sequences (S3-Rec / ICLRec preprocessing): one line per user, `user item_1 ... item_n`.

The files carry neither time nor event type: `event` is `purchase` and `ts` is the item's position in the
user's line, as epoch seconds (1970-01-01T00:00:00 + position s), so that leave-one-out follows the line.
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
    lines = pl.scan_csv(path, has_header=False, separator="\x1f", new_columns=["line"], infer_schema=False,
                        quote_char=None)
    lf = (lines.with_row_index("_line")
               .with_columns(tokens=pl.col("line").str.strip_chars().str.split(" "))
               .with_columns(user_id=pl.col("tokens").list.first(), item_id=pl.col("tokens").list.slice(1))
               .explode("item_id")
               .with_columns(ts=pl.int_range(pl.len()).over("_line").cast(pl.Int64))
               .with_row_index("_row")
               .select(pl.col("_row").cast(pl.Int64), "user_id", "item_id", pl.lit("purchase").alias("event"), "ts"))
    return [(path, lf)]
