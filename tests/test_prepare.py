"""The data plane: validation rules with exact counts, input variants, splits, re-runs, errors, engines."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import polars as pl
import pytest
from hydra import compose, initialize_config_dir

from ecomray.data import schema as S
from ecomray.data.prepare import run as prepare
from ecomray.runtime import UserError, to_plain

CONF = str(Path(__file__).resolve().parents[1] / "conf")
DATASETS = os.environ.get("ECOMRAY_DATASETS", str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def cfg_for(tmp_path: Path, *overrides: str) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("prepare", overrides=[f"paths.root={tmp_path}", f"paths.datasets={DATASETS}", *overrides])
    return to_plain(cfg)


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


MESSY = (
    "user_id,item_id,event,ts,price,quantity\n"
    "u1,i1,view,2026-01-01T00:00:00,1.5,\n"          # good
    "u1,i2,click,1767225600,2,1\n"                   # good (epoch seconds)
    "u1,i2,click,1767225600,2,1\n"                   # exact duplicate
    ",i3,view,2026-01-01,1,\n"                       # missing user_id
    "u2,i3,buy,2026-01-01,1,\n"                      # unknown event
    "u2,i3,view,yesterday,1,\n"                      # unparseable ts
    "u2,i4,cart,2026-01-02T10:00:00+08:00,-1,1\n"    # negative price
    "u2,i4,cart,2026-01-02 10:00:00,1,0\n"           # quantity < 1
    "u3,i4,purchase,2026-01-02 10:00:00,abc,1\n"     # unparseable price
    "u3,i5,purchase,2026-01-03,3,2\n"                # good
)


def test_rules_quarantine_exact_counts(tmp_path: Path) -> None:
    src = write(tmp_path / "e.csv", MESSY)
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.shards=3"))
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"]) == (10, 3, 7)
    assert m["reasons"] == {"exact duplicate": 1, "missing user_id": 1, "unknown event": 1, "unparseable ts": 1,
                            "price < 0": 1, "quantity < 1": 1, "unparseable price": 1}
    out = Path(m["shards"][0]["file"]).parent
    q = pl.read_parquet(tmp_path / "data" / "events" / "quarantine.parquet")
    assert q.height == 7 and set(q["reason"]) == set(m["reasons"])
    # the raw text of a value that failed to parse is kept, not nulled
    assert q.filter(pl.col("reason") == "unparseable ts")["ts"].to_list() == ["yesterday"]
    assert q.filter(pl.col("reason") == "unparseable price")["price"].to_list() == ["abc"]
    shards = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet")
    assert shards.height == 3 and str(out) == "shards"
    assert shards.schema["ts"] == pl.Datetime("us", "UTC")
    assert shards.schema["user_id"] == pl.Utf8 and shards.schema["item_id"] == pl.Utf8
    assert sum(s["rows"] for s in m["shards"]) == m["rows_out"]


def test_non_finite_floats_are_quarantined(tmp_path: Path) -> None:
    src = write(tmp_path / "e.csv", "user_id,item_id,event,ts,price\n" + "".join(
        f"u1,i{n},view,2026-01-0{n + 1},{p}\n" for n, p in enumerate(["1.5", "nan", "inf", "-inf", "1e400", "NaN"])))
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    assert (m["rows_out"], m["reasons"]) == (1, {"non-finite price": 5})
    q = pl.read_parquet(tmp_path / "data" / "events" / "quarantine.parquet").sort("_row")
    assert q["price"].to_list() == ["nan", "inf", "-inf", "1e400", "NaN"]  # the raw text, as given


# A log line with an unquoted comma inside a value: one field too many. Blank lines are rows of nulls (as Polars reads
# them), quoted separators and newlines stay inside their value.
RAGGED = (
    "user_id,item_id,event,ts,price\n"
    "u1,i1,view,2026-01-01,1\n"
    "u1,i2,view,2026-01-02,Blue, large\n"         # 6 fields: malformed
    "\n"                                          # blank: missing user_id
    'u2,"i,3",view,2026-01-03,"2"\n'              # a quoted separator: fine
    'u2,"i\n4",view,2026-01-04,3\n'              # a quoted newline: fine, one record over two lines
    "u2,i5,view,2026-01-05\n"                     # a missing trailing field: price null, fine (optional)
    "u3,i6,view,2026-01-06,4,x,y\n"               # 7 fields: malformed
)


@pytest.mark.parametrize("engine", ["polars", "ray"])
def test_malformed_csv_records_are_quarantined_not_fatal(tmp_path: Path, engine: str) -> None:
    src = write(tmp_path / "e.csv", RAGGED)
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", f"prepare.engine={engine}",
                        "prepare.ray_num_cpus=2"))
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"]) == (7, 4, 3)
    q = pl.read_parquet(tmp_path / "data" / "events" / "quarantine.parquet").sort("_row")
    assert q["_row"].to_list() == [1, 2, 6]
    assert q["reason"].to_list() == ["malformed CSV record at line 3: 6 fields, expected 5", "missing user_id",
                                     "malformed CSV record at line 9: 7 fields, expected 5"]
    # nothing is lost: the record's text, and its first fields in the columns
    assert q["_record_text"].to_list() == ["u1,i2,view,2026-01-02,Blue, large", None, "u3,i6,view,2026-01-06,4,x,y"]
    assert q.row(0, named=True)["price"] == "Blue"
    rows = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet").sort("_row")
    assert rows["item_id"].to_list() == ["i1", "i,3", "i\n4", "i5"] and rows["_row"].to_list() == [0, 3, 4, 5]
    assert rows["price"].to_list() == [1.0, 2.0, 3.0, None]


def test_malformed_json_lines_are_quarantined_with_their_line(tmp_path: Path) -> None:
    src = write(tmp_path / "e.jsonl", "\n".join([
        '{"user_id": "u1", "item_id": "i1", "event": "view", "ts": "2026-01-01", "price": 1.5}',
        '{"user_id": "u1", "item_id": "i2", "event": "view", "ts": "2026-01-02"',      # not closed
        "",                                                                               # blank: skipped
        "[1, 2]",                                                                         # not an object
        '{"user_id": "u2", "item_id": 3, "event": "view", "ts": 1767225600, "extra": {"a": 1}}',
        '{"user_id": "u2", "item_id": "i4", "event": "view", "ts": "2026-01-04", "price": 1e400}']) + "\n")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"]) == (5, 2, 3)
    q = pl.read_parquet(tmp_path / "data" / "events" / "quarantine.parquet").sort("_row")
    assert q["reason"].to_list()[0].startswith("line 2: malformed JSON")
    assert q["reason"].to_list()[1:] == ["line 4: a JSON list, not an object", "non-finite price"]
    assert q["_record_text"].to_list()[:2] == ['{"user_id": "u1", "item_id": "i2", "event": "view", "ts": "2026-01-02"',
                                               "[1, 2]"]
    rows = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet").sort("_row")
    assert rows["item_id"].to_list() == ["i1", "3"] and rows["price"].to_list() == [1.5, None]
    assert rows["ts"].to_list()[1].isoformat() == "2026-01-01T00:00:00+00:00"       # epoch seconds, as text


def test_a_prepare_that_quarantines_every_row_publishes_nothing(tmp_path: Path) -> None:
    """`overwrite=true` with a `ts_format` that matches nothing used to swap a good dataset for an empty one, and
    training then registered a model trained on no rows. Now the good dataset stays, and the error says why."""
    from ecomray.config import compose as compose_job
    from ecomray.data.shards import load_manifest
    from ecomray.train.driver import fit

    src = write(tmp_path / "e.csv", "user_id,item_id,event,ts\n" + "".join(
        f"u{k % 3},i{k},view,2026-01-{k + 1:02d}\n" for k in range(9)))
    good = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    with pytest.raises(UserError, match=r"all 9 rows were quarantined \('unparseable ts' x 9\); .*events is unchanged; "
                                        r"every row and its reason: .*events.rejected-quarantine.parquet"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "dataset.ts_format=%d/%m/%Y", "overwrite=true"))
    assert load_manifest(str(tmp_path / "data" / "events"))["hash"] == good["hash"]
    assert pl.read_parquet(tmp_path / "data" / "events.rejected-quarantine.parquet").height == 9
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "overwrite=true"))   # fixed: published,
    assert not (tmp_path / "data" / "events.rejected-quarantine.parquet").exists()         # the old rejects gone

    manifest = tmp_path / "data" / "events" / "manifest.json"     # a dataset published before the rule
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "split": {**m["split"], "rows": {"val": 3, "test": 3}}}))
    with pytest.raises(UserError, match=r"events has no training rows .*nothing to train on"):
        fit(compose_job("train", [f"paths.root={tmp_path}", "dataset=events", f"dataset.path={src}", "scaling=inproc"]))


@pytest.mark.parametrize("broken", [False, True], ids=["polars reader", "record by record"])
def test_a_json_boolean_is_not_a_number_on_either_reader(tmp_path: Path, broken: bool) -> None:
    """`"quantity": true` in every line made Polars type the column Boolean and cast true to 1, while the same line
    read record by record (a broken line elsewhere in the file) was "unparseable quantity": one verdict for both."""
    line = '{"user_id": "u1", "item_id": "i%d", "event": "view", "ts": "2026-01-0%d", "quantity": %s}'
    text = "\n".join(line % (k, k, v) for k, v in ((1, "true"), (2, "false"))) + "\n" + ('{"user_id": \n' if broken else "")
    with pytest.raises(UserError, match=r"events: all \d rows were quarantined \('unparseable quantity' x 2"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={write(tmp_path / 'e.jsonl', text)}"))
    q = pl.read_parquet(tmp_path / "data" / "events.rejected-quarantine.parquet")   # kept, since nothing was published
    assert q.height == 2 + broken and q["reason"].null_count() == 0
    assert q.drop_nulls("quantity").sort("_row")["quantity"].to_list() == ["true", "false"]


@pytest.mark.parametrize("broken", [False, True], ids=["polars reader", "record by record"])
def test_a_json_number_in_a_text_column_reads_alike_on_either_reader(tmp_path: Path, broken: bool) -> None:
    """`"user_id": 12345.0` was "12345.0" from Polars' typed column and "12345" from the record-by-record reader."""
    line = '{"user_id": %s, "item_id": %s, "event": "view", "ts": "2026-01-0%d"}'
    text = "\n".join(line % (u, i, k + 1) for k, (u, i) in enumerate((("12345.0", "1.5"), ("7.0", "-2.0"))))
    m = prepare(cfg_for(tmp_path, "dataset=events", "prepare.shards=1",
                        f"dataset.path={write(tmp_path / 'e.jsonl', text + chr(10) + ('{' + chr(10) if broken else ''))}"))
    rows = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet").sort("_row")
    assert rows.select("user_id", "item_id").rows() == [("12345", "1.5"), ("7", "-2")]
    assert m["rows_quarantined"] == broken


