"""Ray Tune sweeps over the training driver: a tiny sweep on a local 2-CPU Ray runs its trials to completion, ASHA
stops the clearly bad one, the winner is registered with sweep lineage and aliased `best`, its exported experiment
composes; the search space and the resource accounting as units."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ecomray import registry
from ecomray.runtime import UserError
from ecomray.train import tune as sweeps
from tests.conftest import write_fake_events_shards
from tests.test_train_next_item import FUNNEL, compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_space_overrides_and_resources(tmp_path: Path) -> None:
    cfg = compose_cfg("tune", tmp_path, "experiment=tiny", "sweep=tiny")
    spec = sweeps.sweep_spec(cfg)
    assert spec["metric"] == "val/ndcg@10" and spec["mode"] == "max"
    space = sweeps.param_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "model.dim": {"choice": [16, 32]},
                                "model.blocks": {"randint": [1, 3]}, "optim.weight_decay": {"grid": [0.0, 0.1]}})
    assert space["optim.weight_decay"] == {"grid_search": [0.0, 0.1]}
    assert 1e-4 <= space["optim.lr"].sample() <= 1e-2 and space["model.dim"].sample() in (16, 32)
    out = sweeps.apply_overrides(cfg, {"optim.lr": 0.5, "model.dim": 8})
    assert (out["optim"]["lr"], out["model"]["dim"], cfg["optim"]["lr"]) == (0.5, 8, 0.003)   # a copy
    prop = compose_cfg("tune", tmp_path, "experiment=propensity", "sweep=propensity")
    assert sweeps.apply_overrides(prop, {"model.hidden.0": 128})["model"]["hidden"] == [128]
    nested = sweeps.sweep_spec({**cfg, "sweep": {**cfg["sweep"], "space": {"model": {"dim": {"grid": [16, 32]}}}}})
    assert nested["space"] == {"model.dim": {"grid": [16, 32]}}
    for bad in ({"optim.lrr": {"uniform": [0, 1]}}, {"optim.lr": {"normal": [0, 1]}}, {"optim.lr": {"uniform": [1]}}):
        with pytest.raises(UserError):
            sweeps.sweep_spec({**cfg, "sweep": {**cfg["sweep"], "space": bad}})
    # a warm-start point must give every space key, and only those
    beauty_spec = sweeps.sweep_spec(compose_cfg("tune", tmp_path, "experiment=beauty_sasrec", "sweep=sasrec_beauty"))
    assert beauty_spec["points_to_evaluate"][0].keys() == beauty_spec["space"].keys()
    for point in ({"optim.lr": 0.1}, {"optim.lr": 0.1, "model.dropout": 0.1, "model.dim": 8}):
        with pytest.raises(UserError, match="points_to_evaluate"):
            sweeps.sweep_spec({**cfg, "sweep": {**cfg["sweep"], "points_to_evaluate": [point]}})
    with pytest.raises(UserError):   # Optuna samples: no grid
        sweeps.sweep_spec({**cfg, "sweep": {**cfg["sweep"], "search": "optuna"}})
    for key, value, says in (("num_samples", 0, "num_samples must be >= 1"), ("time_budget_s", 0, "time_budget_s must be > 0")):
        with pytest.raises(UserError, match=says):   # zero trials used to end in "no trial reported a metric"
            sweeps.sweep_spec({**cfg, "sweep": {**cfg["sweep"], key: value}})
    # the driver reserves no CPU; a trial is its workers; concurrency = what fits
    reserve, per_trial = sweeps.trial_resources(cfg)
    assert reserve["CPU"] == 0 and per_trial == {"CPU": 1.0, "GPU": 0.0}
    assert sweeps.max_concurrent_trials({"CPU": 2.0}, per_trial) == 2
    beauty = compose_cfg("tune", tmp_path, "experiment=beauty_sasrec", "sweep=sasrec_beauty")
    assert sweeps.max_concurrent_trials({"CPU": 2.0}, sweeps.trial_resources(beauty)[1]) == 1
    gpu = compose_cfg("tune", tmp_path, "experiment=tiny", "scaling=gpu1")
    assert sweeps.max_concurrent_trials({"CPU": 16.0, "GPU": 1.0}, sweeps.trial_resources(gpu)[1]) == 1
    with pytest.raises(UserError):
        sweeps.max_concurrent_trials({"CPU": 2.0}, sweeps.trial_resources(gpu)[1])
    shipped = {"tiny": "tiny", "propensity": "propensity", "sasrec_beauty": "beauty_sasrec", "copy": "copy_advertisegen",
               "ctr_frappe": "frappe_deepfm"}
    assert set(shipped) == {p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml")}
    for name, exp in shipped.items():   # every shipped sweep validates against its experiment
        sweeps.sweep_spec(compose_cfg("tune", tmp_path, f"experiment={exp}", f"sweep={name}"))
    copy = sweeps.sweep_spec(compose_cfg("tune", tmp_path, "experiment=copy_advertisegen", "sweep=copy"))
    assert (copy["metric"], copy["mode"]) == ("val/bleu4", "max")   # selection on validation BLEU-4


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, ray_session) -> tuple[dict, dict]:
    from ecomray.data.prepare import run as prepare
    from jobs.tune import run

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = compose_cfg("tune", tmp, "experiment=tiny", "sweep=tiny", "dataset.synthetic.users=600")
    prepare(cfg)
    return cfg, run(cfg)


def test_tiny_sweep_runs_stops_the_bad_trial_and_promotes_the_winner(tiny_sweep) -> None:
    cfg, out = tiny_sweep
    sweep_dir = Path(out["sweep_dir"])
    with open(sweep_dir / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == out["trials"] == 3                       # one row per trial
    metric = "best val/ndcg@10"
    by_lr = {float(r["optim.lr"]): r for r in rows}
    assert set(by_lr) == {0.003, 0.01, 1e-6}
    bad = by_lr[1e-6]
    assert bad["stopped_by"] == "scheduler" and int(bad["epochs_run"]) < 3      # ASHA stopped it early
    best_row = max(rows, key=lambda r: float(r[metric]))
    assert best_row["stopped_by"] == "completed" and int(best_row["epochs_run"]) == 3 and best_row is not bad
    assert out["best_trial"] == best_row["trial_id"] and float(bad[metric]) < float(best_row[metric])
    assert (sweep_dir / "curves.png").stat().st_size > 1000
    # never more trials at once than the 2 CPUs hold (1-CPU workers, drivers at 0 CPU)
    spans = [(float(r["start_s"]), float(r["start_s"]) + float(r["wall_s"])) for r in rows]
    assert max(sum(a <= t < b - 1.5 for a, b in spans) for t, _ in spans) <= 2   # (Tune's timestamps are whole s)
    # the winner: registered once, `best` points at it, its val metric is the best trial's, sweep lineage recorded
    root = cfg["paths"]["registry"]
    assert registry.versions(root, out["name"]) == [out["version"]]
    assert registry.get_alias(root, out["name"], "best") == out["version"] and out["alias"] == "best"
    found = registry.load(root, out["name"], "best")
    assert found["metrics"]["val/ndcg@10"] == pytest.approx(float(best_row[metric]), rel=1e-5)
    assert found["lineage"]["sweep"]["name"] == "tiny" and found["lineage"]["sweep"]["trial_id"] == out["best_trial"]
    assert found["config"]["optim"]["lr"] == pytest.approx(float(best_row["optim.lr"]))
    assert found["config"]["train"]["epochs"] == 3 and "sweep" not in found["config"]
    # re-running the same sweep name finds it complete: no new trials, no second version
    from jobs.tune import run

    again = run(cfg)
    assert again["version"] == out["version"] and registry.versions(root, out["name"]) == [out["version"]]
    # a run stopped after registering the winner but before writing its summary: resuming does not register it twice
    (sweep_dir / "summary.json").unlink()
    resumed = run(cfg)
    assert resumed["version"] == out["version"] and registry.versions(root, out["name"]) == [out["version"]]
    assert resumed["metrics"]["val/ndcg@10"] == pytest.approx(found["metrics"]["val/ndcg@10"])


def test_exported_experiment_composes_to_the_winning_config(tiny_sweep) -> None:
    cfg, out = tiny_sweep
    path = Path(out["experiment"])
    assert path.parent.name == "experiment" and path.read_text().startswith("# @package _global_")
    res = subprocess.run([sys.executable, "-m", "jobs.train", "--config-dir", out["sweep_dir"],
                          f"experiment={path.stem}", f"paths.root={Path(cfg['paths']['root'])}", "--cfg", "job",
                          "--resolve"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import yaml

    composed = yaml.safe_load(res.stdout)
    found = registry.load(cfg["paths"]["registry"], out["name"], "best")
    for key in ("model", "optim", "train", "task", "scaling"):   # (keys added to conf/ since only add entries)
        assert {k: composed[key].get(k) for k in found["config"][key]} == found["config"][key], key
    assert composed["dataset"]["synthetic"]["users"] == 600
    # ... and retrains to the trial's metric (in-process here: same seeds and data order as the trial's Ray worker)
    from ecomray.train.driver import fit

    again = compose_cfg("train", Path(cfg["paths"]["root"]), f"experiment={path.stem}", "scaling=inproc",
                        f"hydra.searchpath=[file://{out['sweep_dir']}]")
    assert again["scaling"]["num_workers"] == 0 and again["optim"] == found["config"]["optim"]
    retrained = fit({**again, "run_name": "retrain"}, register=False)
    assert retrained["metrics"]["val/ndcg@10"] == pytest.approx(out["value"], rel=0.02)


def test_a_sweep_metric_no_trial_reports_is_the_sweeps_one_line_error(tiny_sweep) -> None:
    """`sweep.metric` with a typo: every trial stops at its first epoch naming the metrics it reports (not Tune's
    advice to turn its metric check off, in a traceback), and the sweep's error is that line."""
    from jobs.tune import run

    cfg, _ = tiny_sweep
    typo = {**cfg, "sweep": {**cfg["sweep"], "name": "typo", "metric": "val/ndcg@100", "scheduler": {"name": "none"},
                             "space": {"optim.lr": {"grid": [0.003]}}, "fixed": {"train.epochs": 1}}}
    with pytest.raises(UserError, match=r"^sweep typo: no trial finished an epoch; a trial's error: sweep.metric='val/ndcg@100' "
                                        r"is not a metric this run reports; it reports .*val/ndcg@10, "):
        run(typo)


