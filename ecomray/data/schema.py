"""Schemas as data, and the pure Polars expressions that validate a table against one.

A schema is the plain dict of a `conf/schema/*.yaml` (possibly extended by the dataset config):

    {"name": "events", "key": "user_id", "order_by": ["ts"], "label": None,
     "columns": {"user_id": {"type": "str", "required": True}, "price": {"type": "float", "min": 0}, ...}}

Column types: str, int, float, bool, datetime (UTC, microseconds). Rules per column: required, allowed
(a list of values), min, max. `validate(lf, schema)` adds typed columns and a `reason` column that is
null for good rows and names the first broken rule otherwise. An adapter may flag rows itself with a `_reason`
text column (for example a review text that leaks an evaluation set); it applies when no schema rule broke.
Nothing here touches files or Ray, so the polars and ray engines (and tests) run the very same code.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import polars_hash  # noqa: F401  (registers the .nchash / .chash namespaces)

from ecomray.runtime import UserError

TYPES = {"str": pl.Utf8, "int": pl.Int64, "float": pl.Float64, "bool": pl.Boolean, "datetime": pl.Datetime("us", "UTC")}
RAW_PREFIX = "_raw_"
ADAPTER_REASON = "_reason"  # optional adapter column: a quarantine reason decided by the adapter
RECORD_ERROR = "_record_error"  # optional adapter column: the record itself is broken (a malformed CSV record), so
                                # no rule's verdict on its misaligned fields means anything: this reason wins
RECORD_TEXT = "_record_text"    # optional adapter column: a broken record's source text, kept in the quarantine
ROW_KEY = "_row_id"  # pseudo key: shard a table by source position
_TRUE = ["true", "1", "yes", "t", "y"]
_FALSE = ["false", "0", "no", "f", "n"]


def check_schema(schema: dict[str, Any]) -> None:
    """Fail early, with the column's name, on a schema the validator can't run."""
    cols = schema.get("columns") or {}
    if not cols:
        raise UserError(f"schema {schema.get('name')!r} declares no columns")
    for name, spec in cols.items():
        if spec.get("type", "str") not in TYPES:
            raise UserError(f"schema {schema.get('name')!r}, column {name!r}: unknown type {spec.get('type')!r}; "
                            f"use one of {sorted(TYPES)}")
    key = schema.get("key")
    if key not in (None, ROW_KEY) and key not in cols:
        raise UserError(f"schema {schema.get('name')!r}: key column {key!r} is not a declared column")
    label = schema.get("label")
    if label is not None and label not in cols:
        raise UserError(f"schema {schema.get('name')!r}: label column {label!r} is not a declared column")


TS_FORMATS = {  # name -> parser of a stripped string column
    "iso": lambda t: t.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us", strict=False).dt.replace_time_zone("UTC"),
    "iso_space": lambda t: t.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us", strict=False).dt.replace_time_zone("UTC"),
    "iso_offset": lambda t: (t.str.replace(r"Z$", "+00:00").str.replace(" ", "T", literal=True)
                             .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="us", strict=False)
                             .dt.convert_time_zone("UTC")),
    "date": lambda t: t.str.to_datetime("%Y-%m-%d", time_unit="us", strict=False).dt.replace_time_zone("UTC"),
    # ISO-8601's basic forms (20260105, 20260105103000), common in exports, before `epoch`: as numbers they were
    # read as epoch seconds and microseconds (1970-08-23, 2612-01-07)
    "basic_date": lambda t: t.str.to_datetime("%Y%m%d", time_unit="us", strict=False).dt.replace_time_zone("UTC"),
    "basic": lambda t: t.str.to_datetime("%Y%m%d%H%M%S", time_unit="us", strict=False).dt.replace_time_zone("UTC"),
    "epoch": lambda t: _from_epoch(pl.when(t.str.contains(r"^-?\d+(\.\d+)?$")).then(t).cast(pl.Float64, strict=False)),
}


# Fixed-width layouts that Polars parses on a fast path, several times quicker than the general parser. A value
# that fits one exactly parses to the same instant as under the general format (tests/test_prepare.py fuzzes this);
# anything else (surrounding whitespace, another fraction length, garbage) falls through to the general parser.
FAST_TS_LAYOUTS = {"iso": ("%Y-%m-%dT%H:%M:%S.%6f", "%Y-%m-%dT%H:%M:%S"),
                   "iso_space": ("%Y-%m-%d %H:%M:%S.%6f", "%Y-%m-%d %H:%M:%S")}


def _fast_layout(text: pl.Expr, layout: str) -> pl.Expr:
    return text.str.to_datetime(layout, time_unit="us", strict=False, cache=False)  # values are ~unique: no cache


def detect_ts_format(sample: pl.Series) -> str:
    """The one format that parses every sampled value, else "mixed" (every format tried on every row)."""
    return detect_ts_formats(pl.DataFrame({"g": [0] * sample.len(), "t": sample.cast(pl.Utf8)}), "g", "t").get(0, "mixed")


def detect_ts_formats(sample: pl.DataFrame, by: str, col: str) -> dict[Any, str]:
    """`detect_ts_format` for each `by` group of `sample` at once: per group, the first format that parses every
    non-empty value, else "mixed" (also when a group has no value at all)."""
    t = pl.col(col).cast(pl.Utf8).str.strip_chars()
    values = sample.select(by, t.alias("t")).filter(pl.col("t").is_not_null() & (pl.col("t") != ""))
    found = {k: "mixed" for k in sample.get_column(by).unique().to_list()}
    ok = values.group_by(by).agg(**{f"ok_{n}": parse(pl.col("t")).is_not_null().all() for n, parse in TS_FORMATS.items()})
    for row in ok.iter_rows(named=True):
        found[row[by]] = next((n for n in TS_FORMATS if row[f"ok_{n}"]), "mixed")
    return found


def detect_fast_layout(sample: pl.Series, fmt: str) -> str | None:
    """The fixed-width layout of format `fmt` that every sampled (non-empty) value fits as it is, if any."""
    s = sample.drop_nulls().cast(pl.Utf8)
    frame = s.filter(s != "").to_frame("t")
    for layout in FAST_TS_LAYOUTS.get(fmt, ()):
        if frame.height and frame.select(_fast_layout(pl.col("t"), layout).is_not_null().all()).item():
            return layout
    return None


def _parse_datetime(raw: pl.Expr, dtype: pl.DataType, fmt: str = "mixed", layout: str | None = None) -> pl.Expr:
    """ISO-8601 (naive means UTC, offsets converted) or an epoch number (seconds, ms, us or ns, by magnitude:
    `EPOCH_UNIT_BOUNDS`) -> Datetime(us, UTC).

    Text is parsed with one detected format per source (fast), or with every format in turn ("mixed"). With a
    fixed-width `layout` (`detect_fast_layout`), the values that fit it take the fast path and only the others
    reach the general format, stripped of surrounding whitespace: the result is the general format's on every value.
    A value that the chosen format can't parse is quarantined as "unparseable ts", never dropped.
    """
    if dtype == pl.Datetime or isinstance(dtype, pl.Datetime):
        tz = getattr(dtype, "time_zone", None)
        out = raw.cast(pl.Datetime("us", tz))
        return out.dt.replace_time_zone("UTC") if tz is None else out.dt.convert_time_zone("UTC")
    if dtype == pl.Date:
        return raw.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_numeric():
        return _from_epoch(raw.cast(pl.Float64))
    text = raw.cast(pl.Utf8)
    if layout is None:
        return _parse_text(text.str.strip_chars(), fmt)
    fast = _fast_layout(text, layout)
    rest = pl.when(fast.is_null()).then(text).str.strip_chars()  # null where the fast path hit: nothing to parse
    return pl.coalesce(fast.dt.replace_time_zone("UTC"), _parse_text(rest, fmt))


def _parse_text(s: pl.Expr, fmt: str) -> pl.Expr:
    """Stripped text -> Datetime(us, UTC) in `fmt`: a TS_FORMATS name, "mixed" or an explicit strftime format."""
    if fmt in TS_FORMATS:
        return TS_FORMATS[fmt](s)
    if fmt != "mixed":
        return s.str.to_datetime(fmt, time_unit="us", time_zone="UTC", strict=False)  # an explicit strftime format
    return pl.coalesce(*(parse(s) for parse in TS_FORMATS.values()))


# Epoch numbers in seconds, milliseconds, microseconds or nanoseconds, told apart by magnitude: seconds below 1e11
# (up to the year 5138), milliseconds below 1e14, microseconds below 1e17, nanoseconds above. Exports in
# milliseconds (JavaScript, Kafka, many trackers) were read as seconds, 1000x too far: the year 55969.
EPOCH_UNIT_BOUNDS = ((1e11, 1e6), (1e14, 1e3), (1e17, 1.0))   # (|value| below, microseconds per unit)


def _from_epoch(value: pl.Expr) -> pl.Expr:
    """An epoch number (any of the units of `EPOCH_UNIT_BOUNDS`) -> Datetime(us, UTC)."""
    size = value.abs()
    micros = pl.when(size < EPOCH_UNIT_BOUNDS[0][0]).then(value * EPOCH_UNIT_BOUNDS[0][1])
    for bound, scale in EPOCH_UNIT_BOUNDS[1:]:
        micros = micros.when(size < bound).then(value * scale)
    micros = micros.otherwise(value / 1e3)                          # nanoseconds
    return pl.from_epoch(micros.round(0).cast(pl.Int64, strict=False), time_unit="us").dt.replace_time_zone("UTC")


def _parse(raw: pl.Expr, kind: str, dtype: pl.DataType, ts_format: str = "mixed", layout: str | None = None) -> pl.Expr:
    if kind == "datetime":
        return _parse_datetime(raw, dtype, ts_format, layout)
    if kind == "bool":
        if dtype == pl.Boolean:
            return raw
        low = raw.cast(pl.Utf8).str.strip_chars().str.to_lowercase()
        return pl.when(low.is_in(_TRUE)).then(True).when(low.is_in(_FALSE)).then(False).otherwise(None)
    if kind == "str":
        s = raw.cast(pl.Utf8)
        if dtype == pl.Float64:   # a typed 12345.0 is the text "12345", as the record-by-record JSON reader spells it
            whole = (raw == raw.round(0)) & (raw.abs() < 2.0**53)
            s = pl.when(whole).then(raw.cast(pl.Int64, strict=False).cast(pl.Utf8)).otherwise(s)
        return pl.when(s.str.len_bytes() == 0).then(None).otherwise(s)
    target = TYPES[kind]
    if dtype == pl.Boolean:    # JSON's true is not the number 1: unparseable, as its text "true" is
        return pl.lit(None, dtype=target)
    if dtype == pl.Utf8:
        return raw.str.strip_chars().cast(target, strict=False)
    if kind == "int" and dtype.is_float():  # a typed 1.5 would truncate to 1: only integral values are integers
        return pl.when(raw == raw.round(0)).then(raw.cast(target, strict=False))
    return raw.cast(target, strict=False)


def json_text(col: pl.Expr) -> pl.Expr:
    """A nested value (a Struct or List column of JSON objects or arrays) as its compact JSON text."""
    encoded = pl.struct(col.alias("v")).struct.json_encode()     # {"v":<value>}
    return pl.when(col.is_null()).then(None).otherwise(encoded.str.slice(5, encoded.str.len_chars() - 6))


def text_datetime_columns(lf: pl.LazyFrame, schema: dict[str, Any]) -> list[str]:
    """The schema's datetime columns that `lf` holds as text (each parsed with a format detected per source)."""
    present = lf.collect_schema()
    return [n for n, spec in schema["columns"].items()
            if spec.get("type", "str") == "datetime" and n in present and present[n] == pl.Utf8]


