"""jobs.batch_predict: Ray Data map_batches over the task's predict writes the same answers as calling predict
directly, for every user (next_item) or row (propensity)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ecomray.inference import load_model
from tests.test_prepare import DATASETS
from tests.test_train_next_item import compose_cfg

HAVE_SHOPPERS = os.path.exists(os.path.join(DATASETS, "online_shoppers_intention", "online_shoppers_intention.csv"))


def test_batch_predict_next_item_matches_predict(ray_session, tmp_path: Path) -> None:
    from ecomray.data.prepare import run as prepare
    from ecomray.tasks.next_item import build_data
    from ecomray.train.driver import fit
    from jobs.batch_predict import run

    cfg = compose_cfg("batch_predict", tmp_path, "experiment=tiny", "scaling=inproc", "train.epochs=1",
                      "dataset.synthetic.users=300", "batch_predict.split=test", "batch_predict.options={k: 5}",
                      "batch_predict.batch_size=64")
    prepare(cfg)
    trained = fit(cfg)
    out = run(cfg)
    data = build_data(cfg, 0, 1)
    with_target = {u: s for u, s in zip(data.users, data.seqs) if len(s) >= 3}
    df = pl.read_parquet(os.path.join(out["out"], "*.parquet"))
    assert out["rows"] == df.height == len(with_target) and df["user_id"].n_unique() == df.height
    assert json.loads(Path(out["out"], "predictions.json").read_text())["version"] == trained["version"]
    loaded = load_model(cfg["paths"]["registry"], trained["name"], trained["version"])
    some = df.sort("user_id").head(12)
    hist = [[data.item_ids[i - 1] for i in with_target[u][:-1]] for u in some["user_id"]]
    want = loaded.task.predict(loaded.model, loaded.meta, hist, k=5, exclude_history=True)
    assert some["items"].to_list() == [[i for i, _ in w] for w in want]
    np.testing.assert_allclose(np.array(some["scores"].to_list()), np.array([[s for _, s in w] for w in want]),
                               rtol=1e-4, atol=1e-4)
    assert (df["items"].list.len() == 5).all()
    # a re-run replaces the folder whole (no mixed files from two runs), and removes what killed runs left
    killed = [Path(f"{out['out']}.tmp-999999"), Path(f"{out['out']}.old-999999")]
    for k in killed:
        k.mkdir()
        (k / "part.parquet").write_bytes(b"partial")
    again = run(cfg)
    assert pl.read_parquet(os.path.join(again["out"], "*.parquet")).height == df.height
    assert not any(k.exists() for k in killed)
    assert sorted(p.name for p in Path(out["out"]).parent.iterdir()) == [f".{Path(out['out']).name}.lock",
                                                                         Path(out["out"]).name]
    # options the family refuses, or does not read, are one error line from the driver, before Ray Data runs
    from ecomray.runtime import UserError

    with pytest.raises(UserError, match=r"cannot score with .*k must be an integer >= 1, got -1"):
        run({**cfg, "batch_predict": {**cfg["batch_predict"], "options": {"k": -1}}})
    with pytest.raises(UserError, match=r"takes no option\(s\) \['exlude_history'\] \(it reads \['k', 'exclude_history'\]\)"):
        run({**cfg, "batch_predict": {**cfg["batch_predict"], "options": {"exlude_history": False}}})
    # values that were taken for others: k 2.5 wrote 2 items, k true 1, exclude_history "maybe" true
    for bad, says in (({"k": 2.5}, "k must be an integer >= 1, got 2.5"), ({"k": True}, "k must be an integer"),
                      ({"exclude_history": "maybe"}, "exclude_history must be true or false, got 'maybe'")):
        with pytest.raises(UserError, match=says):
            run({**cfg, "batch_predict": {**cfg["batch_predict"], "options": bad}})
    with pytest.raises(UserError, match=r"batch_predict.options=5: write a mapping"):
        run({**cfg, "batch_predict": {**cfg["batch_predict"], "options": 5}})
    # more actors than the CPUs (Ray Data waited forever), or (reading shards) than the CPUs leave for the reads
    with pytest.raises(UserError, match=r"batch_predict.actors=3 x num_cpus_per_actor=1, but the Ray cluster has "
                                        r"2 CPU\(s\): choose fewer actors"):
        run({**cfg, "batch_predict": {**cfg["batch_predict"], "actors": 3}})
    from jobs.batch_predict import _check_actors

    _check_actors({"actors": 1}, reads=True)
    with pytest.raises(UserError, match=r"actors=2 x num_cpus_per_actor=1 plus a CPU to read the shards"):
        _check_actors({"actors": 2}, reads=True)
    # outputs that could never be written: a file (it failed after all the work), a folder inside the registry
    # (it looked like a version to every registry command)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"batch_predict.out: .*afile is a file, not a folder"):
        run({**cfg, "batch_predict": {**cfg["batch_predict"], "out": str(tmp_path / "afile")}})
    inside = os.path.join(cfg["paths"]["registry"], trained["name"], "v0002")
    with pytest.raises(UserError, match=r"batch_predict.out=.*v0002 is inside the registry"):
        run({**cfg, "batch_predict": {**cfg["batch_predict"], "out": inside}})
    assert not os.path.exists(inside)


@pytest.mark.skipif(not HAVE_SHOPPERS, reason="needs the shoppers table in ECOMRAY_DATASETS")
def test_batch_predict_propensity_matches_predict(ray_session, tmp_path: Path) -> None:
    from ecomray.data.prepare import run as prepare
    from ecomray.train.driver import fit
    from jobs.batch_predict import run

    cfg = compose_cfg("batch_predict", tmp_path, "experiment=tiny_propensity", f"paths.datasets={DATASETS}",
                      "train.epochs=1", "batch_predict.split=test")
    prepare(cfg)
    trained = fit(cfg)
    out = run(cfg)
    df = pl.read_parquet(os.path.join(out["out"], "*.parquet")).sort("_file", "_row")
    folder = Path(cfg["paths"]["data"]) / "shoppers" / "shards"
    test = pl.read_parquet(str(folder / "*.parquet")).filter(pl.col("split") == "test").sort("_file", "_row")
    assert df.height == test.height and set(df.columns) >= {"_row", "split", "Revenue", "probability"}
    loaded = load_model(cfg["paths"]["registry"], trained["name"], trained["version"])
    want = loaded.task.predict(loaded.model, loaded.meta, test.to_arrow())
    np.testing.assert_allclose(df["probability"].to_numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", ["batch_size=0", "batch_size=1.5", "actors=0", "num_cpus_per_actor=0",
                                     "num_cpus_per_actor=-1"])
def test_batch_predict_settings_no_run_can_use_fail_before_ray(tmp_path: Path, setting: str) -> None:
    """`batch_predict.batch_size=0` failed in Ray Data with a traceback, after Ray had started."""
    from ecomray.config import compose
    from ecomray.runtime import UserError
    from jobs.batch_predict import run

    key = setting.split("=")[0]
    with pytest.raises(UserError, match=rf"batch_predict\.{key}=.*: must be"):
        run(compose("batch_predict", [f"paths.root={tmp_path}", f"batch_predict.{setting}"]))


def test_ray_data_console_keeps_warnings_and_the_progress_line_only() -> None:
    """A 3,000-row scoring printed 15 lines of Ray Data's plans and resource tables around the job's own line."""
    import logging

    from jobs.batch_predict import _ProgressOnly

    def record(level: int, filename: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord("ray.data", level, f"/x/{filename}", 1, msg, None, None)

    keep = _ProgressOnly().filter
    assert keep(record(logging.INFO, "logging_progress.py", "Total Progress: 1000/3000"))
    assert keep(record(logging.WARNING, "dataset.py", "a real warning"))
    assert not keep(record(logging.INFO, "logging_progress.py", "MapBatches(Scorer): 0/1"))
    assert not keep(record(logging.INFO, "streaming_executor.py", "Execution plan of Dataset ..."))
