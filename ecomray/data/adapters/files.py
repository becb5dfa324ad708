"""Generic reader: CSV, Parquet or JSONL files (CSV and JSONL also gzip-compressed) in a schema's columns (a file, a
folder or a glob). A folder may hold hive-style partition folders (`event=view/dt=2026-01-01/part-0.parquet`, as
Spark's `partitionBy` writes them): their `key=value` names become columns of the rows below them."""

from __future__ import annotations

import contextlib
import csv as csvlib
import errno
import glob
import gzip
import itertools
import json
import os
import re
from typing import Any
import zlib
from urllib.parse import unquote

import polars as pl

from ecomray.data import schema as S
from ecomray.data.adapters import dataset_path
from ecomray.runtime import UserError

FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
GZIP = ".gz"   # text formats may be gzip-compressed (events.csv.gz): Polars streams them, the exact readers too


def format_extension(path: str) -> str:
    """The format extension of a file name: `.csv` for `x.csv` and for `x.csv.gz`."""
    name = os.path.basename(path).lower()
    if name.endswith(GZIP):
        name = name[: -len(GZIP)]
    return os.path.splitext(name)[1]


def is_empty(path: str) -> bool:
    """No bytes at all, or (gzip) none once decompressed, or (JSONL) nothing but blank lines: no records."""
    if os.path.getsize(path) == 0:
        return True
    jsonl = FORMATS.get(format_extension(path)) == "jsonl"
    if not (jsonl or path.lower().endswith(GZIP)):
        return False
    with _open(path) as fh:
        if not jsonl:
            return not fh.read(1)
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _open(path: str, mode: str = "rb", **kwargs: Any):
    """A file, decompressed when it is gzip-compressed."""
    if path.lower().endswith(GZIP):
        import gzip

        return gzip.open(path, mode if "b" in mode else mode.replace("r", "rt"), **kwargs)
    return open(path, mode, **kwargs)


def list_files(path: str) -> list[str]:
    """Expand a file, a folder (its data files and those of its partition folders, sorted) or a glob into a sorted
    list of files."""
    if os.path.isdir(path):
        files = _folder_files(path)
    elif any(ch in path for ch in "*?["):
        # a folder the pattern matches is read as a folder; what lies in hidden folders below the pattern's fixed
        # part (`_temporary/`) and hidden files (`_SUCCESS`) are not data
        fixed = os.path.dirname(re.split(r"[*?\[]", path, maxsplit=1)[0])
        files = []
        for match in glob.glob(path, recursive=True):
            rel = os.path.relpath(match, fixed) if fixed else match
            if any(_hidden(part) for part in rel.split(os.sep) if part not in (".", "..")):
                continue
            files.extend(_folder_files(match) if os.path.isdir(match) else [match])
    else:
        if not os.path.exists(path):
            if os.path.islink(path):    # exists() follows the link: a dangling link or a loop of links
                raise UserError(f"input not found: {path} is a symbolic link to {os.readlink(path)!r}, which "
                                f"{'loops back on itself' if _link_loops(path) else 'does not exist'}")
            raise UserError(f"input not found: {path}")
        if not os.path.isfile(path):    # /dev/zero used to be "empty"; a FIFO cannot be read twice
            raise UserError(f"{path} is not a regular file (a device, FIFO or socket); ecomray reads files, "
                            f"folders and globs of them: copy the data into a file first")
        files = [path]
    # A file reached through links too is read once: under its real path if that was found, else the shortest
    # (its partition folders are those on that path). One order for a folder and any glob that finds the same
    # files: by path component, as the folder walk goes (as text, `a-b/x` would sort before `a/x`).
    best: dict[str, tuple] = {}
    for f in files:
        real = os.path.realpath(f)
        rank = (os.path.abspath(f) != real, len(f.split(os.sep)), f.split(os.sep))
        best[real] = min(best.get(real, (rank, f)), (rank, f))
    files = sorted((f for _, f in best.values()), key=lambda f: f.split(os.sep))
    if not files:
        raise UserError(f"no input files found at {path} (expected .csv, .parquet or .jsonl files, or hive-style "
                        f"partition folders such as dt=2026-01-01/ holding them)")
    return files


