"""Adapters against the real files (row counts as in each SOURCE.md), and engine equivalence."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ecomray.data.prepare import run as prepare
from tests.test_prepare import DATASETS, cfg_for

pytestmark = pytest.mark.skipif(not Path(DATASETS).is_dir(), reason="public datasets not found (set ECOMRAY_DATASETS)")


@pytest.mark.parametrize("name,rows,users,items", [
    ("amazon_beauty", 198_502, 22_363, 12_101),
    ("amazon_sports", 296_337, 35_598, 18_357),
    ("ml100k", 100_000, 943, 1_682),
])
def test_adapter_counts_match_source_md(tmp_path: Path, name: str, rows: int, users: int, items: int) -> None:
    m = prepare(cfg_for(tmp_path, f"dataset={name}"))
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"]) == (rows, rows, 0)
    df = pl.read_parquet(tmp_path / "data" / name / "shards" / "*.parquet", columns=["user_id", "item_id", "split"])
    assert df["user_id"].n_unique() == users and df["item_id"].n_unique() == items
    # leave-one-out: every user (5-core, so >= 3 rows) has exactly one val and one test row
    assert m["split"]["rows"]["test"] == users and m["split"]["rows"]["val"] == users
    assert m["research_only"] is True


def test_amazon_sequence_order_is_the_line_order(tmp_path: Path) -> None:
    prepare(cfg_for(tmp_path, "dataset=amazon_beauty", "prepare.shards=1"))
    df = pl.read_parquet(tmp_path / "data" / "amazon_beauty" / "shards" / "part-00000.parquet")
    first = (Path(DATASETS) / "amazon_seqrec" / "Beauty.txt").read_text().splitlines()[0].split()
    seq = df.filter(pl.col("user_id") == first[0])
    assert seq["item_id"].to_list() == first[1:]
    assert seq["split"].to_list()[-2:] == ["val", "test"]


def test_ray_engine_writes_the_same_shards(tmp_path: Path) -> None:
    """Both engines run the same pure functions: same rows, same shards, same order."""
    src = tmp_path / "two"
    src.mkdir()
    ml = pl.read_csv(Path(DATASETS) / "ml-100k" / "ml-100k.inter", separator="\t", n_rows=6000)
    ml = ml.rename({c: c.split(":")[0] for c in ml.columns}).select(
        pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8),
        pl.when(pl.col("rating") >= 2).then(pl.lit("purchase")).otherwise(pl.lit("bogus")).alias("event"),
        pl.col("timestamp").alias("ts"))
    ml.slice(0, 3000).write_csv(src / "a.csv")
    pl.concat([ml.slice(3000), ml.slice(0, 10)]).write_csv(src / "b.csv")  # 10 cross-file duplicates
    over = ["dataset=events", f"dataset.path={src}", "prepare.shards=4"]
    a = prepare(cfg_for(tmp_path / "p", *over))
    b = prepare(cfg_for(tmp_path / "r", *over, "prepare.engine=ray", "prepare.ray_num_cpus=2"))
    valid_dups = ml.slice(0, 10).filter(pl.col("event") == "purchase").height
    assert a["reasons"]["exact duplicate"] == valid_dups > 0 and a["reasons"]["unknown event"] > 0
    for key in ("rows_in", "rows_out", "rows_quarantined", "reasons", "shards", "split"):
        assert a[key] == b[key], key
    for s in a["shards"]:
        pa_ = pl.read_parquet(tmp_path / "p" / "data" / "events" / s["file"])
        pr_ = pl.read_parquet(tmp_path / "r" / "data" / "events" / s["file"])
        assert pa_.equals(pr_)
    qa = pl.read_parquet(tmp_path / "p" / "data" / "events" / "quarantine.parquet")
    qr = pl.read_parquet(tmp_path / "r" / "data" / "events" / "quarantine.parquet")
    assert qa.equals(qr)
