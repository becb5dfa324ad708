"""What the copy-generation adapters share: reading JSON-lines files losslessly as text, and the adapter-level
quarantine reasons of the `copy` schema (the schema's own rules come first)."""

from __future__ import annotations

import os

import polars as pl

from ecomray.features.text import blank_expr
from ecomray.runtime import UserError

# key#value pairs joined by `*`: no empty key or value, exactly one `#` per pair.
ATTRIBUTES = r"^\s*[^#*\s][^#*]*#[^#*]*[^#*\s]\s*(\*\s*[^#*\s][^#*]*#[^#*]*[^#*\s]\s*)*$"


def read_jsonl(path: str, columns: dict[str, str]) -> pl.DataFrame:
    """Every line of a JSON-lines file as text columns (source name -> schema name), `_row` = line number - 1. A line
    that is not a JSON object, or lacks a field, keeps its row with nulls (the schema quarantines it)."""
    import json

    if not os.path.exists(path):
        raise UserError(f"input not found: {path}")
    rows: dict[str, list] = {dst: [] for dst in columns.values()}
    bad: list[str | None] = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh):
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                reason = None
            except (UnicodeDecodeError, ValueError) as err:
                obj, reason = {}, f"malformed line ({type(err).__name__})"
            for src, dst in columns.items():
                v = obj.get(src)
                rows[dst].append(None if v is None else str(v))
            bad.append(reason)
    return pl.DataFrame({**rows, "_reason": bad}, schema={**{c: pl.Utf8 for c in rows}, "_reason": pl.Utf8}) \
             .with_row_index("_row").with_columns(pl.col("_row").cast(pl.Int64))


def copy_checks(df: pl.DataFrame) -> pl.DataFrame:
    """`_reason` for rows the copy family can't learn from: a malformed attribute string, an empty target, no input."""
    attrs = pl.col("attributes") if "attributes" in df.columns else pl.lit(None, dtype=pl.Utf8)
    title = pl.col("title") if "title" in df.columns else pl.lit(None, dtype=pl.Utf8)
    reason = (pl.when(pl.col("_reason").is_not_null()).then(pl.col("_reason"))
                .when(attrs.is_not_null() & ~attrs.str.contains(ATTRIBUTES)).then(pl.lit("bad attribute string"))
                .when(pl.col("target").is_not_null() & blank_expr("target"))
                .then(pl.lit("empty target"))
                .when(attrs.is_null() & (title.is_null() | blank_expr(title))).then(pl.lit("no input"))
                .otherwise(pl.lit(None, dtype=pl.Utf8)))
    return df.with_columns(_reason=reason)