def _link_loops(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


# Column names prepare uses for its own bookkeeping: a source's own column of that name (a re-exported ecomray
# shard holds `_file` and `_row`) is dropped, never taken for prepare's.
INTERNAL = frozenset({"_file", "_row", "_bucket", S.ADAPTER_REASON, S.RECORD_ERROR, S.RECORD_TEXT})


def _internal(name: str) -> bool:
    return name in INTERNAL or name.startswith("__ecomray")


def _hidden(name: str) -> bool:
    """Names that are not data, as Spark skips them: `.crc` files, `_SUCCESS`, `_temporary/` (but `_k=v` is a
    partition)."""
    return name.startswith(".") or (name.startswith("_") and "=" not in name)


PARTITION = re.compile(r"^([^=]+)=(.*)$")     # a hive-style partition folder: key=value
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"       # how Hive and Spark name the folder of a null value


def _folder_files(folder: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """A folder's data files, and those of its hive-style partition folders (nested), in name order level by level.
    Hidden names are skipped (Spark's `_SUCCESS`, `.crc` files, `_temporary/`: `_hidden`), and so are folders
    that are not partitions: a folder of old files beside the data is not read. A link back to a folder above
    (`seen`) is not followed twice."""
    seen = seen | {os.path.realpath(folder)}
    out = []
    for name in sorted(os.listdir(folder)):
        if _hidden(name):
            continue
        full = os.path.join(folder, name)
        if os.path.isdir(full):
            if PARTITION.match(name) and os.path.realpath(full) not in seen:
                out.extend(_folder_files(full, seen))
        elif _known_format(name):
            out.append(full)
    return out


def partition_values(path: str) -> dict[str, str | None]:
    """The `key=value` folders on a file's path (values %-decoded, as Spark escapes them; Hive's default partition
    is null), outermost first: whether the input was the partitioned folder, a glob inside it or one of its files."""
    out: dict[str, str | None] = {}
    for part in os.path.dirname(os.path.abspath(path)).split(os.sep):
        m = PARTITION.match(part)
        if m:
            try:
                out[unquote(m[1], errors="strict")] = None if m[2] == HIVE_NULL else unquote(m[2], errors="strict")
            except UnicodeDecodeError:
                raise UserError(f"{path}: the partition folder {part!r} %-escapes bytes that are not UTF-8; "
                                f"ecomray never replaces bytes silently: rename the folder") from None
    return out


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in ("csv", "parquet", "jsonl"):
            raise UserError(f"unknown dataset.format {fmt!r}: use csv, parquet, jsonl or auto")
        return fmt
    if not _known_format(path):
        raise UserError(f"{path}: unknown file format {os.path.basename(path)!r}; set dataset.format=csv|parquet|jsonl "
                        f"(CSV and JSONL may be gzip-compressed: .csv.gz, .jsonl.gz)")
    return FORMATS[format_extension(path)]


def _known_format(name: str) -> bool:
    """A data file by its name: a known extension (CSV and JSONL also gzipped; never Parquet)."""
    ext = format_extension(name)
    return ext in FORMATS and not (FORMATS[ext] == "parquet" and name.lower().endswith(GZIP))


def scan_file(path: str, fmt: str, csv: dict[str, Any], columns: dict[str, str],
              partitions: dict[str, str | None] | None = None, needed: set[str] | None = None) -> pl.LazyFrame:
    """Lazily scan one file (with its `partitions`: `partition_values`); CSV values stay text so that validation,
    not the reader, judges them. `needed`: the source columns validation reads (`_needed`), so that a CSV with
    others is still read whole (`_canonical_names`)."""
    if is_empty(path):
        raise UserError(f"{path}: the file is empty")
    # a listed file is read as the file it is: a name with [, * or ? is not a pattern (glob=False)
    if fmt in ("csv", "jsonl"):
        _refuse_other_encodings(path)
    if fmt == "csv":
        _refuse_repeated_names(path, csv)
        lf = _scan_csv(path, csv)
    elif fmt == "parquet":
        lf = pl.scan_parquet(path, glob=False)
    else:
        lf = pl.scan_ndjson(glob.escape(path), infer_schema_length=None)   # (no glob=False for NDJSON)
    try:
        if fmt == "jsonl":
            lf = _nested_as_text(lf)
        return _canonical_names(lf, columns, partitions, needed=needed if fmt == "csv" else None)
    except pl.exceptions.PolarsError:  # JSONL schema inference reads every line: a broken one fails here. Stay
        return lf                      # lazy: prepare meets the error again and reads the file with exact_source


def _scan_csv(path: str | list[str], csv: dict[str, Any], **extra: Any) -> pl.LazyFrame:
    """A CSV scan with the dataset's `csv` options, every value as text; names are files, never patterns."""
    return pl.scan_csv(path, separator=csv.get("separator", ","), has_header=csv.get("has_header", True),
                       quote_char=csv.get("quote_char", '"'), infer_schema=False, encoding="utf8",
                       new_columns=csv.get("new_columns"), glob=False, **extra)


def _needed(dataset: dict) -> set[str] | None:
    """The (canonical) column names validation reads, or None when `dataset.csv.check_width` is false: then a CSV
    scan reads only those columns (faster on a wide file, but a record with extra fields goes unnoticed)."""
    if not (dataset.get("csv") or {}).get("check_width", True):
        return None
    return set((dataset.get("schema") or {}).get("columns", {}))


def _canonical_names(lf: pl.LazyFrame, columns: dict[str, str],
                     partitions: dict[str, str | None | pl.Expr] | None = None, ours: tuple[str, ...] = (),
                     needed: set[str] | None = None) -> pl.LazyFrame:
    """A source's columns under their canonical names: stray BOM and whitespace cleaned, internal names dropped
    (except `ours`: the columns the reader itself added), `dataset.columns` renames applied; then its partition
    values (`partition_values`; for several files, an expression per key) as text columns, under their renamed
    names too, where the file has no such column (validation parses them, as it parses CSV text).

    `needed` (CSV: the canonical names validation reads): Polars' CSV reader checks a record's field count only
    when it reads every column; with the columns validation does not read pruned from the scan, a record with too many fields (an unquoted separator
    in a value) was read without a word, its extra fields dropped and shifted values judged as if in place. So
    when the file has columns that are not (renamed to) one of `needed`, an always-null adapter reason (`_reason`) that reads every column
    keeps them all in the scan: such a record makes the reader refuse the file, and the record-by-record reader
    quarantines it."""
    names = lf.collect_schema().names()
    # A BOM that the reader left on the first header, or stray whitespace/CR around names.
    clean = {n: n.lstrip("\ufeff").strip() for n in names if n != n.lstrip("\ufeff").strip()}
    if clean:
        lf = lf.rename(clean)
        names = [clean.get(n, n) for n in names]
    if needed is not None and any(columns.get(n, n) not in needed and n not in ours for n in names):
        never = pl.any_horizontal([pl.col(n).is_null() & pl.col(n).is_not_null() for n in names])
        lf = lf.with_columns(pl.when(never).then(pl.lit("unreachable")).alias(S.ADAPTER_REASON))
        ours = (*ours, S.ADAPTER_REASON)
    theirs = [n for n in lf.collect_schema().names() if _internal(n) and n not in ours]
    if theirs:
        lf = lf.drop(theirs)
    if columns:
        have = set(lf.collect_schema().names())
        lf = lf.rename({src: dst for src, dst in columns.items() if src in have})
    if partitions:
        have = set(lf.collect_schema().names())
        add = {columns.get(k, k): v if isinstance(v, pl.Expr) else pl.lit(v, dtype=pl.Utf8)
               for k, v in partitions.items()}
        lf = lf.with_columns(v.alias(k) for k, v in add.items() if k not in have and not _internal(k))
    return lf


def _refuse_repeated_names(path: str, csv: dict[str, Any]) -> None:
    """A header that names a column twice: Polars keeps the first and calls the other `<name>_duplicated_0`, which
    validation never reads, so the second column's values vanished without a word. Read from the file's own first
    record (a column really named `price_duplicated_0` is not a repeat)."""
    if not csv.get("has_header", True) or csv.get("new_columns"):
        return
    try:
        with _open(path, "r", encoding="utf-8-sig", newline="") as fh:
            header = next(csvlib.reader(fh, delimiter=csv.get("separator", ","), quotechar=csv.get("quote_char", '"')), [])
    except (UnicodeDecodeError, csvlib.Error):
        return                                   # the reader and its own checks say what is wrong with it
    names = [n.strip() for n in header]
    for k, name in enumerate(names):
        if name and names.index(name) < k:
            raise UserError(f"{path}: the header names {name!r} twice (columns {names.index(name) + 1} and {k + 1}); "
                            f"rename or remove one of them in the file")


# Byte-order marks of encodings other than UTF-8 (UTF-32 first: its little-endian mark starts with UTF-16's).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
               (b"\xfe\xff", "UTF-16"))


def _refuse_other_encodings(path: str) -> None:
    """A UTF-16 or UTF-32 text file (as Excel's "Unicode text" export writes) read as UTF-8 gave a header of
    `\x00`-riddled names and a "required columns missing" error that never said why."""
    with _open(path, "rb") as fh:
        head = fh.read(4096)
    found = next((enc for bom, enc in _OTHER_BOMS if head.startswith(bom)), None)
    if found is None and b"\x00" in head.split(b"\n", 1)[0]:
        found = "UTF-16 or another encoding with NUL bytes (or binary data)"
    if found:
        raise UserError(f"{path}: the text is {found}, not UTF-8; ecomray reads UTF-8 only: re-encode it (for "
                        f"example `iconv -f UTF-16 -t UTF-8 in.csv > out.csv`)")


def first_bad_utf8_line(path: str) -> int | None:
    """The first line (1-based) of a file that is not valid UTF-8, or None."""
    with _open(path, "rb") as fh:
        for n, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return None


def read_csv_exactly(path: str, csv: dict[str, Any], out: str, batch_rows: int = 100_000) -> int:
    """One CSV, record by record (Python's csv module), to a Parquet file of text columns + `_row` +
    `_record_error` + `_record_text`.

    For a file that Polars' reader refuses because of a malformed record (more fields than the header: an unquoted
    separator inside a value, say). Each record keeps its position (`_row`, counted as Polars counts: a blank line
    is a row of nulls); a record with too many fields keeps its first fields in the columns and is quarantined
    with a reason that names its line, and its whole text (re-quoted) in `_record_text`, so nothing is lost. A quote
    that is never closed makes every later line ambiguous: that is a whole-file error naming the line. Returns the
    rows written."""
    import csv as pycsv
    import io
    import sys

    quote = csv.get("quote_char", '"')
    opts: dict[str, Any] = {"delimiter": csv.get("separator", ","), "strict": True}
    opts.update({"quotechar": quote} if quote else {"quoting": pycsv.QUOTE_NONE})
    pycsv.field_size_limit(min(sys.maxsize, 2**31 - 1))     # a long review or title is data, not an error

    def as_text(fields: list[str]) -> str:
        buf = io.StringIO()
        pycsv.writer(buf, delimiter=opts["delimiter"], lineterminator="").writerow(fields)  # re-quoted as needed
        return buf.getvalue()

    # utf-8-sig: a BOM is not part of the first name; newline="\n": a record ends at \n or \r\n only, as Polars
    # reads it (a lone \r stays inside its value instead of splitting the record)
    with _open(path, "r", newline="\n", encoding="utf-8-sig") as fh:
        reader = pycsv.reader(_hide_lone_cr(fh), **opts)
        start = 1                                 # the line a record starts on (a quoted value may span lines)
        try:
            header = next(reader, None) if csv.get("has_header", True) else None
            if header is None and csv.get("has_header", True):
                raise UserError(f"{path}: no header line (the file holds no record)")
            start = reader.line_num + 1
            peeked = [] if header is not None else [next(reader, [])]   # no header: the first record's width
            width = len(header if header is not None else peeked[0])
            # without a header, the names Polars gives (column_0, column_1, ...), so that a file read either way
            # has the same columns for `dataset.columns` to map
            names = list(csv.get("new_columns") or header or [f"column_{k}" for k in range(width)])
            if len(names) != width:
                raise UserError(f"{path}: dataset.csv.new_columns names {len(names)} columns, the file has {width}")

            def records():
                nonlocal start
                for fields in itertools.chain(peeked, reader):
                    fields = [f.replace(_CR, "\r") if _CR in f else f for f in fields]
                    if len(fields) <= width:
                        values = [f if f != "" else None for f in fields] if fields else []
                        yield [*values, *([None] * (width - len(values))), None, None]
                    else:
                        yield [*fields[:width], f"malformed CSV record at line {start}: {len(fields)} "
                               f"fields, expected {width}", as_text(fields)]
                    start = reader.line_num + 1

            return _write_text_rows(out, names, records(), batch_rows)
        except pycsv.Error as err:
            raise UserError(f"{path}: the record starting at line {start}: {err} (a quote opened there and never "
                            f"closed makes every later line part of one value); fix the file") from None


_CR = "\ue000"  # a private-use character standing in for a lone CR while the csv module reads a line


def _hide_lone_cr(lines):
    """Lines as Polars splits records (at LF or CRLF), with any other CR hidden from the csv module, which would
    end a record there (or refuse it); `read_csv_exactly` puts the CRs back into the values."""
    for line in lines:
        end = "\r\n" if line.endswith("\r\n") else ("\n" if line.endswith("\n") else "")
        body = line[:len(line) - len(end)]
        yield body.replace("\r", _CR) + end if "\r" in body else line


def read_jsonl_exactly(path: str, out: str, batch_rows: int = 100_000) -> int:
    """One JSONL file, line by line (Python's json), to the same layout as `read_csv_exactly`: for a file that
    Polars' reader refuses (a line that is not valid JSON: Polars names no line). Blank lines are skipped, as Polars
    does; a line that is not a JSON object is quarantined with its line number and its text. Values become text
    (numbers and booleans in their JSON spelling, nested values as JSON): validation parses them."""
    def lines():
        with _open(path, "r", encoding="utf-8-sig", newline="\n") as fh:   # lines end at \n, as Polars reads them
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    yield n, line.rstrip("\r\n")

    def parse(line: str) -> tuple[dict | None, str | None]:
        try:
            value = json.loads(line)
        except ValueError as err:
            return None, f"malformed JSON: {err}"
        return (value, None) if isinstance(value, dict) else (None, f"a JSON {type(value).__name__}, not an object")

    names: dict[str, None] = {}
    for _, line in lines():                       # pass 1: the columns, in first-seen order (Polars reads them all)
        value, _ = parse(line)
        names.update(dict.fromkeys(value or {}))

    def text(v: Any) -> str | None:
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            return str(int(v))       # 4.0 reads as 4: an integer column takes it, as it takes Polars' typed 4.0
        return v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False)

    def records():
        for n, line in lines():
            value, error = parse(line)
            if value is None:
                yield [*([None] * len(names)), f"line {n}: {error}", line]
            else:
                yield [*(text(value.get(k)) for k in names), None, None]

    return _write_text_rows(out, list(names), records(), batch_rows)


