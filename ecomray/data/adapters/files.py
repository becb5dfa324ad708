"""Generic reader: CSV, Parquet or JSONL files in a schema's columns (a file, a folder or a glob)."""

from __future__ import annotations

import glob
import os
from typing import Any

import polars as pl

from ecomray.data.adapters import dataset_path
from ecomray.runtime import UserError

FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def list_files(path: str) -> list[str]:
    """Expand a file, a folder (its data files, sorted) or a glob into a sorted list of files."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.splitext(f)[1].lower() in FORMATS and not f.startswith((".", "_")))
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    else:
        if not os.path.exists(path):
            raise UserError(f"input not found: {path}")
        files = [path]
    if not files:
        raise UserError(f"no input files found at {path} (expected .csv, .parquet or .jsonl files)")
    return files


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in ("csv", "parquet", "jsonl"):
            raise UserError(f"unknown dataset.format {fmt!r}: use csv, parquet, jsonl or auto")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"{path}: unknown file format {ext or '(no extension)'!r}; set dataset.format=csv|parquet|jsonl")
    return FORMATS[ext]


def scan_file(path: str, fmt: str, csv: dict[str, Any], columns: dict[str, str]) -> pl.LazyFrame:
    """Lazily scan one file; CSV values stay text so that validation, not the reader, judges them."""
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: the file is empty")
    if fmt == "csv":
        lf = pl.scan_csv(path, separator=csv.get("separator", ","), has_header=csv.get("has_header", True),
                         quote_char=csv.get("quote_char", '"'), infer_schema=False, encoding="utf8",
                         new_columns=csv.get("new_columns"))
    elif fmt == "parquet":
        lf = pl.scan_parquet(path)
    else:
        lf = pl.scan_ndjson(path, infer_schema_length=None)
    names = lf.collect_schema().names()
    # A BOM that the reader left on the first header, or stray whitespace/CR around names.
    clean = {n: n.lstrip("\ufeff").strip() for n in names if n != n.lstrip("\ufeff").strip()}
    if clean:
        lf = lf.rename(clean)
    if columns:
        have = set(lf.collect_schema().names())
        lf = lf.rename({src: dst for src, dst in columns.items() if src in have})
    return lf


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    """One source per input file. With `dataset.splits: {train: <file>, val: <file>, test: <file>}` (files
    relative to `dataset.path`), a published split kept in separate files, each row gets its file's split in the
    `split` column (`split: given`)."""
    fmt = dataset.get("format", "auto")
    csv, columns = dataset.get("csv") or {}, dataset.get("columns") or {}
    splits = dataset.get("splits")
    if not splits:
        return [(f, scan_file(f, file_format(f, fmt), csv, columns)) for f in list_files(dataset_path(dataset, paths))]
    root = dataset_path(dataset, paths)
    column = (dataset.get("split") or {}).get("column", "split")
    out = []
    for split, rel in splits.items():
        f = list_files(os.path.join(root, rel))
        if len(f) != 1:
            raise UserError(f"dataset.splits.{split}: {rel} must name one file (found {len(f)})")
        out.append((f[0], scan_file(f[0], file_format(f[0], fmt), csv, columns).with_columns(
            pl.lit(str(split)).alias(column))))
    return out