def test_the_copy_sweep_selects_on_validation_bleu(tmp_path: Path, ray_session) -> None:
    """sweep=copy (Optuna + ASHA on val/bleu4) at the scale of the tests: the copy family's trials run, report
    BLEU-4, and the winner registered is the trial with the best validation BLEU-4. tiny_copy trains in-process
    (scaling=inproc), which failed every trial of a sweep (Ray Train's context does not exist in a Tune function):
    each trial is one Ray Train worker now."""
    from ecomray.data.prepare import run as prepare
    from jobs.tune import run

    cfg = compose_cfg("tune", tmp_path, "experiment=tiny_copy", "sweep=copy",
                      "train.monitor=val/bleu4", "train.mode=max", "task.eval_generate=10",
                      "sweep.num_samples=2", "sweep.scheduler.grace_period=1", "sweep.scheduler.max_t=2",
                      "sweep.fixed={train.epochs: 2, train.time_budget_s: null}", "sweep.time_budget_s=600")
    prepare(cfg)
    out = run(cfg)
    with open(Path(out["sweep_dir"]) / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == out["trials"] == 2
    assert {r["optim.lr"] for r in rows} >= {"0.0005"}                  # the warm-start point ran
    best = max(rows, key=lambda r: float(r["best val/bleu4"]))
    found = registry.load(cfg["paths"]["registry"], out["name"], "best")
    assert out["best_trial"] == best["trial_id"]
    assert found["metrics"]["val/bleu4"] == pytest.approx(float(best["best val/bleu4"]), rel=1e-5)
    assert found["lineage"]["sweep"]["name"] == "copy"


def test_a_sweep_name_holding_another_sweep_is_refused(tmp_path: Path) -> None:
    cfg = compose_cfg("tune", tmp_path, "experiment=tiny", "sweep=tiny")
    folder = Path(cfg["paths"]["runs"]) / "tiny"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"fingerprint": "another sweep", "sweep": {}}))
    with pytest.raises(UserError, match="different config"):
        sweeps.run_sweep(cfg)
    with pytest.raises(UserError, match="no sweep"):
        sweeps.run_sweep({k: v for k, v in cfg.items() if k != "sweep"})
    with pytest.raises(UserError):
        sweeps.sweep_spec({**cfg, "sweep": {**cfg["sweep"], "name": "../escape"}})
    # a second job on the same sweep name "resumed" the running one and registered another winner: refused
    import fcntl

    (Path(cfg["paths"]["runs"]) / ".locks").mkdir(exist_ok=True)
    with open(Path(cfg["paths"]["runs"]) / ".locks" / "tiny.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=r"another sweep tiny is running .*choose another sweep.name"):
            sweeps.run_sweep(cfg)


def _started_sweep(tmp_path: Path, *overrides: str, **recorded: Any) -> tuple[dict, Path]:
    """The config of a `tiny` sweep over a fake prepared dataset, and its folder holding the sweep.json a started
    sweep wrote (its fingerprint, and `recorded` beside it)."""
    from ecomray.train.tune.spec import apply_overrides
    from ecomray.train.tune.sweep import _fingerprint

    cfg = compose_cfg("tune", tmp_path, "experiment=tiny", "sweep=tiny", "dataset.name=fake", "dataset.adapter=files",
                      *overrides)
    write_fake_events_shards(Path(cfg["paths"]["data"]) / "fake", FUNNEL)
    spec = sweeps.sweep_spec(cfg)
    base = apply_overrides({k: v for k, v in cfg.items() if k not in ("sweep", "tune", "hydra")}, spec["fixed"])
    base["run_name"] = None
    folder = Path(cfg["paths"]["runs"]) / "tiny"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"fingerprint": _fingerprint(base, spec), "sweep": spec,
                                                   **recorded}))
    return cfg, folder


