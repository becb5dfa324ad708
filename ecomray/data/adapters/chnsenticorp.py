"""ChnSentiCorp (ymcui/Chinese-BERT-wwm copy): train.tsv / dev.tsv / test.tsv, header `label<TAB>text_a`.

The canonical split is kept exactly as published: a `split` column (train, val <- dev, test) carried by the data
(`split: given`). Rows are never removed for being duplicates; `extra_manifest` counts the texts that occur in two
splits (after the leakage guard's normalization, `ecomray.features.text.text_key`). Review files are read with
lossy UTF-8 decoding so that a row with broken bytes is quarantined (`broken encoding`) instead of stopping the job.
"""

from __future__ import annotations

import os

import polars as pl

from ecomray.data.adapters import dataset_path
from ecomray.features.text import blank_expr
from ecomray.runtime import UserError

FILES = (("train", "train.tsv"), ("val", "dev.tsv"), ("test", "test.tsv"))


def read_tsv(path: str) -> pl.DataFrame:
    """The raw file as text columns `label`, `text` plus `_row` (line order) and `_reason` (adapter checks)."""
    if not os.path.exists(path):
        raise UserError(f"input not found: {path}")
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False, encoding="utf8-lossy",
                     has_header=True, truncate_ragged_lines=False)
    if "label" not in df.columns or "text_a" not in df.columns:
        raise UserError(f"{path}: expected the header `label<TAB>text_a` (found {df.columns})")
    return df.select(pl.col("label").str.strip_chars(), pl.col("text_a").alias("text")).with_row_index("_row") \
             .with_columns(pl.col("_row").cast(pl.Int64))


def review_checks(text: pl.Expr) -> pl.Expr:
    """Adapter-level reasons shared by the review adapters (the schema's rules come first)."""
    return (pl.when(text.str.contains("\ufffd", literal=True)).then(pl.lit("broken encoding"))
              .when(text.is_not_null() & blank_expr(text)).then(pl.lit("empty text"))
              .otherwise(pl.lit(None, dtype=pl.Utf8)))


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    root = dataset_path(dataset, paths)
    out = []
    for split, name in FILES:
        path = os.path.join(root, name)
        df = read_tsv(path).with_columns(split=pl.lit(split), text=pl.col("text").str.strip_chars_start("\ufeff"))
        out.append((path, df.with_columns(_reason=review_checks(pl.col("text"))).lazy()))
    return out


def split_keys(dataset: dict, paths: dict) -> dict[str, set[str]]:
    """Normalized texts of each published split ({"train", "val", "test"} -> keys): the leakage guard's input."""
    from ecomray.features.text import text_key_expr

    root = dataset_path(dataset, paths)
    return {split: set(read_tsv(os.path.join(root, name)).select(text_key_expr("text")).to_series().drop_nulls())
            for split, name in FILES}


def extra_manifest(dataset: dict, paths: dict) -> dict:
    keys = split_keys(dataset, paths)
    return {"canonical_overlap": {
        "note": "texts (NFKC, whitespace removed) shared by two published splits; kept as published, counted here. "
                "task.eval_text_guard=strict drops such training rows; every model reports unseen_accuracy.",
        "test_in_train": len(keys["test"] & keys["train"]), "val_in_train": len(keys["val"] & keys["train"]),
        "test_in_val": len(keys["test"] & keys["val"])}}