@pytest.mark.parametrize("broken", [False, True], ids=["polars reader", "record by record"])
def test_a_json_object_or_array_in_every_line_is_quarantined_not_fatal(tmp_path: Path, broken: bool) -> None:
    """`"price": {...}` on every line made Polars type the column a Struct, and validation failed the whole file
    (`is_nan` on a struct); now each value is its JSON text, unparseable as a price, quarantined with that text."""
    line = '{"user_id": "u%d", "item_id": "i1", "event": "view", "ts": "2026-01-0%d", "price": %s, "quantity": %s}'
    text = "\n".join(line % (k, k, p, q) for k, p, q in ((1, '{"x": 1}', "[1, 2]"), (2, '{"x": null}', "[]"))) + "\n"
    with pytest.raises(UserError, match=r"events: all \d rows were quarantined \('unparseable price' x 2"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={write(tmp_path / 'e.jsonl', text + ('{' if broken else ''))}"))
    q = pl.read_parquet(tmp_path / "data" / "events.rejected-quarantine.parquet").drop_nulls("user_id").sort("_row")
    assert [json.loads(v) for v in q["price"]] == [{"x": 1}, {"x": None}]       # the values, in JSON
    assert [json.loads(v) for v in q["quantity"]] == [[1, 2], []]


def test_a_parquet_column_of_lists_or_structs_is_named_as_such(tmp_path: Path) -> None:
    """A typed source's nested column is the source's shape, not a row's fault: one error naming it (it was
    "cannot cast List type", or a Rust panic for a struct holding binary)."""
    import datetime as dt

    ts = [dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2)]
    for name, nested in (("list", [["a"], ["b"]]), ("struct", [{"b": b"\x00"}, {"b": b"\x01"}])):
        src = tmp_path / f"{name}.parquet"
        pl.DataFrame({"user_id": ["u1", "u2"], "item_id": nested, "event": ["view", "view"], "ts": ts}).write_parquet(src)
        with pytest.raises(UserError, match=rf"{name}.parquet: column\(s\) item_id \(.*\) hold nested values"):
            prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))


def test_quarantine_of_a_folder_mixing_typed_parquet_and_csv(tmp_path: Path) -> None:
    """A typed Parquet source has no raw-text columns, a CSV source has them: their quarantined rows still meet
    in one file (the quarantine used to take the first file's columns and fail on the second's)."""
    import datetime as dt

    folder = tmp_path / "in"
    folder.mkdir()
    pl.DataFrame({"user_id": ["u1", "u1"], "item_id": ["p1", "p2"], "event": ["view", "bogus"],
                  "ts": [dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2)], "price": [1.0, 2.0]}
                 ).write_parquet(folder / "a.parquet")
    write(folder / "b.csv", "user_id,item_id,event,ts,price\nu1,i1,view,2026-01-01,1\nu1,i2,view,2026-01-02,abc\n")
    write(folder / "c.csv", "user_id,item_id,event,ts,price\nu1,i3,view,2026-01-03,1,extra\n")  # read exactly
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={folder}", "prepare.shards=1"))
    assert m["reasons"] == {"unknown event": 1, "unparseable price": 1,     # one user: every source in one shard
                            "malformed CSV record at line 2: 6 fields, expected 5": 1}
    assert m["rows_out"] == 2
    q = pl.read_parquet(tmp_path / "data" / "events" / "quarantine.parquet").sort("_file")
    assert q["price"].to_list() == ["2.0", "abc", "1"]


def test_an_empty_file_among_many_is_zero_rows_not_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "hours"
    folder.mkdir()
    write(folder / "00.csv", "user_id,item_id,event,ts\nu1,i1,view,2026-01-01\n")
    write(folder / "01.csv", "")                                          # an hour without traffic
    write(folder / "02.csv", "user_id,item_id,event,ts\nu1,i2,view,2026-01-02\n")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={folder}"))
    assert [s["rows"] for s in m["sources"]] == [1, 0, 1] and m["rows_out"] == 2


def test_exact_reader_keeps_bom_crlf_and_lone_cr_as_polars_reads_them(tmp_path: Path) -> None:
    """An Excel-style export (BOM, quoted header, CRLF) with one malformed record: the header still names the
    columns, and a lone CR inside a value stays in it (Polars ends records at LF or CRLF only)."""
    src = tmp_path / "e.csv"
    src.write_bytes('\ufeff"user_id","item_id","event","ts"\r\n'.encode()
                    + b'u1,i1,view,2026-01-01\r\nu1,i2\rx,view,2026-01-02\r\nu1,i3,view,2026-01-03,extra\r\n')
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    assert (m["rows_in"], m["rows_out"]) == (3, 2)
    assert m["reasons"] == {"malformed CSV record at line 4: 5 fields, expected 4": 1}
    rows = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet").sort("_row")
    assert rows["item_id"].to_list() == ["i1", "i2\rx"]


def test_a_typed_fraction_in_an_integer_column_is_quarantined_not_truncated(tmp_path: Path) -> None:
    src = tmp_path / "e.parquet"
    pl.DataFrame({"user_id": ["u1"] * 3, "item_id": ["i1", "i2", "i3"], "event": ["view"] * 3,
                  "ts": ["2026-01-01", "2026-01-02", "2026-01-03"], "quantity": [2.0, 1.5, None]}).write_parquet(src)
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    assert m["reasons"] == {"unparseable quantity": 1}                 # 1.5 used to become 1
    rows = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet").sort("_row")
    assert rows["quantity"].to_list() == [2, None]


def test_a_quote_never_closed_names_its_line(tmp_path: Path) -> None:
    src = write(tmp_path / "e.csv", 'user_id,item_id,event,ts\nu1,i1,view,2026-01-01\nu1,"i2,view,2026-01-02\n'
                                    "u1,i3,view,2026-01-03\n")
    with pytest.raises(UserError, match=r"e\.csv: the record starting at line 3: .*never closed"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))


def test_timestamps_iso_offsets_and_epoch_are_utc(tmp_path: Path) -> None:
    src = write(tmp_path / "t.csv", "user_id,item_id,event,ts\n"
                "u,a,view,2026-01-02T10:00:00+08:00\nu,b,view,2026-01-02T02:00:01Z\n"
                "u,c,view,1767319202\nu,d,view,2026-01-02 02:00:03.5\n")
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.shards=1"))
    df = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "part-00000.parquet")
    assert df["item_id"].to_list() == ["a", "b", "c", "d"]  # sorted by ts: 02:00:00, :01, :02, :03.5 UTC
    assert [t.isoformat() for t in df["ts"]] == ["2026-01-02T02:00:00+00:00", "2026-01-02T02:00:01+00:00",
                                                  "2026-01-02T02:00:02+00:00", "2026-01-02T02:00:03.500000+00:00"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_epoch_numbers_in_any_unit_are_the_same_instant(tmp_path: Path, fmt: str) -> None:
    """Epoch milliseconds (JavaScript, Kafka) were read as seconds: the year 55969, with nothing quarantined."""
    s = 1767319202                                   # 2026-01-02T02:00:02Z
    ts = [s, s * 1000 + 1, s * 1_000_000 + 2, s * 1_000_000_000 + 3_000, 1767319202.5]
    rows = {"user_id": ["u"] * 5, "item_id": list("abcde"), "event": ["view"] * 5}
    if fmt == "csv":
        src = write(tmp_path / "t.csv", "user_id,item_id,event,ts\n" + "".join(
            f"u,{i},view,{t}\n" for i, t in zip("abcde", ts)))
    else:
        src = str(tmp_path / "t.parquet")
        pl.DataFrame({**rows, "ts": [float(t) for t in ts]}).write_parquet(src)
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.shards=1", "split@dataset.split=none"))
    df = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "part-00000.parquet")
    assert [t.isoformat() for t in df.sort("item_id")["ts"]] == [
        "2026-01-02T02:00:02+00:00", "2026-01-02T02:00:02.001000+00:00", "2026-01-02T02:00:02.000002+00:00",
        "2026-01-02T02:00:02.000003+00:00", "2026-01-02T02:00:02.500000+00:00"]


