"""The synthetic shop: determinism, chunk invariance, schema, funnel, ground truth and a learnable next-item signal."""

from __future__ import annotations

import glob
import os
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from ecomray.data import synthetic

TINY = {"seed": 3, "users": 400, "items": 150, "categories": 6, "sessions_per_user": 5.0, "taste_dim": 8,
        "chunk_users": 400}


def _events(out_dir: str, fmt: str = "parquet") -> pl.DataFrame:
    files = sorted(glob.glob(os.path.join(out_dir, "raw", f"events-*.{fmt}")))
    if fmt == "parquet":
        return pl.concat([pl.read_parquet(f) for f in files])
    read = pl.read_csv if fmt == "csv" else pl.read_ndjson
    return pl.concat([read(f) for f in files]).with_columns(
        pl.col("ts").str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us", time_zone="UTC"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, pl.DataFrame]:
    out = str(tmp_path_factory.mktemp("synthetic") / "tiny")
    summary = synthetic.generate(TINY, out)
    return out, summary, _events(out)


def test_same_seed_same_bytes_other_seed_other_rows(tiny, tmp_path) -> None:
    out, summary, df = tiny
    again = synthetic.generate(TINY, str(tmp_path / "again"))
    assert again["rows"] == summary["rows"] == df.height
    for a, b in zip(summary["files"], again["files"]):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()
    synthetic.generate({**TINY, "seed": 4}, str(tmp_path / "other"))
    other = _events(str(tmp_path / "other"))
    assert other.height != df.height or not other.equals(df)


def test_chunking_does_not_change_rows(tiny, tmp_path) -> None:
    _, _, df = tiny
    summary = synthetic.generate({**TINY, "chunk_users": 37}, str(tmp_path / "chunked"))
    assert len(summary["files"]) == 11  # ceil(400 / 37)
    assert _events(str(tmp_path / "chunked")).equals(df)


def test_columns_types_and_values(tiny) -> None:
    out, summary, df = tiny
    assert df.columns == ["user_id", "item_id", "event", "ts", "price", "category", "session_id", "quantity"]
    assert df.schema == {"user_id": pl.String, "item_id": pl.String, "event": pl.String,
                         "ts": pl.Datetime("us", "UTC"), "price": pl.Float64, "category": pl.String,
                         "session_id": pl.String, "quantity": pl.Int64}
    assert df["user_id"].str.contains(r"^u\d{7}$").all() and df["item_id"].str.contains(r"^i\d{5}$").all()
    assert df["user_id"].n_unique() == TINY["users"]  # every user has at least one view
    assert set(df["event"].unique()) == {"view", "click", "cart", "purchase"}
    assert summary["events"] == dict(df["event"].value_counts().iter_rows())
    # quantity: null on view/click, >= 1 on cart/purchase
    browse = pl.col("event").is_in(["view", "click"])
    assert df.filter(browse)["quantity"].null_count() == df.filter(browse).height
    assert df.filter(~browse)["quantity"].min() >= 1
    # price and category come from the catalogue
    truth = synthetic.load_truth(out)
    items = pl.DataFrame({"item_id": truth.item_ids, "p": truth.item_price, "c": truth.item_category})
    joined = df.join(items, on="item_id", how="left")
    assert (joined["price"] == joined["p"]).all() and (joined["category"] == joined["c"]).all()
    assert df["price"].min() > 0
    # time: inside the 90-day window, sorted within each user, sessions belong to their user
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert start <= df["ts"].min() and df["ts"].max() < start + timedelta(days=90)
    assert df.group_by("user_id").agg(pl.col("ts").is_sorted())["ts"].all()
    assert (df["session_id"].str.slice(1, 7) == df["user_id"].str.slice(1, 7)).all()
    # sessions do not overlap: each session's rows span less than the hour between session starts
    spans = df.group_by("session_id").agg((pl.col("ts").max() - pl.col("ts").min()).alias("span"))
    assert spans["span"].max().total_seconds() < 3600


def test_funnel(tiny) -> None:
    _, summary, df = tiny
    n = summary["events"]
    assert n["purchase"] < n["cart"] < n["click"] < n["view"]
    assert 0.1 < n["click"] / n["view"] < 0.6 and 0.01 < n["purchase"] / n["view"] < 0.2
    # every purchase follows a cart of the same item in the same session, with the same quantity, and so on up
    key = ["session_id", "item_id", "quantity"]
    buys = df.filter(pl.col("event") == "purchase").select(key, buy_ts="ts")
    carts = df.filter(pl.col("event") == "cart").select(key, cart_ts="ts")
    matched = buys.join(carts, on=key, how="inner").filter(pl.col("cart_ts") < pl.col("buy_ts"))
    assert matched.select("session_id", "item_id", "buy_ts").unique().height == buys.height
    clicks = df.filter(pl.col("event") == "click").select("session_id", "item_id")
    views = df.filter(pl.col("event") == "view").select("session_id", "item_id").unique()
    assert clicks.join(views, on=["session_id", "item_id"], how="anti").height == 0


def test_other_formats_hold_the_same_rows(tiny, tmp_path) -> None:
    _, _, df = tiny
    for fmt in ("csv", "jsonl"):
        synthetic.generate(TINY, str(tmp_path / fmt), fmt=fmt)
        assert _events(str(tmp_path / fmt), fmt).equals(df), fmt
    with open(os.path.join(tmp_path, "csv", "raw", "events-00000.csv")) as fh:
        assert fh.readline().strip() == "user_id,item_id,event,ts,price,category,session_id,quantity"
        assert fh.readline().split(",")[3].startswith("2026-")  # ISO-8601, no zone suffix
    with pytest.raises(ValueError, match="unknown format"):
        synthetic.generate(TINY, str(tmp_path / "x"), fmt="xml")


def test_rerun_is_skipped_and_a_new_config_regenerates(tmp_path) -> None:
    out = str(tmp_path / "cache")
    small = {**TINY, "users": 50}
    first = synthetic.generate(small, out)
    stamp = os.path.getmtime(first["files"][0])
    assert synthetic.generate(small, out) == first
    assert os.path.getmtime(first["files"][0]) == stamp
    assert synthetic.generate({**small, "chunk_users": 10}, out) == first  # the rows do not depend on chunking
    bigger = synthetic.generate({**small, "users": 60}, out)
    assert bigger["rows"] > first["rows"] and synthetic.load_truth(out).user_taste.shape == (60, 8)


def test_bad_config_is_refused(tmp_path) -> None:
    """One line naming the setting (a bare ValueError traceback before: `jobs.pipeline dataset.synthetic.users=0`)."""
    from ecomray.runtime import UserError

    with pytest.raises(UserError, match="users must be >= 1"):
        synthetic.generate({**TINY, "users": 0}, str(tmp_path / "bad"))
    for key, value in (("users", "many"), ("users", 2.5), ("drift", float("nan")), ("seed", True)):
        with pytest.raises(UserError, match=rf"dataset.synthetic.{key}="):
            synthetic.generate({**TINY, key: value}, str(tmp_path / "bad"))


def test_truth_shapes_and_activity(tiny) -> None:
    out, _, df = tiny
    truth = synthetic.load_truth(out)
    assert truth.item_vecs.shape == (TINY["items"], TINY["taste_dim"]) and truth.item_pop.shape == (TINY["items"],)
    assert truth.user_taste.shape == (TINY["users"], TINY["taste_dim"]) and truth.transition.shape == (8, 8)
    assert truth.user_ids == sorted(df["user_id"].unique().to_list())
    assert set(df["item_id"].unique()) <= set(truth.item_ids) and len(truth.item_category) == TINY["items"]
    # activity drives sessions: mean near sessions_per_user, and the most active users have the most sessions
    sessions = df.group_by("user_id").agg(pl.col("session_id").n_unique()).sort("user_id")["session_id"].to_numpy()
    assert abs(sessions.mean() - TINY["sessions_per_user"]) < 0.6
    assert np.corrcoef(truth.user_activity, sessions)[0, 1] > 0.8
    scores = synthetic.true_scores(truth, truth.user_ids[:3])
    assert scores.shape == (3, TINY["items"])
    np.testing.assert_allclose(scores[0], truth.user_taste[0] @ truth.item_vecs.T + truth.item_pop)


def test_true_scores_anchor_is_the_last_new_item(tiny) -> None:
    truth = synthetic.load_truth(tiny[0])
    users, (a, b) = truth.user_ids[:2], truth.item_ids[:2]
    repeat = synthetic.true_scores(truth, users, [[a, b, a], [b]])
    np.testing.assert_allclose(repeat, synthetic.true_scores(truth, users, [[a, b], [a, b]]))
    assert not np.allclose(repeat[0], synthetic.true_scores(truth, users[:1], [[b, a]])[0])
    np.testing.assert_allclose(synthetic.true_scores(truth, users, [[], []]), synthetic.true_scores(truth, users))
    with pytest.raises(KeyError, match="not in the ground truth"):
        synthetic.true_scores(truth, ["u9999999"])


def test_oracle_beats_static_taste_beats_popularity(tmp_path) -> None:
    """Leave-last-out on first-interaction sequences: the sequential oracle >> static taste > popularity."""
    out = str(tmp_path / "oracle")
    synthetic.generate({**TINY, "users": 1500, "items": 300, "categories": 10}, out)
    df = _events(out)
    truth = synthetic.load_truth(out)
    col = truth.item_index()
    seqs = df.group_by("user_id", maintain_order=True).agg(pl.col("item_id").unique(maintain_order=True))
    seqs = seqs.filter(pl.col("item_id").list.len() >= 3)
    users, items = seqs["user_id"].to_list(), seqs["item_id"].to_list()
    hist, target = [s[:-1] for s in items], np.array([col[s[-1]] for s in items])
    pop = np.zeros(len(truth.item_ids))  # popularity from everything but the held-out last items
    for item, n in df.group_by("item_id").len().iter_rows():
        pop[col[item]] = n
    np.subtract.at(pop, target, 1)

    def hit10(scores: np.ndarray) -> float:
        scores = np.array(scores, dtype=float)
        for row, h in enumerate(hist):
            scores[row, [col[i] for i in h]] = -np.inf  # rank unseen items only
        beaten = (scores > scores[np.arange(len(target)), target][:, None]).sum(1)
        return float((beaten < 10).mean())

    h_pop = hit10(np.tile(pop, (len(users), 1)))
    h_static = hit10(synthetic.true_scores(truth, users))
    h_oracle = hit10(synthetic.true_scores(truth, users, hist))
    assert len(users) > 1000
    assert h_static > h_pop + 0.05, (h_pop, h_static)
    assert h_oracle > h_static + 0.15 and h_oracle > 2 * h_pop, (h_pop, h_static, h_oracle)


def test_write_csv_hits_the_row_target(tmp_path) -> None:
    path = str(tmp_path / "bench.csv")
    info = synthetic.write_csv({**TINY, "chunk_users": 300}, path, 5000)
    df = pl.read_csv(path)
    assert info["rows"] == df.height == 5000 and info["bytes"] == os.path.getsize(path)
    assert df.columns == ["user_id", "item_id", "event", "ts", "price", "category", "session_id", "quantity"]
    assert df["ts"].str.contains(r"^2026-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$").all()
    assert df["user_id"].is_sorted() and not df["ts"].is_sorted()
    noisy = synthetic.write_csv({**TINY, "chunk_users": 5000}, path, 5000, order="time", duplicates=0.02, invalid=0.01)
    df = pl.read_csv(path)
    assert noisy["rows"] == df.height == 5000 and df["ts"].is_sorted()  # one chunk: sorted by time throughout
    assert df.height - df.unique().height == noisy["duplicates"] > 50
    assert (df["event"] == "refund").sum() == noisy["invalid"] > 25