def validate(lf: pl.LazyFrame, schema: dict[str, Any], source: str = "<input>", ts_format: str = "auto",
             ts_formats: dict[str, str] | None = None) -> pl.LazyFrame:
    """Typed columns + `reason` (null = good). Raw text of parsed columns is kept as `_raw_<col>` on bad rows.

    Missing optional columns are added as nulls; a missing required column is a whole-input error.

    `ts_formats` (column -> format): formats decided beforehand, for rows of several files validated together
    (prepare's source groups) in which `detect_ts_formats` found the same format.

    Three steps, so that every value is parsed once however many rules read it (Polars' common-subexpression
    elimination does not reach inside the nested when/then of the rule chain): parse each column into a
    temporary `__v_<col>`, compute `reason` from those and the raw text, then select the output columns.
    """
    cols: dict[str, dict[str, Any]] = schema["columns"]
    present = lf.collect_schema()
    missing = [c for c, spec in cols.items() if spec.get("required") and c not in present]
    if missing:
        found = [c for c in present if c not in ("_file", "_row", ADAPTER_REASON, RECORD_ERROR, RECORD_TEXT)
                 and not c.startswith("__ecomray")]   # (prepare's bookkeeping, not the source's columns)
        raise UserError(f"{source}: required column(s) {missing} missing (found {found}); "
                        f"map them with dataset.columns={{source_name: canonical_name}}")
    nested = {n: present[n] for n in cols if n in present and isinstance(present[n], (pl.Struct, pl.List, pl.Array))}
    if nested:   # a typed source's column of lists or structs (JSONL's are text by now: `files._nested_as_text`)
        raise UserError(f"{source}: column(s) {', '.join(f'{n} ({t})' for n, t in nested.items())} hold nested "
                        f"values (lists or structs), which no schema column takes; flatten them, or map another "
                        f"column with dataset.columns={{source_name: canonical_name}}")
    parsed, typed, rules, raws = [], [], [], []
    for name, spec in cols.items():
        kind = spec.get("type", "str")
        if name not in present:
            typed.append(pl.lit(None, dtype=TYPES[kind]).alias(name))
            continue
        dtype = present[name]
        raw = pl.col(name)
        fmt, layout = ts_format, None
        if kind == "datetime" and dtype == pl.Utf8:  # detect once per source, from its first 1,000 values
            sample = lf.select(pl.col(name)).head(1000).collect().to_series()
            if ts_formats and name in ts_formats:
                fmt = ts_formats[name]
            else:
                fmt = detect_ts_format(sample) if ts_format == "auto" else ts_format
            layout = detect_fast_layout(sample, fmt)   # a fast path only: any value it misses takes the general one
        tmp = "__v_" + name
        parsed.append(_parse(raw, kind, dtype, fmt, layout).alias(tmp))
        value = pl.col(tmp)
        typed.append(value.alias(name))
        raw_missing = raw.is_null() | (raw.str.len_bytes() == 0) if dtype == pl.Utf8 else raw.is_null()
        if spec.get("required"):
            rules.append((raw_missing, f"missing {name}"))
        if kind != "str" and dtype != TYPES[kind]:
            rules.append((~raw_missing & value.is_null(), f"unparseable {name}"))
            raws.append(name)
        if kind == "float":  # "nan", "inf" and 1e400 parse, but no feature or metric can use them
            rules.append((value.is_nan() | value.is_infinite(), f"non-finite {name}"))
        if spec.get("allowed") is not None:
            rules.append((value.is_not_null() & ~value.is_in(list(spec["allowed"])), f"unknown {name}"))
        if spec.get("min") is not None:
            rules.append((value < spec["min"], f"{name} < {spec['min']}"))
        if spec.get("max") is not None:
            rules.append((value > spec["max"], f"{name} > {spec['max']}"))
    reason: Any = pl.col(ADAPTER_REASON).cast(pl.Utf8) if ADAPTER_REASON in present else pl.lit(None, dtype=pl.Utf8)
    for cond, text in reversed(rules):  # first broken rule wins
        reason = pl.when(cond.fill_null(False)).then(pl.lit(text)).otherwise(reason)
    if RECORD_ERROR in present:
        reason = pl.coalesce(pl.col(RECORD_ERROR).cast(pl.Utf8), reason)
    bad = pl.col("reason").is_not_null()
    keep_raw = [pl.when(bad).then(pl.col(n).cast(pl.Utf8)).alias(RAW_PREFIX + n) for n in raws]
    if RECORD_TEXT in present:
        keep_raw.append(pl.when(bad).then(pl.col(RECORD_TEXT).cast(pl.Utf8)).alias(RECORD_TEXT))
    passthrough = [c for c in ("_file", "_row") if c in present]
    return (lf.with_columns(parsed).with_columns(reason.alias("reason"))
              .select(*passthrough, *keep_raw, *typed, "reason"))


def shard_of(schema: dict[str, Any], shards: int) -> pl.Expr:
    """Stable shard id: xxhash64 of the key (as UTF-8 text) modulo `shards`. Never Polars' own `hash`."""
    key = schema.get("key") or ROW_KEY
    text = (pl.col("_file").cast(pl.Utf8) + ":" + pl.col("_row").cast(pl.Utf8)) if key == ROW_KEY else pl.col(key).cast(pl.Utf8)
    return (text.nchash.xxhash64() % shards).cast(pl.Int32)


def sort_columns(schema: dict[str, Any]) -> list[str]:
    """Rows of one key in time order; ties broken by source position (file, then row)."""
    key = schema.get("key")
    head = [] if key in (None, ROW_KEY) else [key]
    return [*head, *schema.get("order_by", []), "_file", "_row"]
