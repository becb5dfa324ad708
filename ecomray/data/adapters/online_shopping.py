"""online_shopping_10_cats (SophonPlus/ChineseNlpCorpus): one CSV `cat,label,review`, no canonical split.

Before the (seeded, category x label stratified) split, the adapter flags rows that prepare quarantines:
- `broken encoding` (bytes that are not UTF-8), `empty text` (only whitespace);
- `leak: chnsenticorp eval text`: the normalized text (NFKC, whitespace removed) equals a ChnSentiCorp dev or test
  text. Those reviews then occur in no split of this dataset, so no tokenizer, pretraining set or training split
  built from it can contain them (`dataset.exclude_eval_of`);
- `duplicate: chnsenticorp train text`: equal to a ChnSentiCorp training text (cross-dataset dedup, so a model
  trained on both never counts a review twice and this dataset's val/test hold no ChnSentiCorp training text);
- `duplicate text`: a repeat of an earlier review of this file (normalized), so that a text never lands in two
  splits.
"""

from __future__ import annotations

import os

import polars as pl

from ecomray.data.adapters import chnsenticorp, dataset_path
from ecomray.features.text import blank_expr
from ecomray.runtime import UserError


def _guard_keys(dataset: dict, paths: dict) -> tuple[set[str], set[str]]:
    guard = dataset.get("exclude_eval_of") or {}
    if not guard:
        return set(), set()
    keys = chnsenticorp.split_keys({"name": "chnsenticorp", "path": guard["path"]}, paths)
    return keys["val"] | keys["test"], keys["train"]


def frame(dataset: dict, paths: dict) -> tuple[str, pl.DataFrame]:
    from ecomray.features.text import text_key_expr

    path = dataset_path(dataset, paths)
    if not os.path.exists(path):
        raise UserError(f"input not found: {path}")
    df = pl.read_csv(path, infer_schema=False, encoding="utf8-lossy")
    df = df.rename({c: c.lstrip("\ufeff").strip() for c in df.columns})
    if not {"cat", "label", "review"} <= set(df.columns):
        raise UserError(f"{path}: expected the columns cat,label,review (found {df.columns})")
    df = df.select(pl.col("cat").alias("category"), pl.col("label").str.strip_chars(),
                   pl.col("review").str.strip_chars_start("\ufeff").alias("text")).with_row_index("_row") \
           .with_columns(pl.col("_row").cast(pl.Int64))
    evals, train = _guard_keys(dataset, paths)
    key = text_key_expr("text")
    first = pl.int_range(pl.len()).over(key, order_by="_row") == 0
    reason = (pl.when(pl.col("text").str.contains("\ufffd", literal=True)).then(pl.lit("broken encoding"))
                .when(pl.col("text").is_not_null() & ((key == "") | blank_expr("text"))).then(pl.lit("empty text"))
                .when(key.is_in(list(evals))).then(pl.lit("leak: chnsenticorp eval text"))
                .when(key.is_in(list(train))).then(pl.lit("duplicate: chnsenticorp train text"))
                .when(pl.col("text").is_not_null() & ~first).then(pl.lit("duplicate text"))
                .otherwise(pl.lit(None, dtype=pl.Utf8)))
    return path, df.with_columns(_reason=reason)


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    path, df = frame(dataset, paths)
    return [(path, df.lazy())]