@pytest.mark.parametrize("damage", ["cut early", "cut late", "not gzip", "two bytes", "corrupted"])
def test_a_broken_gzip_file_is_one_error_naming_it(tmp_path: Path, damage: str) -> None:
    """A truncated or mislabelled .gz gave Python's gzip traceback (OSError, EOFError), with no file named."""
    import gzip
    import random

    rng = random.Random(0)
    text = "user_id,item_id,event,ts\n" + "".join(f"u{k},i{rng.randint(0, 10**6)},view,2026-01-01\n" for k in range(50000))
    packed = gzip.compress(text.encode())
    flipped = packed[:20] + bytes(b ^ 0xFF for b in packed[20:60]) + packed[60:]     # zlib.error, not an OSError
    body = {"cut early": packed[:2000], "cut late": packed[: len(packed) * 9 // 10], "not gzip": text.encode(),
            "two bytes": packed[:2], "corrupted": flipped}[damage]
    src = tmp_path / "e.csv.gz"
    src.write_bytes(body)
    with pytest.raises(UserError, match=rf"{re.escape(str(src))}: a broken (or mislabelled )?gzip file \("):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    assert not list((tmp_path / "data").glob(".events.tmp-*"))


@pytest.mark.parametrize("encoding,expect", [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16 or another"),
                                             ("utf-32", "UTF-32")])
def test_a_utf16_or_utf32_file_says_so(tmp_path: Path, encoding: str, expect: str) -> None:
    """Excel's "Unicode text" export (UTF-16) gave "required column(s) missing (found ['\\x00u\\x00s...'])"."""
    src = tmp_path / "e.csv"
    src.write_bytes("user_id,item_id,event,ts\nu1,i1,view,2026-01-01\n".encode(encoding))
    with pytest.raises(UserError, match=rf"e\.csv: the text is {expect}.*not UTF-8; .*iconv"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))


def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    """Polars kept the first `user_id` and renamed the second `user_id_duplicated_0`, which nothing read: its
    values vanished without a word. A column really named `..._duplicated_0` is not a repeat."""
    src = write(tmp_path / "e.csv", "user_id,item_id,event,ts,user_id\nu1,i1,view,2026-01-01,u9\n")
    with pytest.raises(UserError, match=r"e\.csv: the header names 'user_id' twice \(columns 1 and 5\)"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    src = write(tmp_path / "f.csv", "user_id,item_id,event,ts,ts,ts_duplicated_0\nu1,i1,view,2026-01-01,x,y\n")
    with pytest.raises(UserError, match=r"f\.csv: the header names 'ts' twice \(columns 4 and 5\)"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    src = write(tmp_path / "g.csv", "user_id,item_id,event,ts,price_duplicated_0\nu1,i1,view,2026-01-01,3\n")
    assert prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "overwrite=true"))["rows_out"] == 1


def test_csv_variants_bom_crlf_delimiter_mapping(tmp_path: Path) -> None:
    body = "\ufeffuid;sku;action;when\r\nu1;i1;view;2026-01-01\r\nu1;i2;cart;2026-01-02\r\n"
    src = write(tmp_path / "v.csv", body)
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "dataset.csv.separator=';'",
                        "+dataset.columns={uid: user_id, sku: item_id, action: event, when: ts}"))
    assert (m["rows_out"], m["rows_quarantined"]) == (2, 0)