def test_resuming_a_sweep_whose_data_was_prepared_again_is_refused(tmp_path: Path) -> None:
    """Its finished trials trained on the old preparation: resuming would rank them against trials on the new one."""
    cfg, folder = _started_sweep(tmp_path, data_manifest_hash="1" * 64)
    with pytest.raises(UserError, match="prepared again since sweep tiny started"):
        sweeps.run_sweep(cfg)
    (folder / "sweep.json").write_text("{")
    with pytest.raises(UserError, match="sweep.json is damaged"):
        sweeps.run_sweep(cfg)


def test_a_resumed_sweep_keeps_the_init_from_version_it_pinned(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """model.init_from is pinned when a sweep starts; resuming pinned it again, so a version registered since (or a
    moved alias) changed the fingerprint: "holds a sweep with a different config". The pin is kept in sweep.json."""
    from ecomray.train.tune import sweep as sweep_module

    cfg, _ = _started_sweep(tmp_path, "+model.init_from=pre", data_manifest_hash="1" * 64, init_from="pre:v0001")
    monkeypatch.setattr(sweep_module, "pin_init_from", lambda b: pytest.fail("a resumed sweep pinned again"))
    with pytest.raises(UserError, match="prepared again since sweep tiny started"):   # past the fingerprint
        sweeps.run_sweep(cfg)


def test_a_stopped_trial_ends_without_a_traceback() -> None:
    """Ray ends a stopped trial with SIGTERM, whose handler raises SystemExit wherever Python is; inside a garbage
    collector callback that used to print a traceback on the user's console (a flaky pipeline test). The trial's
    hook drops exactly that; any other exception that cannot be raised is still printed."""
    code = """
import os, signal, sys, weakref
from ecomray.runtime import quiet_termination
if sys.argv[1] == "quiet":
    quiet_termination()
    quiet_termination()                 # idempotent: one hook, not a chain
class Thing: pass
def exit_in_callback(_ref):
    raise SystemExit(1)                 # what Ray's SIGTERM handler does, here inside a weakref callback
def fail_in_callback(_ref):
    raise ValueError("a real bug")
a, b = Thing(), Thing()
ra, rb = weakref.ref(a, exit_in_callback), weakref.ref(b, fail_in_callback)
del a, b
print("still running")
"""
    runs = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=60,
                                 cwd=Path(__file__).resolve().parents[1]) for mode in ("default", "quiet")}
    assert "SystemExit" in runs["default"].stderr                           # the noise this fixes
    quiet = runs["quiet"]
    assert quiet.returncode == 0 and "still running" in quiet.stdout
    assert "SystemExit" not in quiet.stderr
    assert "ValueError: a real bug" in quiet.stderr                        # real errors still show


