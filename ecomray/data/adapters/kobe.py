"""KOBE / TaoDescribe (`kobe_test.jsonl`): product title + aspect tag (<0>..<25>) + user-category tag (<a>/<b>/<c>) ->
product description. It is KOBE's *test* split: here it is extra training text (every row -> `train`) and the source
of the aspect / audience conditions; never report numbers on it as KOBE results (its SOURCE.md)."""

from __future__ import annotations

import os

import polars as pl

from ecomray.data.adapters import dataset_path
from ecomray.data.adapters.copy_common import copy_checks, read_jsonl

COLUMNS = {"title": "title", "aspect": "aspect", "user": "audience", "desc": "target"}


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    path = os.path.join(dataset_path(dataset, paths), "kobe_test.jsonl")
    df = copy_checks(read_jsonl(path, COLUMNS).with_columns(attributes=pl.lit(None, dtype=pl.Utf8)))
    return [(path, df.with_columns(split=pl.lit("train")).lazy())]