def test_parquet_jsonl_folder_and_glob(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = {"user_id": ["u1", "u2"], "item_id": ["a", "b"], "event": ["view", "purchase"], "ts": ["2026-01-01", "2026-01-02"]}
    pl.DataFrame(rows).write_parquet(raw / "a.parquet")
    pl.DataFrame(rows).with_columns(pl.col("user_id") + "x").write_ndjson(raw / "b.jsonl")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={raw}"))
    assert m["rows_out"] == 4 and len(m["sources"]) == 2
    m2 = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={raw}/*.jsonl", "overwrite=true"))
    assert m2["rows_out"] == 2


def test_leave_one_out_ties_broken_by_source_order(tmp_path: Path) -> None:
    src = write(tmp_path / "l.csv", "user_id,item_id,event,ts\n" + "".join(
        f"u1,i{k},purchase,2026-01-01\n" for k in range(5)) + "u2,a,view,2026-01-01\nu2,b,view,2026-01-02\n")
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.shards=2"))
    df = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet")
    u1 = df.filter(pl.col("user_id") == "u1")
    assert u1["item_id"].to_list() == ["i0", "i1", "i2", "i3", "i4"]
    assert u1["split"].to_list() == ["train", "train", "train", "val", "test"]
    assert df.filter(pl.col("user_id") == "u2")["split"].to_list() == ["train", "train"]  # < min_rows: all train


def test_temporal_split_cuts(tmp_path: Path) -> None:
    src = write(tmp_path / "t.csv", "user_id,item_id,event,ts\n" + "".join(
        f"u{k % 3},i{k},view,2026-01-{k + 1:02d}\n" for k in range(20)))
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "split@dataset.split=temporal",
                        "dataset.split.val_cut=2026-01-10", "dataset.split.test_cut=2026-01-15"))
    assert m["split"]["rows"] == {"train": 10, "val": 5, "test": 5}
    # a ts the schema does not require: rows without one went to train, after both cuts; refused before reading
    with pytest.raises(UserError, match=r"split=temporal cuts on 'ts', which the schema does not require"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "split@dataset.split=temporal",
                        "dataset.schema.columns.ts.required=false", "overwrite=true"))


def test_stratified_split_is_seeded_and_stratified(tmp_path: Path) -> None:
    lines = "".join(f"{k},{'true' if k % 5 == 0 else 'false'}\n" for k in range(200))
    src = write(tmp_path / "tab.csv", "x,y\n" + lines)
    over = ["dataset=events", f"dataset.path={src}", "schema@dataset.schema=table", "split@dataset.split=stratified",
            "+dataset.schema.label=y", "+dataset.schema.columns={x: {type: int, required: true}, y: {type: bool, required: true}}",
            "dataset.dedup=keep"]
    m = prepare(cfg_for(tmp_path, *over))
    df = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet")
    counts = {(r["split"], r["y"]): r["len"] for r in df.group_by("split", "y").len().iter_rows(named=True)}
    assert counts == {("test", True): 8, ("test", False): 32, ("val", True): 4, ("val", False): 16,
                      ("train", True): 28, ("train", False): 112}
    first = df.sort("x").select("x", "split")
    prepare(cfg_for(tmp_path, *over, "overwrite=true"))
    again = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet").sort("x").select("x", "split")
    assert first.equals(again) and m["split"]["seed"] == 42


def test_stratified_split_without_a_label_is_the_same_for_any_shard_count(tmp_path: Path) -> None:
    """Without `by` (no label) each row's rank was its position in the sorted order turned inside out: which rows
    went to test depended on how the frame was laid out, and a re-prepare with another shard count moved 87 of 200
    rows to another split."""
    src = write(tmp_path / "e.csv", "user_id,item_id,event,ts\n" + "".join(
        f"u{k},i{k % 7},view,2026-01-01T00:{k // 60:02d}:{k % 60:02d}\n" for k in range(200)))
    splits = []
    for n in (1, 4):
        over = ["dataset=events", f"dataset.path={src}", "split@dataset.split=stratified", f"prepare.shards={n}",
                "overwrite=true"]
        m = prepare(cfg_for(tmp_path, *over))
        assert m["split"]["rows"] == {"train": 140, "val": 20, "test": 40}
        df = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet")
        splits.append(df.sort("user_id").select("user_id", "split"))
    assert splits[0].equals(splits[1])


def test_a_split_far_smaller_than_asked_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Stratified on a column of 100 values over 200 rows, each stratum's 10% rounded to 0: val and test came out
    empty and the summary said only `split train 200`."""
    from ecomray.data.prepare import split_warnings

    lines = "".join(f"{k},g{k % 100},{'true' if k % 2 else 'false'}\n" for k in range(200))
    src = write(tmp_path / "tab.csv", "x,g,y\n" + lines)
    over = ["dataset=events", f"dataset.path={src}", "schema@dataset.schema=table", "split@dataset.split=stratified",
            "+dataset.split.by=[g]", "+dataset.schema.columns={x: {type: int, required: true}, g: {type: str, required: "
            "true}, y: {type: bool, required: true}}", "dataset.dedup=keep"]
    m = prepare(cfg_for(tmp_path, *over))
    assert m["split"]["rows"] == {"train": 200}
    said = capsys.readouterr().out
    assert "WARNING: split val has 0 rows, where val_fraction=0.1 asks for about 20: each stratum of split.by=['g']" in said
    assert "WARNING: split test has 0 rows" in said
    assert split_warnings({"strategy": "stratified", "val_fraction": 0.1, "test_fraction": 0.2,
                           "rows": {"train": 140, "val": 20, "test": 40}}) == []
    assert split_warnings({"strategy": "temporal", "val_fraction": 0.1, "test_fraction": 0.1, "val_cut": "2026-01-01",
                           "test_cut": "2026-02-01", "rows": {"train": 9000, "val": 300, "test": 700}}) == []


def test_basic_iso_dates_are_dates_not_epoch_numbers() -> None:
    """20260105 and 20260105103000 matched the epoch pattern and became 1970-08-23 and 2612-01-07."""
    from datetime import datetime, timezone

    assert S.detect_ts_format(pl.Series(["20260105", "20251231"])) == "basic_date"
    assert S.detect_ts_format(pl.Series(["20260105103000"])) == "basic"
    assert S.detect_ts_format(pl.Series(["1767225600", "1767225601"])) == "epoch"      # 10 digits: still epoch
    got = pl.DataFrame({"t": ["20260105", "20260105103000", "1767225600"]}).select(
        S._parse_text(pl.col("t"), "mixed").alias("ts"))["ts"].to_list()
    assert got == [datetime(2026, 1, 5, tzinfo=timezone.utc), datetime(2026, 1, 5, 10, 30, tzinfo=timezone.utc),
                   datetime(2026, 1, 1, tzinfo=timezone.utc)]


def test_a_given_split_with_other_values_quarantines_them(tmp_path: Path) -> None:
    """A published split's rows labelled `dev` or left empty were kept, then dropped by every task (they filter on
    train/val/test) without a count. Unless the schema lists its own values, they are quarantined now."""
    src = write(tmp_path / "t.csv", "x,split\n1,train\n2,train\n3,val\n4,test\n5,dev\n6,\n")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "schema@dataset.schema=table",
                        "split@dataset.split=given",
                        "+dataset.schema.columns={x: {type: int, required: true}, split: {type: str}}"))
    assert m["split"]["rows"] == {"train": 2, "val": 1, "test": 1}
    assert m["reasons"] == {"unknown split": 1, "missing split": 1} and m["rows_in"] == 6


def test_a_run_with_other_dataset_settings_than_the_prepared_ones_is_refused(tmp_path: Path) -> None:
    """`jobs.train dataset.synthetic.users=1000` on a shop prepared with 300 users trained on the 300, recorded 1000
    in the registry, and said nothing."""
    from ecomray.data import shards

    small = cfg_for(tmp_path, "dataset=synthetic", "dataset.synthetic.users=60", "dataset.synthetic.items=40")
    prepare(small)
    assert shards.require(small)["rows_out"] > 0                            # the same settings: fine
    bigger = cfg_for(tmp_path, "dataset=synthetic", "dataset.synthetic.users=90", "dataset.synthetic.items=40")
    with pytest.raises(UserError, match=r"prepared with other dataset settings than this run's \(dataset.synthetic."
                                        r"users: now 90, prepared with 60\).*overwrite=true"):
        shards.require(bigger)
    relabelled = cfg_for(tmp_path, "dataset=synthetic", "dataset.synthetic.users=60", "dataset.synthetic.items=40",
                         "dataset.licence=mine")                            # not a setting that changes a row
    shards.require(relabelled)


def test_an_unknown_dedup_policy_is_refused(tmp_path: Path) -> None:
    """Only `quarantine` removed duplicates; any other word (`drop`) kept them all without a word."""
    src = write(tmp_path / "e.csv", MESSY)
    with pytest.raises(UserError, match=r"dataset.dedup='drop': use quarantine .* or keep"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "dataset.dedup=drop"))


def test_rerun_refuses_without_overwrite_and_never_mixes(tmp_path: Path) -> None:
    src = write(tmp_path / "e.csv", MESSY)
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.shards=4"))
    with pytest.raises(UserError, match="overwrite=true"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.shards=2", "overwrite=true"))
    files = sorted(os.listdir(tmp_path / "data" / "events" / "shards"))
    assert files == ["part-00000.parquet", "part-00001.parquet"]
    assert [p for p in os.listdir(tmp_path / "data") if p.startswith(".")] == [".events.lock"]  # no temp folders


def _hourly_logs(folder: Path, files: int = 24) -> list[str]:
    """Small CSV files as an hourly log dump writes them: the same header, ISO timestamps, some bad rows, and
    exact duplicates within and across files."""
    folder.mkdir()
    out = []
    for h in range(files):
        rows = ["user_id,item_id,event,ts,price,quantity"]
        for k in range(12):
            u, event = f"u{(h * 7 + k) % 9}", ("view", "click", "cart", "buy")[k % 4]   # "buy" is not allowed
            rows.append(f"{u},i{k % 5},{event},2026-01-01T{h:02d}:{k:02d}:00,{k % 3},{1 + k % 2}")
        rows.append(rows[1])                                       # a duplicate within the hour
        if h:
            rows.append(f"u1,i0,view,2026-01-01T{h - 1:02d}:00:00,0,1")   # a late row of the hour before
        out.append(write(folder / f"{h:02d}.csv", "\n".join(rows) + "\n"))
    return out


def _same_prepared(a: Path, b: Path) -> None:
    for f in sorted((a / "shards").glob("*.parquet")):
        assert pl.read_parquet(f).equals(pl.read_parquet(b / "shards" / f.name)), f.name
    assert pl.read_parquet(a / "quarantine.parquet").equals(pl.read_parquet(b / "quarantine.parquet"))
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["sources"] == mb["sources"]
    assert ma["hash"] == mb["hash"] or ma["engine"] != mb["engine"]    # the engine is part of the hash


@pytest.mark.parametrize("odd", [None, "header order", "epoch ts", "empty file", "malformed record"])
def test_small_files_validated_together_give_what_one_by_one_gives(tmp_path: Path, odd: str | None, capsys) -> None:
    """Many small files are staged as one scan (they took a sink each: 47 s for 2,000 files of 100 rows); any file
    that does not fit the group (another header, another timestamp format) sends the group back to one by one."""
    files = _hourly_logs(tmp_path / "logs")
    if odd == "header order":
        write(Path(files[5]), "item_id,user_id,event,ts,price,quantity\ni9,u1,view,2026-01-01T05:00:00,1,1\n")
    elif odd == "epoch ts":
        write(Path(files[5]), "user_id,item_id,event,ts,price,quantity\nu1,i9,view,1767247200,1,1\n")
    elif odd == "empty file":
        write(Path(files[5]), "")
    elif odd == "malformed record":
        write(Path(files[5]), "user_id,item_id,event,ts,price,quantity\nu1,i9,view,2026-01-01T05:00:00,1,1,extra\n")
    together = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}", "prepare.shards=3"))
    said = capsys.readouterr().out
    alone = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}", "prepare.shards=3",
                            f"paths.data={tmp_path / 'alone'}", "prepare.group_bytes=1"))
    _same_prepared(tmp_path / "data" / "events", tmp_path / "alone" / "events")
    assert together["rows_in"] == alone["rows_in"] == sum(s["rows"] for s in together["sources"])
    assert together["reasons"]["unknown event"] == 24 * 3 - (odd in ("header order", "epoch ts", "empty file",
                                                                      "malformed record")) * 3
    assert f"validated 24 files ({files[0]} .. {files[-1]})" in said
    if odd == "epoch ts":       # three runs of one format: files 0-4, file 5, files 6-23
        assert "their timestamp formats differ; validated in 3 runs of one format" in said
    else:
        assert ("could not be validated as one" in said) == (odd not in (None, "empty file")), said
    if odd in ("header order", "malformed record"):   # halves, until the odd file is in a group of 4 or fewer
        assert "trying each half" in said and "could not be validated as one" in said and "one by one instead" in said


def test_odd_files_only_cost_their_own_group(tmp_path: Path, capsys) -> None:
    """A JSONL file, a file named like a glob pattern and an empty gzip among many CSV files: the rest is still
    validated together, and nothing is lost or misread."""
    import gzip

    files = _hourly_logs(tmp_path / "logs")
    Path(files[7]).rename(tmp_path / "logs" / "07[1].csv")
    write(tmp_path / "logs" / "12.jsonl", '{"user_id": "u1", "item_id": "i1", "event": "view", "ts": "2026-01-01"}\n')
    with gzip.open(tmp_path / "logs" / "13.csv.gz", "wb"):
        pass
    together = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}", "prepare.shards=3"))
    said = capsys.readouterr().out
    alone = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}", "prepare.shards=3",
                            f"paths.data={tmp_path / 'alone'}", "prepare.group_bytes=1"))
    _same_prepared(tmp_path / "data" / "events", tmp_path / "alone" / "events")
    rows = {Path(s["path"]).name: s["rows"] for s in together["sources"]}
    assert rows["07[1].csv"] == 14 and rows["12.jsonl"] == 1 and rows["13.csv.gz"] == 0
    assert together["rows_in"] == alone["rows_in"] == 24 * 14 - 1 + 1
    assert "could not be validated as one" not in said


def _as_format(files: list[str], fmt: str) -> None:
    """The hourly CSV logs rewritten as typed Parquet (as a Spark job writes part files) or as JSONL, in place."""
    for f in files:
        df = pl.read_csv(f, infer_schema_length=None)
        if fmt == "parquet":
            df.write_parquet(f[: -len(".csv")] + ".parquet")
        else:
            df.write_ndjson(f[: -len(".csv")] + ".jsonl")
        os.remove(f)


PARQUET_ODD = {
    "column order": lambda df: df.select(reversed(df.columns)),                # the same schema: read together
    "price as text": lambda df: df.with_columns(pl.col("price").cast(pl.Utf8)),
    "no quantity": lambda df: df.drop("quantity"),
    "extra column": lambda df: df.with_columns(note=pl.lit("x")),
    "ts as datetime": lambda df: df.with_columns(pl.col("ts").str.to_datetime()),
}
JSONL_ODD = {
    "key order": '{"ts": "2026-01-01T05:00:00", "event": "view", "item_id": "i9", "user_id": "u1", "price": 1, '
                 '"quantity": 1}\n',
    "float quantity": '{"user_id": "u1", "item_id": "i9", "event": "view", "ts": "2026-01-01T05:00:00", "price": 1, '
                      '"quantity": 1.5}\n',
    "extra key": '{"user_id": "u1", "item_id": "i9", "event": "view", "ts": "2026-01-01T05:00:00", "price": 1, '
                 '"quantity": 1, "note": "x"}\n',
    "broken line": '{"user_id": "u1", "item_id": "i9", "event": "view", "ts": "2026-01-01T05:00:00", "price": 1, '
                   '"quantity": 1}\n{"user_id": "u1", "item_id\n',
    # the first file decides a multi-file JSON scan's fields: without a check, every file would lose its quantity
    "first file without quantity": '{"user_id": "u1", "item_id": "i9", "event": "view", "ts": "2026-01-01T05:00:00", '
                                   '"price": 1}\n',
    "quantity always null": '{"user_id": "u1", "item_id": "i9", "event": "view", "ts": "2026-01-01T05:00:00", '
                            '"price": 1, "quantity": null}\n',          # inferred as Null: read alike together
    "blank lines": '\n{"user_id": "u1", "item_id": "i9", "event": "view", "ts": "2026-01-01T05:00:00", "price": 1, '
                   '"quantity": 1}\n\n',
}


@pytest.mark.parametrize("fmt,odd", [("parquet", None), *(("parquet", k) for k in PARQUET_ODD),
                                     ("jsonl", None), *(("jsonl", k) for k in JSONL_ODD)])
def test_small_parquet_and_jsonl_files_validated_together_give_what_one_by_one_gives(
        tmp_path: Path, fmt: str, odd: str | None, capsys) -> None:
    """Spark's part files and JSONL dumps are many small files too. A group is read as one scan only when every
    file reads as it does alone: a Parquet schema or inferred JSON fields that differ send it back to smaller groups."""
    _as_format(_hourly_logs(tmp_path / "logs"), fmt)
    odd_file = tmp_path / "logs" / f"{'00' if odd and odd.startswith('first') else '05'}.{fmt}"
    if fmt == "parquet" and odd:
        PARQUET_ODD[odd](pl.read_parquet(odd_file)).write_parquet(odd_file)
    elif odd:
        write(odd_file, JSONL_ODD[odd])
    together = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}", "prepare.shards=3"))
    said = capsys.readouterr().out
    alone = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}", "prepare.shards=3",
                            f"paths.data={tmp_path / 'alone'}", "prepare.group_bytes=1"))
    _same_prepared(tmp_path / "data" / "events", tmp_path / "alone" / "events")
    assert together["rows_in"] == alone["rows_in"] == sum(s["rows"] for s in together["sources"]) > 24 * 13
    assert f"validated 24 files ({tmp_path / 'logs' / '00'}.{fmt} .. {tmp_path / 'logs' / '23'}.{fmt})" in said
    fits = odd in (None, "column order", "key order", "quantity always null", "blank lines")
    assert ("could not be validated as one" in said) == (not fits), said
    if not fits:
        assert "one by one instead" in said


def _spark_output(root: Path) -> None:
    """A folder as Spark's `df.write.partitionBy("event", "category").parquet(root)` leaves it: the partition
    columns only in the folder names (values %-escaped, a null as Hive's default partition), a `_SUCCESS` marker,
    `.crc` files, a `_temporary/` folder; and an `archive/` folder beside the data that is not a partition."""
    import datetime as dt

    parts = [("view", "c1"), ("view", "c%2F2"), ("click", "c1"), ("buy", "c1"), ("__HIVE_DEFAULT_PARTITION__", "c1")]
    for k, (event, category) in enumerate(parts):
        folder = root / f"event={event}" / f"category={category}"
        folder.mkdir(parents=True)
        for f in range(3):
            pl.DataFrame({"user_id": [f"u{(k + f + j) % 4}" for j in range(5)], "item_id": [f"i{j}" for j in range(5)],
                          "ts": [dt.datetime(2026, 1, 1 + k, f, j) for j in range(5)], "price": [1.0] * 5}
                         ).write_parquet(folder / f"part-{f:05d}-abc.snappy.parquet")
            write(folder / f".part-{f:05d}-abc.snappy.parquet.crc", "crc")
    write(root / "_SUCCESS", "")
    (root / "_temporary" / "0").mkdir(parents=True)
    pl.DataFrame({"user_id": ["ghost"]}).write_parquet(root / "_temporary" / "0" / "part-x.parquet")
    (root / "archive").mkdir()
    pl.DataFrame({"user_id": ["old"]}).write_parquet(root / "archive" / "old.parquet")


@pytest.mark.parametrize("group_bytes", [None, 1], ids=["together", "one by one"])
def test_hive_partition_folders_become_columns(tmp_path: Path, group_bytes: int | None) -> None:
    """Spark's and Hive's partitioned output (`event=view/category=c1/part-*.parquet`) used to be "no input files"
    (only the folder's own files were read), and a glob over it lost the partition columns."""
    _spark_output(tmp_path / "events")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'events'}", "prepare.shards=2",
                        *([f"prepare.group_bytes={group_bytes}"] if group_bytes else [])))
    assert len(m["sources"]) == 15 and all("/event=" in s["path"] for s in m["sources"])   # no ghost, no archive
    assert m["rows_in"] == 75 and m["reasons"] == {"unknown event": 15, "missing event": 15}
    rows = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet")
    assert sorted(rows.unique(["event", "category"]).select("event", "category").rows()) == [
        ("click", "c1"), ("view", "c/2"), ("view", "c1")]
    q = pl.read_parquet(tmp_path / "data" / "events" / "quarantine.parquet")
    assert set(q.filter(pl.col("reason") == "unknown event")["event"]) == {"buy"}
    if group_bytes is None:     # validated together: the same dataset as one by one
        alone = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'events'}", "prepare.shards=2",
                                f"paths.data={tmp_path / 'alone'}", "prepare.group_bytes=1"))
        _same_prepared(tmp_path / "data" / "events", tmp_path / "alone" / "events")
        assert alone["hash"] == m["hash"]
    # a glob over the partitions keeps their columns too; a file's own column wins over its folder's name
    own = tmp_path / "events" / "event=view" / "category=c1" / "part-00009-own.csv"
    write(own, "user_id,item_id,event,ts\nu1,i1,click,2026-01-09T00:00:00\n")
    write(own.with_name("part-00010-bad.csv"),     # a malformed record: read record by record, still partitioned
          "user_id,item_id,ts\nu1,i7,2026-01-10T00:00:00\nu1,i8,2026-01-10T00:00:00,x,y\n")
    g = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path='{tmp_path / 'events'}/event=view/*/*'",   # quoted: Hydra reads = as an override
                        "prepare.shards=1", f"paths.data={tmp_path / 'glob'}"))
    rows = pl.read_parquet(tmp_path / "glob" / "events" / "shards" / "*.parquet")
    assert g["rows_in"] == 33 and rows.filter(pl.col("item_id") == "i1", pl.col("ts").dt.day() == 9)["event"].to_list() == ["click"]
    assert rows.filter(pl.col("item_id") == "i7")["event"].to_list() == ["view"] and g["rows_quarantined"] == 1
    assert set(rows["event"]) == {"view", "click"} and set(rows["category"]) == {"c1", "c/2"}