def test_a_sweep_may_select_on_what_tune_adds_to_every_result() -> None:
    """`sweep.metric: training_iteration` (or time_total_s) is Tune's own, never in the loop's report: not a typo."""
    from ecomray.train.loop import check_reported

    check_reported({"val/auc": 0.7}, "training_iteration", "sweep.metric")
    with pytest.raises(UserError, match=r"train.monitor='training_iteration' is not a metric this run reports"):
        check_reported({"val/auc": 0.7}, "training_iteration", "train.monitor")


def test_a_trial_resumed_after_a_kill_is_reported_whole(tmp_path: Path) -> None:
    """After a killed sweep was resumed, Tune's rows of a trial started at the epoch its Train run resumed from: a
    trial that had run all 3 epochs was listed as 2 epochs, stopped by the scheduler, its curve missing epoch 0."""
    import pandas as pd
    import torch
    from types import SimpleNamespace

    from ecomray.train.tune.results import trial_table

    ckpt = tmp_path / "checkpoint_000002"
    ckpt.mkdir()
    history = [{"epoch": e, "val/ndcg@10": v, "stopped_early": 0.0} for e, v in enumerate((0.1, 0.3, 0.2))]
    torch.save({"history": history}, ckpt / "state.pt")
    rows = pd.DataFrame([{"epoch": e, "val/ndcg@10": v, "stopped_early": 0.0, "timestamp": 100.0 + e,
                          "time_total_s": 5.0, "checkpoint_path": str(ckpt)} for e, v in ((1, 0.3), (2, 0.2))])
    result = SimpleNamespace(metrics_dataframe=rows, config={"optim.lr": 0.01}, error=None, path=str(tmp_path / "t0"),
                             metrics={"trial_id": "t0", "checkpoint_path": str(ckpt), "timestamp": 102.0,
                                      "time_total_s": 5.0})
    spec = {"metric": "val/ndcg@10", "mode": "max", "space": {"optim.lr": None}}
    table, curves = trial_table([result], spec, {"train": {"epochs": 3}})
    assert table[0]["epochs_run"] == 3 and table[0]["stopped_by"] == "completed" and table[0]["best_value"] == 0.3
    assert [e for e, _, _ in curves["t0"]] == [0, 1, 2]
