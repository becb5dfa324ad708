"""Adapters turn a dataset's own files into sources in a schema's column names.

An adapter is a module `ecomray.data.adapters.<name>` with

    def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]

returning one (source path, LazyFrame) per input file, columns named as the schema's columns (raw values:
validation casts them). Adapters may add `_row` (source position, Int64) when the source order is not
the file's line order; otherwise prepare adds it. An adapter may also add `_reason` (text): a quarantine reason
it decided itself (the review adapters flag broken encoding, empty texts and texts that leak an evaluation set).
A `_record_error` (text) marks a record that is itself broken (its fields misaligned): that reason wins over every
rule. An optional `exact_source(dataset, paths, i, work) -> pl.LazyFrame` re-reads source i when Polars' reader
refuses it (files: a malformed CSV record), quarantining the broken records instead of failing the file.
An optional `group_source(dataset, paths, indices) -> pl.LazyFrame | None` reads several consecutive sources as one
scan carrying each row's `_file` (the source index) and `_row` (its position in its own source), so that prepare
validates many small files in one pass (files: CSV, Parquet, JSONL); None, or a scan Polars refuses, means
smaller groups, down to one by one.
Each source must be cheap to rebuild: the ray engine calls `sources()` again inside the task that processes source i.
An optional `extra_manifest(dataset, paths) -> dict` adds entries to the manifest.

Adapters: files (CSV/Parquet/JSONL), synthetic, amazon, ml100k, and for reviews chnsenticorp, online_shopping and
synthetic_reviews.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ecomray.runtime import UserError


def load_adapter(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"ecomray.data.adapters.{name}")
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("ecomray.data.adapters"):
            raise UserError(f"unknown dataset adapter {name!r} (no module ecomray/data/adapters/{name}.py)") from None
        raise


def dataset_path(dataset: dict, paths: dict) -> str:
    """`dataset.path`, resolved against `paths.datasets` when relative; a relative path found there is that one,
    else one found from the working folder (`dataset.path=events.csv` typed next to the file) is."""
    import glob
    import os

    path = dataset.get("path")
    if not path or path == "???":
        raise UserError(f"dataset {dataset.get('name')!r}: set dataset.path=<file, folder or glob>")
    if "://" in path or os.path.isabs(path):
        return path
    under_datasets = os.path.join(paths.get("datasets", "."), path)
    if not glob.glob(under_datasets, recursive=True) and glob.glob(path, recursive=True):
        return os.path.abspath(path)
    return under_datasets