def test_partition_folder_names_and_links(tmp_path: Path) -> None:
    """Odd partition names are read as Hive writes them, and a link back up the tree is not walked forever."""
    from ecomray.data.adapters.files import list_files, partition_values

    assert partition_values("/d/a=1/b=x%3Dy/c=/e=__HIVE_DEFAULT_PARTITION__/notkey/f.csv") == {
        "a": "1", "b": "x=y", "c": "", "e": None}
    assert partition_values("/d/k=1/k=2/f.csv") == {"k": "2"}           # the innermost folder wins
    leaf = tmp_path / "ev" / "a=1"
    leaf.mkdir(parents=True)
    write(leaf / "f.csv", "user_id\n")
    (leaf / "b=2").symlink_to("..")                                      # a=1/b=2 -> ev
    assert list_files(str(tmp_path / "ev")) == [str(leaf / "f.csv")]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_a_sources_own_file_and_row_columns_are_not_taken_for_prepares(tmp_path: Path, fmt: str) -> None:
    """Re-preparing exported shards (they hold `_file`, `_row` and `split`): a source's own `_row` used to be taken
    as the row's position when a file was staged alone, and replaced by the real one when files were grouped, so
    the two ways put another row last (leave-one-out's test row). Prepare's own names are dropped from sources."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for f in range(6):
        df = pl.DataFrame({"_file": [9] * 4, "_row": [3, 2, 1, 0], "user_id": ["u1"] * 4,
                           "item_id": [f"i{f}{k}" for k in range(4)], "event": ["view"] * 4,
                           "__ecomray_source_path": ["x"] * 4, "ts": ["2026-01-01T00:00:00"] * 4})
        getattr(df, f"write_{'ndjson' if fmt == 'jsonl' else fmt}")(logs / f"{f}.{fmt}")
    if fmt == "csv":   # and a malformed record, so one file is read record by record
        write(logs / "5.csv", (logs / "5.csv").read_text() + "9,0,u1,i9,view,x,2026-01-01T00:00:00,extra\n")
    together = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={logs}", "prepare.shards=1"))
    alone = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={logs}", "prepare.shards=1",
                            f"paths.data={tmp_path / 'alone'}", "prepare.group_bytes=1"))
    _same_prepared(tmp_path / "data" / "events", tmp_path / "alone" / "events")
    rows = pl.read_parquet(tmp_path / "data" / "events" / "shards" / "*.parquet")
    assert rows.filter(pl.col("split") == "test").select("_file", "_row", "item_id").rows() == [(5, 3, "i53")]
    assert together["rows_in"] == alone["rows_in"] == 24 + (fmt == "csv")
    assert together["rows_quarantined"] == (fmt == "csv")       # the malformed record


def test_partition_folders_as_spark_names_them_globs_and_renames(tmp_path: Path) -> None:
    """Review findings: a glob matching partition folders (`.../event=*`) failed on the folders ("unknown file
    format") and `_SUCCESS`; a `_key=value` folder (a partition to Spark) was skipped; a folder named after an
    internal column was taken for it; a renamed file column collided with a partition column; `%FF` became U+FFFD."""
    _spark_output(tmp_path / "events")
    glob_in = f"dataset.path='{tmp_path / 'events'}/event=*'"      # folders the glob matches are read as folders
    g = prepare(cfg_for(tmp_path, "dataset=events", glob_in, "prepare.shards=1"))
    f = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'events'}", "prepare.shards=1",
                        f"paths.data={tmp_path / 'folder'}"))
    assert [s["path"] for s in g["sources"]] == [s["path"] for s in f["sources"]] and g["rows_in"] == 75
    odd = tmp_path / "odd"
    for folder, cols in (("_event=view", {"event": ["cart"]}), ("event=view/%5Frow=7", {}),
                         ("event=view/r=1", {"evt": ["click"]})):
        (odd / folder).mkdir(parents=True)
        pl.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "ts": ["2026-01-01T00:00:00"], **cols}
                     ).write_parquet(odd / folder / "p.parquet")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={odd}", "prepare.shards=1", "dataset.columns={evt: event}",
                        f"paths.data={tmp_path / 'odd_out'}"))
    rows = pl.read_parquet(tmp_path / "odd_out" / "events" / "shards" / "*.parquet").sort("_file")
    assert m["rows_in"] == 3 and m["rows_quarantined"] == 0
    assert rows["event"].to_list() == ["cart", "view", "click"] and rows["_row"].to_list() == [0, 0, 0]
    (odd / "event=%FF").mkdir()
    write(odd / "event=%FF" / "e.csv", "user_id\n")
    with pytest.raises(UserError, match=r"'event=%FF' %-escapes bytes that are not UTF-8"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={odd}", f"paths.data={tmp_path / 'ff'}"))


@pytest.mark.parametrize("files", [1, 6], ids=["one file", "small files together"])
def test_a_record_with_extra_fields_is_caught_when_the_file_has_columns_the_schema_does_not_use(
        tmp_path: Path, files: int) -> None:
    """Polars checks a record's field count only when it reads every column: with `note` (not in the schema)
    pruned from the scan, `u1,i2,view,2026-01-02,1,Blue, large` was a good row without a word."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for f in range(files):
        write(logs / f"{f}.csv", "user_id,item_id,event,ts,price,note\n"
                                 f"u{f},i1,view,2026-01-01,1,ok\nu{f},i2,view,2026-01-02,1,Blue, large\n")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={logs}"))
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"]) == (2 * files, files, files)
    assert list(m["reasons"]) == ["malformed CSV record at line 3: 7 fields, expected 6"]


def test_extra_fields_are_caught_through_renames_and_without_a_header(tmp_path: Path) -> None:
    """Second review: a schema column renamed away (`price` -> `list_price`) still counted as read, so the extra
    field went unnoticed; and the record-by-record reader named header-less columns column_1.. where Polars says
    column_0.., so a file sent to it had every value shifted by one column."""
    src = write(tmp_path / "a.csv", "user_id,item_id,event,ts,price,sale\nu1,i1,view,2026-01-01,9,5\n"
                                    "u2,i2,view,2026-01-01,9,5,EXTRA\n")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "dataset.columns={price: list_price, sale: price}"))
    assert (m["rows_out"], m["rows_quarantined"]) == (1, 1)
    src = write(tmp_path / "b.csv", "7,u1,i1,view,2026-01-01,1\n8,u2,i2,view,2026-01-02,1\n9,u3,i3,view,2026-01-03,1,x\n")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "dataset.csv.has_header=false",
                        "dataset.columns={column_1: user_id, column_2: item_id, column_3: event, column_4: ts, "
                        "column_5: price}", f"paths.data={tmp_path / 'b'}"))
    assert (m["rows_out"], m["rows_quarantined"]) == (2, 1) and list(m["reasons"])[0].startswith("malformed CSV")
    rows = pl.read_parquet(tmp_path / "b" / "events" / "shards" / "*.parquet").sort("_row")
    assert rows.select("user_id", "event").rows() == [("u1", "view"), ("u2", "view")]
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "dataset.csv.has_header=false",
                        "dataset.columns={column_1: user_id, column_2: item_id, column_3: event, column_4: ts, "
                        "column_5: price}", "dataset.csv.check_width=false", f"paths.data={tmp_path / 'c'}"))
    assert m["rows_out"] == 3      # the knob: only the schema's columns are read, and the extra field goes unseen


