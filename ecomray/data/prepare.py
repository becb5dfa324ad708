"""The data plane: raw files -> validated, quarantined, hash-sharded, sorted and split Parquet + manifest.

Two passes, both pure functions of their inputs so that the `polars` engine (a loop on one machine) and the
`ray` engine (the same functions as Ray tasks) write the same rows to the same shards:

1. `stage_source(i)`: stream source i through `schema.validate`, tag each row with its shard (xxhash64 of
   the key) or with bucket -1 (quarantine), and sink it to `stage/src-i/_bucket=b/`. Memory is bounded by
   Polars' streaming chunks, not by the input. Consecutive small sources go through one sink together
   (`stage_group`), each row keeping its own source position.
2. `finalize_shard(s)`: read every source's bucket s, drop (or count) exact duplicates, sort each key's
   rows by (order_by, file, row), assign the split, write `shards/part-s.parquet` (zstd).

Splits that need a global view (temporal cuts, stratified draws, duplicates of row-keyed tables) are
planned between the passes from a narrow projection of the staged rows.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import polars as pl

import ecomray
from ecomray.data import schema as S
from ecomray.data.adapters import dataset_path, load_adapter
from ecomray.data.adapters.files import (READ_ERRORS, first_bad_utf8_line, format_extension, gzip_damage,
                                         is_gzip_damage)
from ecomray.data.shards import dataset_dir, has_manifest, load_manifest
from ecomray.runtime import UserError, is_uri, one_at_a_time, user_error_in

QUARANTINE_BUCKET = -1
SPLITS = ("train", "val", "test")


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- sources
def _sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    return load_adapter(dataset.get("adapter", "files")).sources(dataset, paths)


def _with_position(lf: pl.LazyFrame, file_index: int) -> pl.LazyFrame:
    """Every row carries (_file, _row): its source position, the tie-breaker for equal timestamps."""
    if "_row" not in lf.collect_schema():
        lf = lf.with_row_index("_row").with_columns(pl.col("_row").cast(pl.Int64))
    return lf.with_columns(pl.lit(file_index, dtype=pl.Int32).alias("_file"))


def stage_source(i: int, src: str, lf: pl.LazyFrame, schema: dict, shards: int, stage: str, ts_format: str = "auto",
                 exact: Callable[[], pl.LazyFrame] | None = None) -> dict:
    """Pass 1 for one source: validate and bucket its rows into `stage/src-i/_bucket=b/` (b = -1: quarantine).

    `exact`: the adapter's record-by-record reader of this source (`exact_source`), used when Polars' reader
    refuses the file (a malformed CSV record or JSON line); it quarantines the malformed records instead of failing
    the file, or gives None (no such reader for this source: the error stands)."""
    out = os.path.join(stage, f"src-{i:05d}")
    try:
        checked = S.validate(_with_position(lf, i), schema, source=src, ts_format=ts_format)
        bucket = pl.when(pl.col("reason").is_null()).then(S.shard_of(schema, shards)).otherwise(QUARANTINE_BUCKET)
        checked.with_columns(bucket.cast(pl.Int32).alias("_bucket")).sink_parquet(  # staging, read once: fast codec
            pl.PartitionBy(out, key="_bucket", include_key=False), compression="lz4", statistics=False, mkdir=True)
    except pl.exceptions.PolarsError as err:
        text = str(err)
        if "utf-8" in text.lower() or "utf8" in text.lower():
            line = first_bad_utf8_line(src) if os.path.isfile(src) else None
            where = f"line {line}" if line else "somewhere in the file"
            raise UserError(f"{src}: invalid UTF-8 at {where}; ecomray never replaces bytes silently: "
                            f"re-encode the file (for example `iconv -f GBK -t UTF-8`)") from None
        first = text.splitlines()[0] if text else type(err).__name__
        redo = exact() if exact is not None and not _reads(lf) else None  # only for the reader's own errors
        if redo is not None:
            shutil.rmtree(out, ignore_errors=True)             # whatever the failed attempt staged
            log(f"  {src}: Polars' reader refused it ({first}); read it again record by record "
                f"(slower), malformed records go to quarantine")
            return stage_source(i, src, redo, schema, shards, stage, ts_format)
        raise UserError(f"{src}: could not be read: {first}") from None
    except READ_ERRORS as err:     # a .gz cut short or corrupted past its first block; anything else (a full
        shutil.rmtree(out, ignore_errors=True)    # disk under the staging folder) is not the source's fault
        damage = gzip_damage(src, err)
        if damage:
            raise damage from None
        raise
    counts = _staged_counts(out, [i])[0]
    return {"source": src, "rows_in": sum(counts.values()), "buckets": counts}


# Small sources (an hour of logs per file) are staged together when the adapter can read them as one scan
# (`group_source`): one streaming sink for many files instead of one each, and (1 + shards) staged files per group
# instead of per file (figures: `benchmarks/README.md#many-small-files`).
GROUP_BYTES = 256 << 20


def source_groups(srcs: list[str], limit: int = GROUP_BYTES) -> list[list[int]]:
    """Consecutive source indices of one file kind (`.csv`, `.jsonl`, ...), grouped while their files add up to at most `limit` bytes; a
    larger file (or a source that is not a local file) is a group of its own."""
    groups: list[list[int]] = []
    size = 0
    for i, src in enumerate(srcs):
        b = os.path.getsize(src) if os.path.isfile(src) else limit
        if not groups or size + b > limit or format_extension(src) != format_extension(srcs[groups[-1][-1]]):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += b
    return groups


SPLIT_BELOW = 4   # a failing group this small is staged file by file; a larger one is tried again in halves


def stage_group(group: list[int], srcs: list[tuple[str, pl.LazyFrame]], schema: dict, shards: int, stage: str,
                ts_format: str, exact: Callable[[int], Callable[[], pl.LazyFrame] | None],
                together: Callable[[list[int]], pl.LazyFrame | None] | None = None) -> list[dict]:
    """Pass 1 for consecutive sources. With `together` (the adapter's `group_source`: the group as one scan that
    carries each row's `_file` and `_row`), they are validated in one streaming sink to
    `stage/src-<first>-<last>/_bucket=b/`: the same rows, positions and verdicts as staging each alone gives, each
    file with the timestamp format detected from its own first 1,000 rows.

    Files whose timestamp formats differ are split into runs of one format. A group that Polars cannot read as one
    (headers that differ, a malformed record) is tried again in halves, down to `SPLIT_BELOW` files, which are
    staged alone (`stage_source`: an error names its file, a malformed record gets the record-by-record reader).
    A group the adapter declines (None) is staged file by file."""
    def alone(g: list[int]) -> list[dict]:
        return [stage_source(i, *srcs[i], schema, shards, stage, ts_format, exact(i)) for i in g]

    def again(g: list[int]) -> list[dict]:
        return stage_group(g, srcs, schema, shards, stage, ts_format, exact, together)

    if len(group) == 1 or together is None:
        return alone(group)
    what = f"{len(group)} files ({srcs[group[0]][0]} .. {srcs[group[-1]][0]})"
    out = os.path.join(stage, f"src-{group[0]:05d}-{group[-1]:05d}")
    try:
        lf = together(group)
        if lf is None:
            return alone(group)
        cols = S.text_datetime_columns(lf, schema)
        ts_formats = None
        if cols and ts_format == "auto":   # each file's own format, from its first 1,000 rows
            sample = lf.select("_file", *cols).group_by("_file", maintain_order=True).head(1000).collect()
            by_col = {c: S.detect_ts_formats(sample, "_file", c) for c in cols}
            found = {i: tuple(by_col[c][i] for c in cols) for i in by_col[cols[0]]}   # files with rows
            if len(set(found.values())) > 1:
                runs: list[list[int]] = []
                run_format = None
                for i in group:            # a file without rows joins the run it is in
                    if not runs or (i in found and run_format is not None and found[i] != run_format):
                        runs.append([])
                        run_format = None
                    runs[-1].append(i)
                    run_format = run_format or found.get(i)
                log(f"  {what}: their timestamp formats differ; validated in {len(runs)} runs of one format")
                return [r for run in runs for r in again(run)]
            if found:
                ts_formats = dict(zip(cols, next(iter(found.values()))))
        checked = S.validate(lf, schema, source=f"{srcs[group[0]][0]} .. {srcs[group[-1]][0]}",
                             ts_format=ts_format, ts_formats=ts_formats)
        bucket = pl.when(pl.col("reason").is_null()).then(S.shard_of(schema, shards)).otherwise(QUARANTINE_BUCKET)
        checked.with_columns(bucket.cast(pl.Int32).alias("_bucket")).sink_parquet(
            pl.PartitionBy(out, key="_bucket", include_key=False), compression="lz4", statistics=False, mkdir=True)
    except (pl.exceptions.PolarsError, UserError, *READ_ERRORS) as err:
        if isinstance(err, READ_ERRORS) and not is_gzip_damage(err):
            raise                               # not a source's fault (a full disk): no file to blame
        shutil.rmtree(out, ignore_errors=True)   # which file: staged alone, it says
        why = (str(err).splitlines() or [type(err).__name__])[0][:200]
        if len(group) <= SPLIT_BELOW:
            log(f"  {what} could not be validated as one ({why}): one by one instead")
            return alone(group)
        log(f"  {what} could not be validated as one ({why}): trying each half")
        half = len(group) // 2
        return again(group[:half]) + again(group[half:])
    return [{"source": srcs[i][0], "rows_in": sum(c.values()), "buckets": c}
            for i, c in zip(group, _staged_counts(out, group))]


def _reads(lf: pl.LazyFrame) -> bool:
    """Whether Polars' reader gets through the source at all (null counts parse every field of every record; a
    bare row count may not)."""
    try:
        lf.select(pl.all().null_count()).collect()
        return True
    except pl.exceptions.PolarsError:
        return False


def _bucket_files(stage: str, bucket: int) -> list[str]:
    return sorted(glob.glob(os.path.join(stage, "src-*", f"_bucket={bucket}", "*.parquet")))


def _staged_counts(src_stage: str, sources: list[int]) -> list[dict[int, int]]:
    """Rows staged under `src_stage` per bucket, for each of `sources` (the `_file` values staged there)."""
    counts: dict[int, dict[int, int]] = {i: {} for i in sources}
    for d in sorted(glob.glob(os.path.join(src_stage, "_bucket=*"))):
        b = int(d.rsplit("=", 1)[1])
        for f, n in pl.scan_parquet(os.path.join(d, "*.parquet")).group_by("_file").len().collect().iter_rows():
            counts[f][b] = n
    return [counts[i] for i in sources]


# ----------------------------------------------------------------------------------------------- split plan
def _scan_staged(files: list[str]) -> pl.LazyFrame:
    """Staged files of several sources: their data columns are typed alike, but the bookkeeping differs (raw text
    columns exist only for text sources, `_record_text` only for sources read record by record)."""
    return pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore")


def _good_rows(stage: str, shards: int) -> pl.LazyFrame | None:
    files = [f for s in range(shards) for f in _bucket_files(stage, s)]
    return _scan_staged(files) if files else None


def plan(stage: str, schema: dict, split: dict, dedup: str, shards: int) -> dict:
    """Decisions that need every row: temporal cuts, stratified assignment, duplicates of row-keyed tables."""
    out: dict[str, Any] = {"strategy": split.get("strategy", "none")}
    good = _good_rows(stage, shards)
    data_cols = list(schema["columns"])
    if good is None:       # every row quarantined: nothing to plan, and no shard has a row to split
        out["no_rows"] = True
        return out
    if schema.get("key") in (None, S.ROW_KEY):
        ranked = good.with_columns(pl.int_range(pl.len()).over(data_cols, order_by=["_file", "_row"]).alias("_dup"))
        dups = ranked.filter(pl.col("_dup") > 0).select("_file", "_row").collect()
        out["duplicates"] = dups.height
        if dedup == "quarantine" and dups.height:
            path = os.path.join(stage, "duplicates.parquet")
            dups.write_parquet(path)
            out["duplicates_file"] = path
    strategy = out["strategy"]
    if strategy == "temporal":
        ts = _temporal_column(schema)
        cuts = {}
        for name, frac in (("val_cut", split.get("val_fraction", 0.1) + split.get("test_fraction", 0.1)),
                           ("test_cut", split.get("test_fraction", 0.1))):
            if split.get(name):
                cuts[name] = pl.Series([split[name]]).str.to_datetime(time_unit="us", time_zone="UTC")[0]
            else:
                cuts[name] = good.select(pl.col(ts).quantile(1.0 - frac, interpolation="lower")).collect().item()
        out.update(column=ts, val_cut=cuts["val_cut"].isoformat(), test_cut=cuts["test_cut"].isoformat())
    elif strategy == "stratified":
        by = split.get("by") or schema.get("label")
        by = [by] if isinstance(by, str) else list(by or [])
        seed = int(split.get("seed", 0))
        draw = (pl.lit(str(seed)) + ":" + pl.col("_file").cast(pl.Utf8) + ":" + pl.col("_row").cast(pl.Utf8)).nchash.xxhash64()
        frame = good.select("_file", "_row", *by).with_columns(_draw=draw)
        if "duplicates_file" in out:
            frame = frame.join(pl.scan_parquet(out["duplicates_file"]), on=["_file", "_row"], how="anti")
        rank = pl.int_range(pl.len()).over(by or pl.lit(0), order_by=["_draw", "_file", "_row"]) if by else \
            pl.int_range(pl.len()).sort_by(["_draw", "_file", "_row"]).arg_sort()   # each row's rank by its draw
        n = pl.len().over(by) if by else pl.len()
        n_test = (n * split.get("test_fraction", 0.2)).round(0)
        n_val = (n * split.get("val_fraction", 0.1)).round(0)
        assigned = frame.with_columns(_rank=rank).with_columns(
            split=pl.when(pl.col("_rank") < n_test).then(pl.lit("test"))
                    .when(pl.col("_rank") < n_test + n_val).then(pl.lit("val")).otherwise(pl.lit("train")))
        path = os.path.join(stage, "split_plan.parquet")
        assigned.select("_file", "_row", "split").collect().write_parquet(path)
        out.update(by=by, seed=seed, plan_file=path)
    return out


def _temporal_column(schema: dict) -> str:
    """The column a temporal split cuts on (`ts`, else the schema's first order_by), which every row must have."""
    ts = "ts" if "ts" in schema["columns"] else (schema.get("order_by") or [None])[0]
    if ts is None:
        raise UserError("split=temporal needs a `ts` column (or schema.order_by) to cut on")
    if not (schema["columns"].get(ts) or {}).get("required"):
        # a row without a time cannot be placed: it fell to train, after the cuts, without a word
        raise UserError(f"split=temporal cuts on {ts!r}, which the schema does not require: declare it "
                        f"`required: true` (rows without it are then quarantined as missing {ts})")
    return ts


def _split_expr(schema: dict, split: dict, decided: dict) -> pl.Expr | None:
    strategy = decided["strategy"]
    if strategy in ("none", None):
        return pl.lit("train")
    if strategy == "leave_one_out":
        return _leave_one_out(schema["key"], int(split.get("min_rows", 3)))
    if strategy == "temporal":
        col = pl.col(decided["column"])
        val_cut = pl.lit(decided["val_cut"]).str.to_datetime(time_unit="us", time_zone="UTC")
        test_cut = pl.lit(decided["test_cut"]).str.to_datetime(time_unit="us", time_zone="UTC")
        return pl.when(col > test_cut).then(pl.lit("test")).when(col > val_cut).then(pl.lit("val")).otherwise(pl.lit("train"))
    if strategy == "stratified":
        return None  # joined from the plan file
    if strategy == "given":  # a published split, carried by the data itself (a schema column)
        column = split.get("column", "split")
        if column not in schema["columns"]:
            raise UserError(f"split=given needs the split column {column!r} declared in the schema")
        return pl.col(column)
    raise UserError(f"unknown split strategy {strategy!r}: use leave_one_out, temporal, stratified, given or none")


def _leave_one_out(key: str, min_rows: int) -> pl.Expr:
    """Last row of a key -> test, second-last -> val, when the key has >= min_rows rows; the frame is sorted by key.

    Neighbour comparisons on the sorted frame instead of window functions (`over`): a key's run of rows is
    contiguous, so row i is its key's last when row i+1 has another key, and the key has >= m rows ending at the
    last row when row i-(m-1) still has the same key."""
    k = pl.col(key)

    def same(offset: int) -> pl.Expr:  # does the row `offset` rows away (negative: ahead) belong to the same key?
        if offset == 0:
            return pl.lit(True)
        i = pl.int_range(pl.len())
        inside = i >= offset if offset > 0 else i < pl.len() + offset  # a null key must not match a missing row
        return inside & k.eq_missing(k.shift(offset))

    last = ~same(-1)
    second_last = same(-1) & ~same(-2)
    return (pl.when(last & same(max(min_rows - 1, 0))).then(pl.lit("test"))
              .when(second_last & same(max(min_rows - 2, 0))).then(pl.lit("val")).otherwise(pl.lit("train")))


# ----------------------------------------------------------------------------------------------- pass 2
def _sorted(df: pl.DataFrame, schema: dict) -> pl.DataFrame:
    """`df` sorted by `schema.sort_columns`. Rows read in source order (file, then row: how pass 1 stages them) need
    only a stable sort on the leading columns, which is cheaper and gives the same order; anything else is sorted
    on every column."""
    keys = S.sort_columns(schema)
    head = keys[:-2]  # [key, *order_by]; the tail is ["_file", "_row"]
    if df.height > 1:
        f, r = pl.col("_file"), pl.col("_row")
        in_order = df.select(((f > f.shift(1)) | ((f == f.shift(1)) & (r > r.shift(1)))).slice(1).all()).item()
        if in_order:
            if not head:
                return df
            key = schema.get("key")
            if head[0] == key and len(head) <= 2:
                return _stable_by_key(df, key, head[1:])
            return df.sort(head, maintain_order=True)
    return df.sort(keys)


def _stable_by_key(df: pl.DataFrame, key: str, order_by: list[str]) -> pl.DataFrame:
    """`df.sort([key, *order_by], maintain_order=True)` for rows in source order and at most one `order_by` column,
    the same frame, faster when (as in most logs) each key's rows already come in time order.

    Sorting on one integer column is several times quicker than on a text column and a timestamp (Polars
    encodes multi-column keys row by row): a text key is ranked through an Enum whose categories are its sorted
    distinct values, so the rank orders as the text does. Then the frame is stable-sorted on the rank alone and
    kept if every key's `order_by` values are already in order (nulls first, as `sort` puts them); otherwise (and
    for a float `order_by`) it is sorted on the rank and `order_by` (`benchmarks/README.md#prepare`)."""
    k = pl.col(key)
    if df.schema[key] == pl.Utf8:
        k = k.cast(pl.Enum(df.get_column(key).drop_nulls().unique().sort())).to_physical()
    if order_by and df.schema[order_by[0]].is_float():   # NaN and -0.0: leave float comparisons to the sort
        return df.sort([k, *order_by], maintain_order=True)
    by_key = df.sort(k, maintain_order=True)
    if not order_by:
        return by_key
    t, same_key = pl.col(order_by[0]), pl.col(key).eq_missing(pl.col(key).shift(1))
    step_ok = ~same_key | t.shift(1).is_null() | (t >= t.shift(1))   # null: a null after a value, out of order
    if by_key.select(step_ok.fill_null(False).slice(1).all()).item():
        return by_key
    return df.sort([k, *order_by], maintain_order=True)


def _as_text(df: pl.DataFrame, schema: dict) -> pl.DataFrame:
    """Quarantine rows with every data column as text: the raw value where it failed to parse; and
    `_record_text`, a broken record's source text (null for the others)."""
    cols = []
    for name in schema["columns"]:
        raw = S.RAW_PREFIX + name
        text = pl.col(name).cast(pl.Utf8)
        cols.append((pl.coalesce(pl.col(raw), text) if raw in df.columns else text).alias(name))
    record = pl.col(S.RECORD_TEXT) if S.RECORD_TEXT in df.columns else pl.lit(None, dtype=pl.Utf8).alias(S.RECORD_TEXT)
    return df.select("_file", "_row", *cols, pl.col("reason"), record)


def _first_distinct(df: pl.DataFrame, cols: list[str], prefix: list[str]) -> pl.Series:
    """Exact first-occurrence mask over `cols` of a frame sorted by `prefix` (a subset of `cols`), then position.

    Exact duplicates agree on the prefix, so in this order they sit in one run of equal prefixes: only rows whose
    prefix equals a neighbour's can repeat an earlier row, and only they are compared exactly."""
    if df.height == 0:
        return pl.Series([], dtype=pl.Boolean)
    same_as_previous = pl.all_horizontal([pl.col(c).eq_missing(pl.col(c).shift(1)) for c in prefix])
    in_run = (same_as_previous | same_as_previous.shift(-1)).fill_null(False)
    candidate = df.select(in_run).to_series()
    mask = pl.Series([True] * df.height)
    if candidate.any():
        idx = candidate.arg_true()
        sub = df[idx].select(pl.struct(cols).is_first_distinct()).to_series()
        mask = mask.scatter(idx, sub)
    return mask


def finalize_shard(s: int, stage: str, out: str, schema: dict, split: dict, decided: dict, dedup: str,
                   compression: str) -> dict:
    """Pass 2 for shard s: dedup, sort, split, write. Returns its counts."""
    files = _bucket_files(stage, s)
    data_cols = list(schema["columns"])
    shard_file = os.path.join("shards", f"part-{s:05d}.parquet")
    if files:
        df = _sorted(_scan_staged(files).select("_file", "_row", *data_cols).collect(), schema)
    else:  # an empty shard still has the schema, so readers see every column
        df = pl.DataFrame(schema={"_file": pl.Int32, "_row": pl.Int64,
                                  **{c: S.TYPES[spec.get("type", "str")] for c, spec in schema["columns"].items()}})
    quarantined = None
    row_keyed = schema.get("key") in (None, S.ROW_KEY)
    if row_keyed:
        duplicates = 0  # counted globally in plan()
        if decided.get("duplicates_file"):
            dup_keys = pl.read_parquet(decided["duplicates_file"])
            quarantined = df.join(dup_keys, on=["_file", "_row"], how="semi")
            df = df.join(dup_keys, on=["_file", "_row"], how="anti")
    else:
        first = _first_distinct(df, data_cols, [c for c in S.sort_columns(schema) if c in data_cols])
        duplicates = int((~first).sum())
        if dedup == "quarantine" and duplicates:
            quarantined = df.filter(~first)
            df = df.filter(first)
    expr = pl.lit(None, dtype=pl.Utf8) if decided.get("no_rows") else _split_expr(schema, split, decided)
    if expr is None:
        df = df.join(pl.read_parquet(decided["plan_file"]), on=["_file", "_row"], how="left", maintain_order="left")
    else:
        df = df.with_columns(expr.alias("split"))
    df.write_parquet(os.path.join(out, shard_file), compression=compression, statistics=True)
    result = {"file": shard_file, "rows": df.height, "duplicates": duplicates,
              "splits": {k: int(v) for k, v in df.group_by("split").len().iter_rows()} if df.height else {}}
    if quarantined is not None and quarantined.height:
        qfile = os.path.join(stage, f"dups-{s:05d}.parquet")
        _as_text(quarantined.with_columns(reason=pl.lit("exact duplicate")), schema).write_parquet(qfile)
        result["quarantined"] = quarantined.height
    return result


# ----------------------------------------------------------------------------------------------- driver
def _write_quarantine(stage: str, out: str, schema: dict, sources: list[str]) -> tuple[int, dict[str, int]]:
    parts = []
    bad = _bucket_files(stage, QUARANTINE_BUCKET)
    if bad:  # file by file: sources differ in their raw-text columns (a typed Parquet source has none)
        parts.append(_as_text(pl.concat([pl.read_parquet(f) for f in bad], how="diagonal_relaxed"), schema))
    dups = sorted(glob.glob(os.path.join(stage, "dups-*.parquet")))
    if dups:
        parts.append(pl.read_parquet(dups))
    path = os.path.join(out, "quarantine.parquet")
    if parts:
        q = pl.concat(parts, how="vertical").sort("_file", "_row")
    else:
        q = pl.DataFrame(schema={"_file": pl.Int32, "_row": pl.Int64, **{c: pl.Utf8 for c in schema["columns"]},
                                 "reason": pl.Utf8, S.RECORD_TEXT: pl.Utf8})
    q = q.with_columns(source=pl.col("_file").replace_strict(dict(enumerate(sources)), return_dtype=pl.Utf8)
                       if q.height else pl.lit(None, dtype=pl.Utf8))
    q.write_parquet(path, compression="zstd")
    reasons = {k: int(v) for k, v in q.group_by("reason").len().sort("len", descending=True).iter_rows()}
    return q.height, reasons


def _run_engine(engine: str, fn, calls: list[tuple], num_cpus: int | None, dashboard: bool | None = None,
                progress: Any = None) -> list[dict]:
    """`[fn(*c) for c in calls]`, in a loop (`polars`) or as Ray tasks (`ray`); `progress(done, result)` is called
    as each call finishes (in completion order under Ray), the results come back in call order."""
    if engine not in ("polars", "ray"):
        raise UserError(f"unknown prepare.engine {engine!r}: use polars or ray")
    if engine == "polars":
        results = []
        for c in calls:
            results.append(fn(*c))
            if progress:
                progress(len(results), results[-1])
        return results
    import ray

    from ecomray.runtime import init_ray

    init_ray(num_cpus=num_cpus, dashboard=dashboard)
    remote = ray.remote(num_cpus=1)(fn)
    refs = [remote.remote(*c) for c in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            results[index[ready[0]]] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:   # a task's UserError: its own line, not Ray's traceback
            found = user_error_in(err)
            if found is not None:
                raise found from None
            raise
        if progress:
            progress(len(refs) - len(pending), results[index[ready[0]]])
    return results


class _Progress:
    """One line per finished unit of work, at most every `every_s` seconds (and always the last), so a 100M-row
    prepare shows it is moving without printing hundreds of lines."""

    def __init__(self, t0: float, total: int, what: str, every_s: float = 5.0) -> None:
        self.t0, self.total, self.what, self.every_s = t0, total, what, every_s
        self.last = time.time()

    def __call__(self, done: int, result: dict) -> None:
        now = time.time()
        if done == self.total or now - self.last >= self.every_s:
            self.last = now
            log(f"  {self.what} {done}/{self.total} ({now - self.t0:.1f}s)")


def _adapter_entry(dataset: dict, paths: dict, entry: str, *args: Any) -> Callable | None:
    """An optional adapter entry (`exact_source`, `group_source`) bound to this dataset, or None."""
    fn = getattr(load_adapter(dataset.get("adapter", "files")), entry, None)
    return functools.partial(fn, dataset, paths, *args) if fn is not None else None


def _exact_reader(dataset: dict, paths: dict, i: int, stage: str) -> Callable[[], pl.LazyFrame] | None:
    """The adapter's record-by-record reader of source i (an optional `exact_source`), or None."""
    return _adapter_entry(dataset, paths, "exact_source", i, os.path.join(stage, "exact"))


def _stage_task(group: list[int], dataset: dict, paths: dict, schema: dict, shards: int, stage: str,
                ts_format: str) -> list[dict]:
    """Ray-side pass 1: rebuild the sources from the adapter (LazyFrames don't travel), then stage the group."""
    return stage_group(group, _sources(dataset, paths), schema, shards, stage, ts_format,
                       lambda i: _exact_reader(dataset, paths, i, stage), _group_reader(dataset, paths))


def _group_reader(dataset: dict, paths: dict) -> Callable[[list[int]], pl.LazyFrame | None] | None:
    """The adapter's reader of several sources as one scan (an optional `group_source`), or None."""
    return _adapter_entry(dataset, paths, "group_source")


def run(cfg: dict, if_missing: bool = False) -> dict:
    """Prepare `cfg["dataset"]` into `<paths.data>/<dataset.name>` (`shards.dataset_dir`); returns the manifest.

    One prepare of a dataset folder at a time (a lock file beside it; a second run waits for the first). Under the
    lock, the work folders of killed runs (`.<name>.tmp-*`: a SIGKILL skips every cleanup) are removed.
    `if_missing`: a dataset that is already prepared (perhaps by the run this one waited for) is returned as it is."""
    t0 = time.time()
    dataset, paths, opts = cfg["dataset"], cfg["paths"], cfg["prepare"]
    schema = dict(dataset["schema"])
    split_cfg = dataset.get("split") or {}
    given = schema.get("columns", {}).get(split_cfg.get("column", "split")) if split_cfg.get("strategy") == "given" \
        else None
    if given is not None and not given.get("allowed"):
        # a published split's values are train, val or test: any other (valid, dev, null) was dropped by every
        # task without a word; now it is quarantined (unknown / missing split) and counted
        schema["columns"] = {**schema["columns"], split_cfg.get("column", "split"):
                             {**given, "required": True, "allowed": ["train", "val", "test"]}}
    S.check_schema(schema)
    shards, engine, compression = int(opts.get("shards", 8)), opts.get("engine", "polars"), opts.get("compression", "zstd")
    if shards < 1:
        raise UserError(f"prepare.shards must be >= 1 (got {shards})")
    if engine not in ("polars", "ray"):
        raise UserError(f"unknown prepare.engine {engine!r}: use polars or ray")
    if (dataset.get("split") or {}).get("strategy") == "temporal":
        _temporal_column(schema)       # before pass 1, not after it
    if dataset.get("dedup", "quarantine") not in ("quarantine", "keep"):   # "drop" kept every duplicate, silently
        raise UserError(f"dataset.dedup={dataset.get('dedup')!r}: use quarantine (exact duplicates go to the "
                        f"quarantine file) or keep")
    final = dataset_dir(cfg)
    if is_uri(final):
        local_root, lock = None, contextlib.nullcontext()   # a local scratch folder, made when the run starts
    else:
        local_root = os.path.dirname(final)
        try:
            os.makedirs(local_root, exist_ok=True)
        except OSError as err:
            raise UserError(f"paths.data: cannot create {local_root} ({err.strerror})") from None
        lock = one_at_a_time(os.path.join(local_root, f".{os.path.basename(final)}.lock"),
                             f"prepare of {os.path.basename(final)}", log)
    with lock:
        if has_manifest(final):
            if if_missing:   # another run prepared it while this one waited for the lock
                return load_manifest(final)
            if not cfg.get("overwrite", False):
                raise UserError(f"{final} already holds a prepared dataset; pass overwrite=true to replace it "
                                f"or paths.data=<another folder>")
        if not is_uri(final):
            _remove_leftovers(local_root, os.path.basename(final))
        return _run_locked(cfg, dataset, paths, opts, schema, shards, engine, compression, final, local_root, t0)


def _run_locked(cfg: dict, dataset: dict, paths: dict, opts: dict, schema: dict, shards: int, engine: str,
                compression: str, final: str, local_root: str | None, t0: float) -> dict:
    ts_format = dataset.get("ts_format", "auto")
    if dataset.get("path") not in (None, "???"):   # resolved here, once: Ray tasks may run from another folder
        dataset = {**dataset, "path": dataset_path(dataset, paths)}
    local_root = local_root or tempfile.mkdtemp(prefix="ecomray-prepare-")
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=local_root)
    out, stage = os.path.join(work, "out"), os.path.join(work, "stage")
    os.makedirs(os.path.join(out, "shards"))
    try:
        srcs = _sources(dataset, paths)
        names = [s for s, _ in srcs]
        log(f"{dataset['name']}: {len(srcs)} source file(s), schema {schema['name']}, {shards} shards, engine {engine}")
        groups = source_groups(names, int(opts.get("group_bytes") or GROUP_BYTES))
        if engine == "ray":
            staged = [r for rs in _run_engine(engine, _stage_task, [(g, dataset, paths, schema, shards, stage, ts_format)
                                                                    for g in groups], opts.get("ray_num_cpus"),
                                              opts.get("ray_include_dashboard"),
                                              _Progress(t0, len(groups), "validated source groups"))
                      for r in rs]
        else:
            staged = []
            for g in groups:
                done = stage_group(g, srcs, schema, shards, stage, ts_format,
                                   lambda i: _exact_reader(dataset, paths, i, stage), _group_reader(dataset, paths))
                staged.extend(done)
                what = names[g[0]] if len(g) == 1 else f"{len(g)} files ({names[g[0]]} .. {names[g[-1]]})"
                log(f"  validated {what}: {sum(r['rows_in'] for r in done):,} rows ({time.time() - t0:.1f}s)")
        rows_in = sum(s["rows_in"] for s in staged)
        if rows_in == 0:
            raise UserError(f"{dataset['name']}: the input has no rows ({', '.join(names)})")
        decided = plan(stage, schema, dataset.get("split") or {"strategy": "none"}, dataset.get("dedup", "quarantine"), shards)
        calls = [(s, stage, out, schema, dataset.get("split") or {}, decided, dataset.get("dedup", "quarantine"), compression)
                 for s in range(shards)]
        finished = _run_engine(engine, finalize_shard, calls, opts.get("ray_num_cpus"), opts.get("ray_include_dashboard"),
                               _Progress(t0, shards, "sorted, split and wrote shards"))
        n_quarantined, reasons = _write_quarantine(stage, out, schema, names)
        rows_out = sum(f["rows"] for f in finished)
        if rows_in != rows_out + n_quarantined:
            raise RuntimeError(f"row accounting broke: in {rows_in} != out {rows_out} + quarantined {n_quarantined}")
        if rows_out == 0:
            _refuse_empty(dataset["name"], rows_in, reasons, out, final, local_root)
        splits: dict[str, int] = {}
        for f in finished:
            for k, v in f["splits"].items():
                splits[k] = splits.get(k, 0) + v
        duplicates = decided.get("duplicates", sum(f["duplicates"] for f in finished))
        adapter = load_adapter(dataset.get("adapter", "files"))
        manifest: dict[str, Any] = {
            "dataset": dataset["name"], "adapter": dataset.get("adapter", "files"), "engine": engine,
            "rows_in": rows_in, "rows_out": rows_out, "rows_quarantined": n_quarantined, "reasons": reasons,
            "duplicates": {"found": duplicates, "policy": dataset.get("dedup", "quarantine")},
            "schema": schema, "split": {**(dataset.get("split") or {}), **{k: v for k, v in decided.items()
                                                                          if k not in ("plan_file", "duplicates_file")},
                                        "rows": splits},
            "shards": [{"file": f["file"], "rows": f["rows"], "bytes": os.path.getsize(os.path.join(out, f["file"]))}
                       for f in finished],
            "quarantine": "quarantine.parquet",
            # what a file was when it was read: the hash then changes when a source is edited in place
            "sources": [{"path": s["source"], "rows": s["rows_in"], **_file_stat(s["source"])} for s in staged],
            # the settings that decide how the sources are read (columns, csv, ts_format, synthetic, ...)
            "dataset_options": {k: v for k, v in dataset.items() if k not in NOT_DATA_OPTIONS},
            "licence": dataset.get("licence", "unknown"), "research_only": bool(dataset.get("research_only", False)),
            # class names of a labelled dataset, so later jobs (opinion, training) need not be told them again
            "label_names": {str(k): str(v) for k, v in (dataset.get("label_names") or {}).items()} or None,
            "ecomray_version": ecomray.__version__,
        }
        if hasattr(adapter, "extra_manifest"):
            manifest.update(adapter.extra_manifest(dataset, paths))
        manifest["hash"] = manifest_hash(manifest)
        manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(os.path.join(out, "manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=2, default=str)
        _publish(out, final, work)
        if not is_uri(final):   # an earlier run's rejected rows (`_refuse_empty`): this run's quarantine replaces them
            with contextlib.suppress(FileNotFoundError):
                os.remove(_rejected_path(local_root, final))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if is_uri(final):
            shutil.rmtree(local_root, ignore_errors=True)
    print_summary(manifest, final, time.time() - t0)
    return manifest


def _rejected_path(local_root: str, final: str) -> str:
    return os.path.join(local_root, f"{os.path.basename(final)}.rejected-quarantine.parquet")


def _refuse_empty(name: str, rows_in: int, reasons: dict[str, int], out: str, final: str, local_root: str) -> None:
    """Every row was quarantined: publish nothing (a dataset prepared before stays as it was, so an `overwrite=true`
    with a wrong `ts_format` cannot swap good shards for none), keep the quarantine beside it, and say why."""
    kept = None
    if not is_uri(final):
        kept = _rejected_path(local_root, final)
        os.replace(os.path.join(out, "quarantine.parquet"), kept)
    top = ", ".join(f"{r!r} x {n:,}" for r, n in list(reasons.items())[:3])
    before = f"{final} is unchanged" if has_manifest(final) else "nothing was published"
    raise UserError(f"{name}: all {rows_in:,} rows were quarantined ({top}{', ...' if len(reasons) > 3 else ''}); "
                    f"{before}" + (f"; every row and its reason: {kept}" if kept else "")
                    + "; check dataset.path, dataset.columns and dataset.ts_format against the data")


# ----------------------------------------------------------------------------------------------- one run at a time
def _remove_leftovers(local_root: str, name: str) -> None:
    """Work folders of earlier runs of this dataset that were killed before their cleanup ran. Only called under
    the dataset's lock, so none of them belongs to a live run."""
    for d in sorted(glob.glob(os.path.join(local_root, f".{name}.tmp-*"))):
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
        shutil.rmtree(d, ignore_errors=True)
        log(f"removed {d}: left by a killed run ({size / 1e6:,.1f} MB)")



# dataset settings that change no row (the others are in the manifest and its hash: `dataset_options`)
# (the schema is in the manifest itself, as prepare completed it)
NOT_DATA_OPTIONS = frozenset({"name", "licence", "research_only", "label_names", "schema", "description"})


def _file_stat(path: str) -> dict[str, int]:
    """A local source file's size and modification time (ns); nothing for a URI or a folder."""
    if is_uri(path) or not os.path.isfile(path):
        return {}
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def manifest_hash(manifest: dict) -> str:
    import hashlib

    body = {k: v for k, v in manifest.items() if k not in ("hash", "created_at")}
    # the rows, not their encoding: a shard's size changes with the Polars version or prepare.compression
    body["shards"] = [{k: v for k, v in sh.items() if k != "bytes"} for sh in body.get("shards", [])]
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _publish(out: str, final: str, work: str) -> None:
    """Swap the finished folder in whole: readers never see a mix of two runs."""
    if is_uri(final):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(final)
        fs.delete_dir_contents(root, missing_dir_ok=True)
        pafs.copy_files(out, final)
        return
    old = None
    if os.path.exists(final):
        old = os.path.join(work, "previous")
        os.rename(final, old)
    os.rename(out, final)


def split_warnings(split: dict) -> list[str]:
    """A val or test split far smaller than its fraction asks for (most often empty): each stratum's share is
    rounded on its own, so strata of a few rows (`split.by` over many values) give none to val and test."""
    rows = split.get("rows") or {}
    total = sum(rows.values())
    out = []
    for name in ("val", "test"):
        frac = split.get(f"{name}_fraction")
        if not isinstance(frac, (int, float)) or split.get("strategy") not in ("stratified", "temporal") \
                or split.get(f"{name}_cut") is not None:       # a cut given as a time: the fraction is not used
            continue
        want = total * float(frac)
        if want >= 1 and rows.get(name, 0) < want / 2:
            why = (f": each stratum of split.by={split.get('by')} is rounded on its own, and they are too small; "
                   f"stratify on fewer columns" if split.get("strategy") == "stratified" and split.get("by") else "")
            out.append(f"split {name} has {rows.get(name, 0):,} rows, where {name}_fraction={frac} asks for about "
                       f"{want:,.0f}{why}")
    return out


def print_summary(m: dict, where: str, seconds: float) -> None:
    lines = [f"prepared {m['dataset']} -> {where}  ({seconds:.1f}s)",
             f"  rows in {m['rows_in']:>12,}", f"  rows out {m['rows_out']:>11,}",
             f"  quarantined {m['rows_quarantined']:>8,}"]
    for reason, n in m["reasons"].items():
        lines.append(f"    {reason:<28} {n:>10,}")
    lines.append(f"  duplicates found {m['duplicates']['found']:,} (policy: {m['duplicates']['policy']})")
    lines.append("  split " + ", ".join(f"{k} {v:,}" for k, v in sorted(m["split"].get("rows", {}).items())))
    lines += [f"  WARNING: {w}" for w in split_warnings(m["split"])]
    lines.append(f"  {len(m['shards'])} shards, rows per shard min {min(s['rows'] for s in m['shards']):,} "
                 f"max {max(s['rows'] for s in m['shards']):,}")
    print("\n".join(lines), file=sys.stdout, flush=True)
