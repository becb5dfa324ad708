"""The real Ray Train path: two DDP workers (gloo), a worker failure mid-run, resume from the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecomray.data.prepare import run as prepare
from ecomray.train.driver import fit
from tests.test_train_next_item import compose_cfg


def test_two_worker_run_survives_a_failure_with_identical_metrics(tmp_path: Path, ray_session) -> None:
    """Two Ray Train workers (DDP, gloo). One run raises once mid-epoch 2 and resumes from the epoch-1
    checkpoint; it must end with the same metrics as the run that never failed (rel 1e-4)."""
    base = ["experiment=tiny", "scaling=cpu2", "train.epochs=3", "train.patience=10", "dataset.synthetic.users=800",
            "train.ema_decay=0.9",   # the averaged weights must resume too
            "train.max_failures=1"]
    cfg = compose_cfg("train", tmp_path, *base)
    prepare(cfg)
    clean = fit({**cfg, "run_name": "clean"}, register=False)
    steps_per_epoch = sum(1 for _ in range(0, 400, cfg["train"]["batch_size"]))  # ~400 users per worker
    failed = fit({**compose_cfg("train", tmp_path, *base, f"train.fail_at_step={steps_per_epoch + 1}"),
                  "run_name": "failed"}, register=False)
    assert (tmp_path / "train" / "failed.failed_once").exists()   # it really failed once
    assert len(clean["history"]) == len(failed["history"]) == 3
    for key, value in clean["metrics"].items():
        if key.startswith(("val/", "test/")):
            assert failed["metrics"][key] == pytest.approx(value, rel=1e-4), key
    assert [h["train/loss"] for h in failed["history"]] == pytest.approx([h["train/loss"] for h in clean["history"]],
                                                                          rel=1e-4)


@pytest.mark.parametrize("scaling", ["cpu1", "cpu2"])
def test_data_prepared_again_stops_real_workers_once(tmp_path: Path, ray_session, monkeypatch: pytest.MonkeyPatch,
                                                    scaling: str) -> None:
    """Workers that find the dataset prepared again since the driver checked it stop before the first step, without
    an exception (Ray Train would retry one up to train.max_failures times, forever with -1, each retry reading the
    data again), and the run's error says why. Two workers agree (all-reduce), so neither waits on the other."""
    from ecomray.runtime import UserError
    from tests.test_train_next_item import prepared_again_meanwhile

    cfg = prepared_again_meanwhile(tmp_path, monkeypatch, f"scaling={scaling}", "train.max_failures=-1")
    with pytest.raises(UserError, match=r"prepared again as this run started .*nothing was trained"):
        fit(cfg, register=False)


def test_a_workers_user_error_is_the_runs_error(tmp_path: Path, ray_session) -> None:
    """A UserError raised in a Ray Train worker reaches the job as that UserError (one clear line), not as Ray's
    WorkerGroupError with the message buried in a traceback."""
    from ecomray.runtime import UserError
    from tests.test_train_next_item import FUNNEL, write_fake_events_shards

    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=cpu1", "model.max_len=6", "model.dim=8",
                      "train.epochs=1", "train.max_failures=0")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)

    def refuses(config: dict) -> None:
        raise UserError("task.vocab: 12 is not a vocabulary file")

    with pytest.raises(UserError, match=r"^task.vocab: 12 is not a vocabulary file$"):
        fit(cfg, register=False, train_fn=refuses)


def test_a_monitor_no_epoch_reports_is_named_once_per_run(tmp_path: Path, ray_session) -> None:
    """`train.monitor` with a typo ends the run at its first epoch with the metrics it could have named (it used to
    be a KeyError), and Ray Train's retry (`train.max_failures`, here -1: forever) stops at once on the error its
    first attempt left, instead of reading the data and training the epoch again, and ends the run."""
    import os

    from ecomray.runtime import UserError
    from ecomray.train.loop import train_loop, user_error_marker
    from tests.test_train_next_item import FUNNEL, write_fake_events_shards

    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=cpu1", "model.max_len=6", "model.dim=8",
                      "train.epochs=1", "train.max_failures=-1", "train.monitor=val/ndcg@100")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    cfg = {**cfg, "run_name": "typo"}
    attempts = tmp_path / "attempts.txt"

    def counted(config: dict) -> None:   # whether each attempt found the error its predecessor left
        with open(attempts, "a") as fh:
            fh.write(f"{os.path.exists(user_error_marker(config))}\n")
        train_loop(config)

    with pytest.raises(UserError, match=r"^train.monitor='val/ndcg@100' is not a metric this run reports; it reports "
                                        r".*val/ndcg@10, .*: set train.monitor to one of them$"):
        fit(cfg, register=False, train_fn=counted)
    assert attempts.read_text().split() == ["False", "True"]
    assert not os.path.exists(user_error_marker(cfg))     # the run's error file goes with the run
    assert not (tmp_path / "train" / "typo").exists()      # and so does its folder: nothing in it to resume


def test_a_named_run_is_one_job_resumes_only_as_it_started_and_registers_once(tmp_path: Path, ray_session,
                                                                               capsys: pytest.CaptureFixture) -> None:
    """Two jobs with one run_name mixed their checkpoints in one folder; a resume with another lr continued the old
    optimizer while the registered config named the new lr; a re-run of a finished run trained nothing and
    registered the same weights as a new version."""
    import fcntl

    from ecomray import registry
    from ecomray.runtime import UserError
    from tests.test_train_next_item import FUNNEL, write_fake_events_shards

    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=cpu1", "model.max_len=6", "model.dim=8",
                      "train.epochs=2", "train.patience=null", "run_name=named")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    first = fit(cfg)
    assert len(first["history"]) == 2 and first["version"] == "v0001"
    again = fit({**cfg, "scaling": {**cfg["scaling"], "num_workers": 2}})       # where it runs may change
    assert again["version"] == "v0001" and again.get("already_registered")
    assert registry.versions(cfg["paths"]["registry"], registry.model_name(cfg)) == ["v0001"]
    assert "has finished (2 epoch(s)) and is registered as" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"run_name=named is a run with other settings \(optim.lr: now 0.5"):
        fit({**cfg, "optim": {**cfg["optim"], "lr": 0.5}})
    longer = fit({**cfg, "train": {**cfg["train"], "epochs": 3}})   # more epochs: it continues from epoch 1
    assert longer["version"] == "v0002" and len(longer["history"]) == 3
    assert "resumed from epoch 1" in capsys.readouterr().out
    with open(Path(cfg["paths"]["runs"]) / ".locks" / "named.lock", "a") as held:   # another job runs it now
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=r"another train run named is running .*choose another run_name"):
            fit(cfg)