def test_a_folder_and_a_glob_over_it_read_the_same_files_in_the_same_order(tmp_path: Path) -> None:
    """Second review: a glob sorted its files as text (`src=a-b/x` before `src=a/x`) where the folder walk goes
    by name at each level, so the two chose different duplicates to quarantine; a file reached through a link was
    read twice (and a link back up, under `**`, many times)."""
    from ecomray.data.adapters.files import list_files

    root = tmp_path / "in"
    for part in ("src=a", "src=a-b", "src=a%2Fc"):
        (root / part).mkdir(parents=True)
        write(root / part / "x.csv", "user_id,item_id,event,ts\nu1,i1,view,2026-01-01\n")
    (root / "latest").symlink_to(root / "src=a-b")
    (root / "src=a" / "back").symlink_to(root)
    folder = list_files(str(root))
    assert [Path(f).parent.name for f in folder] == ["src=a", "src=a%2Fc", "src=a-b"]
    assert list_files(f"{root}/*/*.csv") == list_files(f"{root}/**/*.csv") == list_files(f"{root}/*") == folder


def test_a_jsonl_file_of_blank_lines_is_an_empty_file(tmp_path: Path) -> None:
    """Among many files it adds no rows (as a 0-byte file does; it used to abort the prepare with "required
    columns missing"); alone it is "the file is empty"."""
    files = _hourly_logs(tmp_path / "logs", files=3)
    _as_format(files, "jsonl")
    write(tmp_path / "logs" / "03.jsonl", "\n  \n\n")
    m = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}"))
    assert [s["rows"] for s in m["sources"]] == [13, 14, 14, 0]
    with pytest.raises(UserError, match="03.jsonl: the file is empty"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs' / '03.jsonl'}",
                        f"paths.data={tmp_path / 'one'}"))


def test_the_ray_engine_validates_small_files_together_too(tmp_path: Path, capsys) -> None:
    _hourly_logs(tmp_path / "logs")
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}", "prepare.shards=3",
                    "prepare.engine=ray", "prepare.ray_num_cpus=2"))
    assert "validated source groups 1/1" in capsys.readouterr().out
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'logs'}", "prepare.shards=3",
                    f"paths.data={tmp_path / 'alone'}", "prepare.group_bytes=1"))
    _same_prepared(tmp_path / "data" / "events", tmp_path / "alone" / "events")


def test_a_ray_tasks_user_error_is_the_runs_one_line(tmp_path: Path) -> None:
    """With prepare.engine=ray a source's error came wrapped in Ray's task traceback (`ray::stage_task() ...`)."""
    src = write(tmp_path / "in.csv", "user_id,event,ts\nu1,view,2026-01-01\n")
    with pytest.raises(UserError) as err:
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.engine=ray",
                        "prepare.ray_num_cpus=2"))
    assert str(err.value) == (f"{src}: required column(s) ['item_id'] missing (found ['user_id', 'event', 'ts']); "
                              f"map them with dataset.columns={{source_name: canonical_name}}")


@pytest.mark.parametrize("text", [MESSY, RAGGED], ids=["messy", "malformed records"])
def test_gzip_compressed_csv_prepares_as_the_plain_file_does(tmp_path: Path, text: str) -> None:
    """Exported logs are often gzipped: Polars streams them, and the record-by-record reader reads them too."""
    import gzip

    (tmp_path / "plain").mkdir()
    plain = write(tmp_path / "plain" / "e.csv", text)
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "e.csv.gz", "wt") as fh:
        fh.write(text)
    a = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={plain}", "prepare.shards=2",
                        f"paths.data={tmp_path / 'a'}"))
    b = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={tmp_path / 'gz'}", "prepare.shards=2",
                        f"paths.data={tmp_path / 'b'}"))
    assert (a["rows_in"], a["rows_out"], a["reasons"]) == (b["rows_in"], b["rows_out"], b["reasons"])
    for f in ("shards/part-00000.parquet", "shards/part-00001.parquet"):
        assert pl.read_parquet(tmp_path / "a" / "events" / f).equals(pl.read_parquet(tmp_path / "b" / "events" / f))
    qa, qb = (pl.read_parquet(tmp_path / d / "events" / "quarantine.parquet").drop("source") for d in ("a", "b"))
    assert qa.equals(qb)