def _write_text_rows(out: str, names: list[str], records, batch_rows: int) -> int:
    """Rows of [*text values, record error, record text] -> Parquet with `_row` (their position) first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = [k for k, n in enumerate(names) if not _internal(n.lstrip("\ufeff").strip())]   # as _canonical_names
    width = len(names)
    arrow = pa.schema([("_row", pa.int64()), *((names[k], pa.string()) for k in keep),
                       (S.RECORD_ERROR, pa.string()), (S.RECORD_TEXT, pa.string())])
    rows = 0
    with pq.ParquetWriter(out, arrow, compression="lz4") as writer:
        for batch in _batched(records, batch_rows):
            cols = list(zip(*batch))
            cols = [cols[k] for k in keep] + cols[width:]
            arrays = [pa.array(range(rows, rows + len(batch)), type=pa.int64())]
            arrays += [pa.array(c, type=pa.string()) for c in cols]
            writer.write_table(pa.table(arrays, schema=arrow))
            rows += len(batch)
    return rows


def _batched(items, n: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def exact_source(dataset: dict, paths: dict, i: int, work: str) -> pl.LazyFrame | None:
    """Source i read again record by record into `work` (prepare calls this when Polars' reader refused the file):
    the same columns as `sources()` gives, plus `_row`, `_record_error` and `_record_text`. None for Parquet: a
    Parquet file Polars cannot read is not a matter of one record."""
    path, split = _files(dataset, paths)[i]
    fmt = file_format(path, dataset.get("format", "auto"))
    if fmt == "parquet":
        return None
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, f"exact-{i:05d}.parquet")
    try:
        if fmt == "csv":
            read_csv_exactly(path, dataset.get("csv") or {}, out)
        else:
            read_jsonl_exactly(path, out)
    except UnicodeDecodeError:
        raise UserError(f"{path}: invalid UTF-8 at line {first_bad_utf8_line(path)}; ecomray never replaces bytes "
                        f"silently: re-encode the file (for example `iconv -f GBK -t UTF-8`)") from None
    exact = _canonical_names(pl.scan_parquet(out), dataset.get("columns") or {}, partition_values(path),
                             ours=("_row", S.RECORD_ERROR, S.RECORD_TEXT))
    return _with_split(exact, dataset, split)


def _files(dataset: dict, paths: dict) -> list[tuple[str, str | None]]:
    """(file, its published split or None), one per source, in source order."""
    splits = dataset.get("splits")
    if not splits:
        return [(f, None) for f in list_files(dataset_path(dataset, paths))]
    root = dataset_path(dataset, paths)
    out = []
    for split, rel in splits.items():
        f = list_files(os.path.join(root, rel))
        if len(f) != 1:
            raise UserError(f"dataset.splits.{split}: {rel} must name one file (found {len(f)})")
        out.append((f[0], str(split)))
    return out


def _with_split(lf: pl.LazyFrame, dataset: dict, split: str | None) -> pl.LazyFrame:
    if split is None:
        return lf
    return lf.with_columns(pl.lit(split).alias((dataset.get("split") or {}).get("column", "split")))


_PATH = "__ecomray_source_path"


def group_source(dataset: dict, paths: dict, indices: list[int]) -> pl.LazyFrame | None:
    """Sources `indices` (consecutive files of one format) as one scan, with `_file` (the source index) and `_row`
    (the row within its own file, as `sources()` numbers it), for prepare to validate many small files in one pass.
    None when they cannot be read as one here (formats that differ, a per-file split). A group whose files would not
    read as they do alone is refused with a Polars error, and prepare then tries smaller groups: Polars refuses CSV
    headers that differ and Parquet schemas that differ; JSONL files whose inferred fields or types differ are
    refused here (one multi-file JSON scan would read every file with the first file's schema)."""
    files = _files(dataset, paths)
    if any(files[i][1] is not None for i in indices):
        return None
    indices = [i for i in indices if not is_empty(files[i][0])]   # an empty file adds no rows
    picked = [files[i][0] for i in indices]
    kinds = {file_format(f, dataset.get("format", "auto")) for f in picked}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind == "csv":
        lf = _scan_csv(picked, dataset.get("csv") or {}, include_file_paths=_PATH)
    elif kind == "parquet":
        lf = pl.scan_parquet(picked, glob=False, include_file_paths=_PATH)
    else:
        lf = _scan_jsonl_together(picked)
    parts = [partition_values(f) for f in picked]
    if any(p.keys() != parts[0].keys() for p in parts):
        raise pl.exceptions.SchemaError(f"their partition folders differ ({picked[0]} .. {picked[-1]})")
    by_file = {k: pl.col(_PATH).replace_strict({f: p[k] for f, p in zip(picked, parts)}, return_dtype=pl.Utf8)
               for k in parts[0]}
    lf = _canonical_names(lf, dataset.get("columns") or {}, by_file, ours=(_PATH,),
                          needed=_needed(dataset) if kind == "csv" else None)
    rows = dict(lf.group_by(_PATH).len().collect().iter_rows())
    offsets, start = {}, 0
    for f in picked:                      # the group's rows come file after file: a file's rows start at its offset
        offsets[f] = start
        start += rows.get(f, 0)
    path = pl.col(_PATH)
    return (lf.with_row_index("__ecomray_group_row")
              .with_columns(_file=path.replace_strict(dict(zip(picked, indices)), return_dtype=pl.Int32),
                            _row=pl.col("__ecomray_group_row").cast(pl.Int64)
                            - path.replace_strict(offsets, return_dtype=pl.Int64))
              .drop("__ecomray_group_row", _PATH))


def _scan_jsonl_together(picked: list[str]) -> pl.LazyFrame:
    """JSONL files as one scan, read with the fields and types that each infers alone (`scan_file`): the same
    fields for all (in any order), of the same types, except that a field that is null in every line of a file
    (inferred as Null) takes the others' type, which reads its nulls alike. Otherwise a SchemaError."""
    schemas = [dict(pl.scan_ndjson(glob.escape(f), infer_schema_length=None).collect_schema()) for f in picked]
    merged = dict(schemas[0])
    for f, schema in zip(picked[1:], schemas[1:]):
        differ = sorted(set(merged) ^ set(schema))
        for name in set(merged) & set(schema):
            if merged[name] == pl.Null:
                merged[name] = schema[name]
            elif schema[name] not in (pl.Null, merged[name]):
                differ.append(name)
        if differ:
            raise pl.exceptions.SchemaError(f"{f}: its JSON fields or types differ from {picked[0]}'s ({differ})")
    return _nested_as_text(pl.scan_ndjson([glob.escape(f) for f in picked], schema=merged, include_file_paths=_PATH))


def _nested_as_text(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A JSONL field that holds an object or an array on every line, as its JSON text. Polars reads a field
    mixing text and objects as text, and the record-by-record reader gives every value as text: with this, all three
    agree, and validation judges each value (a number column quarantines `{"x": 1}` as unparseable, with the text
    kept) instead of failing the file on a Struct column no rule applies to."""
    nested = [n for n, t in lf.collect_schema().items() if isinstance(t, (pl.Struct, pl.List, pl.Array))]
    return lf.with_columns(S.json_text(pl.col(n)).alias(n) for n in nested) if nested else lf


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    """One source per input file. With `dataset.splits: {train: <file>, val: <file>, test: <file>}` (files
    relative to `dataset.path`), a published split kept in separate files, each row gets its file's split in the
    `split` column (`split: given`)."""
    fmt = dataset.get("format", "auto")
    csv, columns = dataset.get("csv") or {}, dataset.get("columns") or {}
    files = _files(dataset, paths)
    out = []
    for f, split in files:
        with unreadable_as_user_error(f):
            if len(files) > 1 and is_empty(f):
                # one empty file among many (an hour with no traffic): no rows, not an error; alone it is one
                empty = pl.LazyFrame(schema={c: pl.Utf8 for c in (dataset.get("schema") or {}).get("columns", {})})
                out.append((f, _with_split(empty, dataset, split)))
                continue
            lf = scan_file(f, file_format(f, fmt), csv, columns, partition_values(f), _needed(dataset))
        out.append((f, _with_split(lf, dataset, split)))
    return out


READ_ERRORS = (OSError, EOFError, zlib.error)


def is_gzip_damage(err: BaseException) -> bool:
    """A gzip stream that is cut short, corrupted or not gzip at all (Python's gzip, or its zlib, or Polars'
    decompressor: "unexpected end of file")."""
    return isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)) or (
        isinstance(err, OSError) and "end of file" in str(err))


def gzip_damage(path: str, err: BaseException) -> UserError | None:
    """The error line for a `.gz` source whose stream `err` shows damaged; None when it is not that."""
    if path.lower().endswith(GZIP) and is_gzip_damage(err):
        return UserError(f"{path}: a broken or mislabelled gzip file ({err})")
    return None


@contextlib.contextmanager
def unreadable_as_user_error(path: str):
    """A file the OS or its compression refuses while it is listed and its header read (a truncated, corrupted or
    mislabelled `.gz`, a file without read permission) is one error line naming it, not a traceback."""
    try:
        yield
    except READ_ERRORS as err:
        raise gzip_damage(path, err) or UserError(f"{path}: could not be read ({err})") from None
