"""How much of the cluster a trial holds, how many trials fit at once, and the release of a stopped trial's
Train workers (a workaround for Ray Train leaving their placement group reserved)."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from ray.tune import Callback

logger = logging.getLogger("ray.tune")

from ecomray.runtime import UserError

DRIVER_MEMORY = 64 * 2**20  # bytes a trial's driver function reserves (Tune needs a non-empty resource request)


def trial_resources(cfg: dict, driver_cpus: float = 0.0) -> tuple[dict[str, float], dict[str, float]]:
    """(what the Tune trial itself reserves, what one trial uses in all) from the scaling config.

    Why the driver gets no CPU: a trial's driver function only builds a TorchTrainer and waits on it; the Train V2
    controller is an actor with num_cpus=0; the work is done by the Train workers, which reserve their own placement
    group *outside* Tune's accounting. With Tune's default of 1 CPU per trial on a 2-CPU Ray, Tune sees room for two
    trials, starts two drivers, and they hold both CPUs while each waits for a 1-CPU worker that can never be placed.
    So the driver reserves no CPU, and how many trials run at once is set from the workers' resources
    (`max_concurrent_trials`). The other half of the hang (CPUs of stopped trials never freed) is
    `ReleaseStoppedWorkers`. In-process training (`scaling.num_workers: 0`) runs inside the driver, which then
    takes the worker's share."""
    from ecomray.train.driver import worker_bundle

    sc = cfg["scaling"]
    n = int(sc.get("num_workers", 1))
    per = worker_bundle(sc)                      # one worker, as Ray Train reads resources_per_worker
    cpu, gpu = per.get("CPU", 0.0), per.get("GPU", 0.0)
    if n == 0:
        return {"CPU": max(cpu, 1.0), "GPU": gpu}, {"CPU": max(cpu, 1.0), "GPU": gpu}
    # Tune refuses an all-zero request; what an idle driver really needs is a little memory, so that is what it asks.
    reserve = {"CPU": float(driver_cpus), "GPU": 0.0, "memory": DRIVER_MEMORY}
    return reserve, {"CPU": n * cpu + float(driver_cpus), "GPU": n * gpu}


def max_concurrent_trials(cluster: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials fit at once: floor(cluster CPUs / trial CPUs), and the same for GPUs when trials use them."""
    fits = [math.floor(cluster.get(r, 0.0) / need + 1e-9) for r, need in per_trial.items() if need > 0]
    if not fits:
        return 1
    n = min(fits)
    if n < 1:
        raise UserError(f"one trial needs {per_trial} but the Ray cluster has {cluster}: lower scaling.num_workers "
                        f"or scaling.resources_per_worker, or use a bigger cluster")
    return n


def pg_file(sweep_dir: str, trial_id: str) -> str:
    """Where a trial's rank 0 notes its workers' placement group, for `ReleaseStoppedWorkers`."""
    return os.path.join(sweep_dir, "trials", f"{trial_id}.placement_groups")


class ReleaseStoppedWorkers(Callback):
    """Frees the CPUs (GPUs) of the Train workers of trials that Tune stopped.

    When ASHA (or the time budget) stops a trial, Tune ends the trial's actor; the Train controller it owns dies with
    it, but the workers' placement group belongs to the job and stays reserved. Ray Train leaves its removal to a
    detached `PlacementGroupCleaner` that polls the State API, which needs the dashboard (tests run without one) and
    fails outright when several Ray instances share the machine. Until then the stopped trial still holds its CPUs,
    and the next trial's worker waits for them forever: the hang seen after trial 1. So the tune job removes the
    placement groups of finished trials itself (each trial's rank 0 writes its id to `trials/<trial>.placement_groups`),
    a couple of seconds after the trial ended so that its controller is gone and cannot start a replacement."""

    grace_s = 2.0

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir
        self.ended: dict[str, float] = {}
        self.released: set[str] = set()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = time.time()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = time.time()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.release()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # trials cut off by the time budget end here, without on_trial_complete: release every trial's workers
        for t in trials:
            self.ended.setdefault(t.trial_id, time.time())
        time.sleep(self.grace_s)
        self.release(force=True)

    def release(self, force: bool = False) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util import placement_group_table
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        now = time.time()
        for trial_id, ended in list(self.ended.items()):
            if not force and now - ended < self.grace_s:
                continue
            path = pg_file(self.sweep_dir, trial_id)
            ids = open(path).read().split() if os.path.exists(path) else []
            for pg_id in ids:
                if pg_id in self.released:
                    continue
                pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
                if placement_group_table(pg).get("state") in ("CREATED", "PENDING", "RESCHEDULING", "PREPARED"):
                    remove_placement_group(pg)
                    logger.info("released the workers' placement group of stopped trial %s", trial_id)
                self.released.add(pg_id)
            del self.ended[trial_id]


class TrialLines(Callback):
    """One line per finished trial (Tune's own progress table is off): its id, values, best metric, epochs, how it
    ended."""

    def __init__(self, metric: str, mode: str, keys: list[str]) -> None:
        self.metric, self.sign, self.keys = metric, (1 if mode == "max" else -1), keys
        self.best: dict[str, float] = {}
        self.epochs: dict[str, int] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        v = result.get(self.metric)
        if isinstance(v, (int, float)):
            tid = trial.trial_id
            self.epochs[tid] = self.epochs.get(tid, 0) + 1
            if tid not in self.best or self.sign * v > self.sign * self.best[tid]:
                self.best[tid] = float(v)

    def _line(self, trial: Any, how: str) -> None:
        values = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(trial.config.get(k))}" for k in self.keys)
        best = self.best.get(trial.trial_id)
        print(f"[tune] trial {trial.trial_id} {how}: {values}; best {self.metric} "
              f"{'-' if best is None else f'{best:.4f}'} after {self.epochs.get(trial.trial_id, 0)} epoch(s)",
              flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "failed")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