def test_gzip_with_bad_utf8_names_the_line(tmp_path: Path) -> None:
    import gzip

    src = tmp_path / "e.csv.gz"
    with gzip.open(src, "wb") as fh:
        fh.write(b"user_id,item_id,event,ts\nu1,i1,view,2026-01-01\nu2,\xff\xfe,view,2026-01-01\n")
    with pytest.raises(UserError, match="invalid UTF-8 at line 3"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    with pytest.raises(UserError, match="unknown file format 'x.parquet.gz'"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={write(tmp_path / 'x.parquet.gz', 'x')}"))


def test_timestamp_formats_detected_per_file_at_once_match_one_by_one() -> None:
    files = {0: ["2026-01-01T00:00:00", None, " 2026-01-02T10:00:00.5 "], 1: ["1767225600", "1767225600.25"],
             2: ["2026-01-01", ""], 3: ["2026-01-02 10:00:00"], 4: [None, ""], 5: ["2026-01-01T00:00:00+08:00", "Z"],
             6: ["2026-01-02T10:00:00Z"], 7: ["yesterday"]}
    frame = pl.DataFrame({"f": [k for k, v in files.items() for _ in v], "ts": [x for v in files.values() for x in v]})
    at_once = S.detect_ts_formats(frame, "f", "ts")
    assert at_once == {k: S.detect_ts_format(pl.Series(v, dtype=pl.Utf8)) for k, v in files.items()}
    assert at_once[0] == "iso" and at_once[1] == "epoch" and at_once[4] == "mixed" and at_once[7] == "mixed"


def test_a_killed_runs_work_folder_is_removed_by_the_next_run(tmp_path: Path, capsys) -> None:
    """A SIGKILL skips every cleanup: its `.events.tmp-*` (staged data, a partial output) used to stay forever."""
    src = write(tmp_path / "e.csv", MESSY)
    left = tmp_path / "data" / ".events.tmp-killed"
    (left / "stage").mkdir(parents=True)
    (left / "stage" / "x.parquet").write_bytes(b"0" * 1000)
    other = tmp_path / "data" / ".shoppers.tmp-live"      # another dataset's run: not this run's to judge
    other.mkdir()
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    assert not left.exists() and other.exists()
    assert f"removed {left}: left by a killed run" in capsys.readouterr().out


def test_one_prepare_of_a_dataset_at_a_time(tmp_path: Path, capsys) -> None:
    """A second run waits for the first (saying for whom); with if_missing (what a job that needs the data uses)
    it then returns the dataset the first run made instead of preparing it again."""
    import fcntl
    import threading
    import time

    src = write(tmp_path / "e.csv", MESSY)
    cfg = cfg_for(tmp_path, "dataset=events", f"dataset.path={src}")
    first = prepare(cfg)
    (tmp_path / "data").mkdir(exist_ok=True)
    got: dict = {}
    with open(tmp_path / "data" / ".events.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)          # a run in progress
        held.truncate(0)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        t = threading.Thread(target=lambda: got.update(m=prepare(cfg, if_missing=True)))
        t.start()
        said, deadline = "", time.monotonic() + 60
        while "waiting" not in said and time.monotonic() < deadline:
            said += capsys.readouterr().out
            time.sleep(0.05)
        assert "another prepare of events is running (pid 1 on elsewhere); waiting for it to finish" in said
        assert t.is_alive() and "m" not in got    # waiting, not running beside it
    t.join(30)
    assert got["m"]["hash"] == first["hash"] and got["m"]["created_at"] == first["created_at"]


@pytest.mark.parametrize("with_ray,rewrapped", [(False, False), (True, False), (False, True)],
                         ids=["before Ray", "after ray.init", "exit rewrapped"])
def test_sigterm_runs_a_jobs_cleanups(tmp_path: Path, with_ray: bool, rewrapped: bool) -> None:
    """`ray job stop`, a scheduler or `kill` send SIGTERM; Python's default dies without running `finally`. After
    `ray.init` the driver's C++ core worker had taken SIGTERM over: a stack dump and an abort (exit 134), and the
    cleanups skipped (a batch scoring's work folder was left). Ray Train's `fit` turns the handler's SystemExit into
    its own error (`rewrapped`): jobs.train exited 1, not 143."""
    import select
    import signal
    import subprocess
    import sys

    work = tmp_path / "work"
    script = (
        "import os, shutil, sys, time\n"
        "from ecomray.runtime import user_errors\n"
        "@user_errors\n"
        "def job():\n"
        + ("    from ecomray.runtime import init_ray\n    init_ray(num_cpus=1, dashboard=False)\n" if with_ray else "")
        + f"    os.makedirs({str(work)!r})\n"
        "    try:\n"
        "        print('ready', flush=True)\n"
        + ("        try:\n            time.sleep(60)\n        except SystemExit as err:\n"
           "            raise RuntimeError('the run failed') from err\n" if rewrapped else "        time.sleep(60)\n")
        + "    finally:\n"
        f"        shutil.rmtree({str(work)!r})\n"
        "job()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    if not select.select([proc.stdout], [], [], 60)[0]:
        proc.kill()
        pytest.fail("the child never said it was ready")
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped (SIGTERM)" in err, err[-2000:]
    assert "SIGTERM received" not in err and not work.exists()


def test_ctrl_c_is_one_line_after_the_cleanups(tmp_path: Path) -> None:
    """Ctrl-C in a job printed a KeyboardInterrupt traceback (exit 1)."""
    import subprocess
    import sys

    script = ("from ecomray.runtime import user_errors\n@user_errors\ndef job():\n    raise KeyboardInterrupt\njob()\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 130 and p.stderr.strip() == "ecomray: interrupted (Ctrl-C)"


def test_a_data_folder_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    src = write(tmp_path / "e.csv", MESSY)
    with pytest.raises(UserError, match="paths.data: cannot create"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", f"paths.data={tmp_path / 'file' / 'sub'}"))


@pytest.mark.parametrize("content,match", [
    (None, "input not found"),
    ("", "empty"),
    ("user_id,event,ts\nu1,view,2026-01-01\n", r"required column\(s\) \['item_id'\] missing"),
    (b"user_id,item_id,event,ts\nu1,i1,view,2026-01-01\nu2,\xff\xfe,view,2026-01-01\n", "invalid UTF-8 at line 3"),
])
def test_whole_input_errors_are_one_clear_message(tmp_path: Path, content, match: str) -> None:
    src = tmp_path / "in.csv"
    if content is not None:
        write(src, content)
    with pytest.raises(UserError, match=match) as err:
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    assert str(src) in str(err.value)


def test_a_planned_split_with_every_row_quarantined_is_the_clear_error(tmp_path: Path) -> None:
    """No good row means no split plan: pass 2 failed with KeyError 'plan_file' (stratified) or 'column' (temporal:
    a wrong ts_format quarantines every row) instead of saying why."""
    with pytest.raises(UserError, match=r"synthetic_reviews: all 2 rows were quarantined"):
        prepare(cfg_for(tmp_path, "dataset=synthetic_reviews", "dataset.synthetic.rows=0"))
    src = write(tmp_path / "e.csv", MESSY)
    with pytest.raises(UserError, match=r"events: all \d+ rows were quarantined"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "dataset.split.strategy=temporal",
                        "dataset.ts_format=%d/%m/%Y"))


def test_links_nowhere_and_files_that_are_not_files_are_named_as_such(tmp_path: Path) -> None:
    """A loop of links and a dangling link used to be "input not found" with no word of the link; /dev/zero was
    "the file is empty" (its size is 0) and a FIFO would be read once by validation and found empty by the next."""
    loop, dangling, fifo = tmp_path / "loop.csv", tmp_path / "dangling.csv", tmp_path / "pipe.csv"
    loop.symlink_to(loop)
    dangling.symlink_to(tmp_path / "gone.csv")
    os.mkfifo(fifo)
    for src, says in ((loop, r"symbolic link to '.*loop.csv', which loops back on itself"),
                      (dangling, r"symbolic link to '.*gone.csv', which does not exist"),
                      (fifo, "is not a regular file"), (Path("/dev/zero"), "is not a regular file")):
        with pytest.raises(UserError, match=says):
            prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))


def test_unknown_format_is_a_user_error(tmp_path: Path) -> None:
    src = write(tmp_path / "in.xlsx", "x")
    with pytest.raises(UserError, match="unknown file format"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))


def test_unknown_engine_is_refused_before_any_work(tmp_path: Path) -> None:
    src = write(tmp_path / "e.csv", MESSY)
    with pytest.raises(UserError, match="unknown prepare.engine 'spark'"):
        prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.engine=spark"))
    assert not (tmp_path / "data").exists()  # refused before any folder was made


def test_progress_lines_report_each_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write(tmp_path / "e.csv", MESSY)
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.shards=3"))
    out = capsys.readouterr().out
    assert f"validated {src}: 10 rows" in out
    assert "sorted, split and wrote shards 3/3" in out  # the last shard is always reported


def test_stable_shard_hash_is_xxhash64() -> None:
    import xxhash

    ids = ["u1", "user-42", "商品"]
    got = pl.DataFrame({"user_id": ids}).select(S.shard_of({"key": "user_id"}, 7)).to_series().to_list()
    assert got == [xxhash.xxh64_intdigest(i.encode()) % 7 for i in ids]


def test_job_cli_exits_2_with_message(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "jobs.prepare", "dataset=events", f"dataset.path={tmp_path}/nope.csv",
                        f"paths.root={tmp_path}"], cwd=root, capture_output=True, text=True)
    assert p.returncode == 2
    assert "input not found" in p.stderr and "Traceback" not in p.stderr


def test_manifest_contents(tmp_path: Path) -> None:
    src = write(tmp_path / "e.csv", MESSY)
    prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    m = json.loads((tmp_path / "data" / "events" / "manifest.json").read_text())
    for key in ("rows_in", "rows_out", "rows_quarantined", "reasons", "schema", "shards", "sources", "split",
                "ecomray_version", "hash", "licence"):
        assert key in m
    assert m["rows_in"] == m["rows_out"] + m["rows_quarantined"]
    st = os.stat(src)
    assert m["sources"] == [{"path": src, "rows": 10, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}]


def test_the_hash_changes_with_the_data_not_only_with_the_counts(tmp_path: Path) -> None:
    """The manifest hash (what train, tune and evaluate compare to tell one preparation from another) named the
    sources' paths and the counts: the same file edited in place (every item id changed) or read with another
    ts_format kept the hash, so a re-prepare mid-run or an evaluation on edited data passed as the same data."""
    rows = "".join(f"u{k % 3},i{k},view,2026-01-0{1 + k % 5}T00:00:0{k % 10}\n" for k in range(30))
    src = write(tmp_path / "e.csv", "user_id,item_id,event,ts\n" + rows)
    first = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}"))
    same = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "overwrite=true"))
    assert same["hash"] == first["hash"]                          # the same file, read the same way
    time.sleep(0.01)
    write(tmp_path / "e.csv", "user_id,item_id,event,ts\n" + rows.replace(",i", ",j"))
    edited = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "overwrite=true"))
    assert edited["rows_out"] == first["rows_out"] and edited["hash"] != first["hash"]
    other = prepare(cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "overwrite=true",
                            "dataset.ts_format=iso"))
    assert other["hash"] != edited["hash"]


def test_a_damaged_shard_set_is_one_clear_error(tmp_path: Path) -> None:
    """Readers check the manifest's shard list against the disk (a deleted or cut file, a partial copy) and say
    which files and the command that prepares the dataset again, before any Parquet error."""
    from ecomray.data import shards

    src = write(tmp_path / "e.csv", MESSY)
    cfg = cfg_for(tmp_path, "dataset=events", f"dataset.path={src}", "prepare.shards=2")
    m = prepare(cfg)
    folder = shards.dataset_dir(cfg)
    assert [s["bytes"] for s in m["shards"]] == [os.path.getsize(f) for f in shards.shard_files(folder)]
    first, second = map(Path, shards.shard_files(folder))
    first.write_bytes(first.read_bytes()[:-10])
    second.unlink()
    with pytest.raises(UserError, match=r"not as prepared: shards/part-00000.parquet \([\d,]+ bytes, prepared "
                                        r"[\d,]+\), shards/part-00001.parquet \(missing\); .*jobs.prepare "
                                        r"dataset=events"):
        shards.scan(cfg)
    (Path(folder) / "manifest.json").write_text("{")
    with pytest.raises(UserError, match=r"manifest.json is damaged .*jobs.prepare dataset=events.* overwrite=true"):
        shards.scan(cfg)
    with pytest.raises(UserError) as err:     # the command to run is this run's: its root and its input files
        shards.require(cfg)
    command = f"python -m jobs.prepare dataset=events paths.root={tmp_path} dataset.path={src} overwrite=true"
    assert command in str(err.value)


def test_console_script_runs_the_same_job(tmp_path: Path) -> None:
    import subprocess
    import sys

    from jobs import cli

    src = write(tmp_path / "e.csv", MESSY)
    root = Path(__file__).resolve().parents[1]
    code = f"import sys; sys.argv = ['ecomray', 'prepare', 'dataset=events', 'dataset.path={src}', 'paths.root={tmp_path}']; " \
           "from jobs.cli import main; main()"
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "quarantined        7" in p.stdout
    assert "prepare" in cli.JOBS


@pytest.mark.parametrize("fmt", ["iso", "iso_space"])
def test_timestamp_fast_path_parses_exactly_like_the_general_format(fmt: str) -> None:
    """The fixed-width fast path is taken only by values that fit it as they are; every value (padded, other fraction
    lengths, leap day, out of range, garbage, empty) parses to the same instant or null as under the general format."""
    import random

    sep = "T" if fmt == "iso" else " "
    rng = random.Random(7)
    values = [f"2024-05-0{d}{sep}10:00:00.12345{d}" for d in range(1, 4)]     # fit the 6-digit fraction layout
    for _ in range(400):
        base = f"20{rng.randint(10, 30):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}{sep}" \
               f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
        frac = rng.choice(["", f".{rng.randint(0, 999999):06d}", f".{rng.randint(0, 999):03d}", f".{rng.randint(0, 9)}"])
        pad = rng.choice(["", "", " ", "\t"])
        values.append(pad + base + frac + rng.choice(["", "", pad]))
    values += ["2024-02-29" + sep + "12:00:00.000001", "2023-02-29" + sep + "12:00:00", "2024-13-01" + sep + "00:00:00",
               "garbage", "", None, "2024-01-01" + sep + "24:00:00", "2024-01-01" + sep + "00:00:00.1234567"]
    col = pl.Series("ts", values, dtype=pl.Utf8)
    layout = S.detect_fast_layout(col.head(3), fmt)
    assert layout is not None                                   # the first values fit one, so the fast path is on
    df = col.to_frame()
    fast = df.select(S._parse_datetime(pl.col("ts"), pl.Utf8, fmt, layout)).to_series()
    general = df.select(S._parse_datetime(pl.col("ts"), pl.Utf8, fmt, None)).to_series()
    assert fast.to_list() == general.to_list()
    assert fast.null_count() >= 4                               # garbage, empty, None, impossible dates stay null


def test_leave_one_out_by_neighbours_matches_the_window_definition() -> None:
    """The shift-based split equals `pos == n-1 / n-2 with n >= min_rows` per key (window functions), nulls included."""
    import random

    from ecomray.data.prepare import _leave_one_out

    rng = random.Random(3)
    for _ in range(200):
        keys = sorted((rng.choice([None, "a", "b", "c"]) for _ in range(rng.randint(0, 25))),
                      key=lambda k: (k is not None, k or ""))
        df = pl.DataFrame({"k": keys}, schema={"k": pl.Utf8})
        for min_rows in range(5):
            n, pos = pl.len().over("k"), pl.int_range(pl.len()).over("k")
            enough = n >= min_rows
            window = (pl.when(enough & (pos == n - 1)).then(pl.lit("test"))
                        .when(enough & (pos == n - 2)).then(pl.lit("val")).otherwise(pl.lit("train")))
            expected = df.select(window.alias("s"))["s"].to_list()
            assert df.select(_leave_one_out("k", min_rows).alias("s"))["s"].to_list() == expected, (keys, min_rows)


def test_sorted_takes_the_stable_path_only_in_source_order() -> None:
    from ecomray.data.prepare import _sorted

    schema = {"key": "u", "order_by": ["t"], "columns": {"u": {}, "t": {"type": "int"}}}
    df = pl.DataFrame({"_file": [0, 0, 0, 1, 1, 1], "_row": [0, 1, 2, 0, 1, 2],
                       "u": ["b", "a", "b", "a", "b", "a"], "t": [1, 1, 1, 0, 1, 1]})
    full = ["u", "t", "_file", "_row"]
    assert _sorted(df, schema).equals(df.sort(full))
    shuffled = df[[4, 1, 5, 0, 3, 2]]                            # not in source order: every column is sorted on
    assert _sorted(shuffled, schema).equals(df.sort(full))
    assert _sorted(shuffled, schema).select("_file", "_row").rows() == [(1, 0), (0, 1), (1, 2), (0, 0), (0, 2), (1, 1)]


@pytest.mark.parametrize("seed", range(40))
def test_sorted_equals_the_full_sort_on_any_rows(seed: int) -> None:
    """The fast paths (a text key ranked through an Enum, its time order checked instead of sorted on) give exactly
    the full sort's frame: null keys and times, ties, keys whose rows are out of time order, a float or missing
    `order_by`, an integer key, rows in and out of source order."""
    import random

    from ecomray.data.prepare import _sorted

    rng = random.Random(seed)
    n = rng.randint(2, 60)
    kind = rng.choice(["str", "int"])
    keys = [None if rng.random() < 0.1 else rng.choice("abcde") for _ in range(n)]
    keys = [k if k is None or kind == "str" else "abcde".index(k) for k in keys]
    in_time = rng.random() < 0.6      # each key's rows already in time order, as most logs are
    t_kind = rng.choice(["int", "float", "none"])
    t = sorted(rng.randint(0, 5) for _ in range(n)) if in_time else [rng.randint(0, 5) for _ in range(n)]
    t = [None if rng.random() < 0.1 else v for v in t]
    if t_kind == "float":
        t = [None if v is None else rng.choice([float(v), -0.0, 0.0, float("nan")]) for v in t]
    files = sorted(rng.randint(0, 2) for _ in range(n))
    df = pl.DataFrame({"_file": pl.Series(files, dtype=pl.Int32), "_row": pl.Series(range(n), dtype=pl.Int64),
                       "u": keys, "t": t}, strict=False)
    if rng.random() < 0.3:
        df = df.sample(fraction=1.0, shuffle=True, seed=seed)
    order_by = [] if t_kind == "none" else ["t"]
    schema = {"key": "u", "order_by": order_by, "columns": {"u": {}, "t": {}}}
    full = ["u", *order_by, "_file", "_row"]
    assert _sorted(df, schema).equals(df.sort(full)), df



def test_a_relative_dataset_path_is_found_from_the_working_folder_too(tmp_path: Path, monkeypatch) -> None:
    """`dataset.path=events.csv`, typed next to the file, was looked for under paths.datasets only: "input not
    found: ../shared/datasets/events.csv"."""
    (tmp_path / "here").mkdir()
    write(tmp_path / "here" / "mine.csv", "user_id,item_id,event,ts\nu1,i1,view,2026-01-01\n")
    monkeypatch.chdir(tmp_path / "here")
    m = prepare(cfg_for(tmp_path, "dataset=events", "dataset.path=mine.csv"))
    assert m["rows_out"] == 1 and m["sources"][0]["path"] == str(tmp_path / "here" / "mine.csv")


def test_the_prepare_hint_never_holds_an_unset_path() -> None:
    """`dataset=events` with no dataset.path gave `... dataset.path='???'` as the command to run."""
    from ecomray.config import compose as compose_job
    from ecomray.data.shards import prepare_command

    assert prepare_command(compose_job("train", ["dataset=events", "paths.root=/tmp/r"])) == \
        "python -m jobs.prepare dataset=events paths.root=/tmp/r"
