"""Hyperparameter sweeps: Ray Tune drives the same training driver (`ecomray.train.driver.fit`) as `jobs.train`.

A sweep is data (`conf/sweep/<name>.yaml`, the `sweep` key of the config):

    name: tiny                  # Tune run folder <paths.runs>/<name>; re-running the same name resumes it
    metric: null                # default train.monitor; mode default train.mode
    num_samples: 1              # samples of the space (each grid point is crossed with every sample)
    search: random              # random | optuna (OptunaSearch; no grid entries)
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or {name: none}
    time_budget_s: 600
    fixed: {train.epochs: 3}    # dotted overrides applied to every trial
    points_to_evaluate: []      # optional: configurations (a value for every space key) tried first
    space:                      # dotted config paths -> one distribution each
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}   # also uniform [lo, hi], randint [lo, hi), choice [...], grid [...]

Each trial runs `fit(trial_cfg, callbacks=[TuneReportCallback()], register=False, evaluate=False)`; its Train
checkpoints (each holding the best weights so far) go under `<sweep dir>/trials/<trial id>`. Trials never
register. After the sweep `run_sweep` writes `trials.csv`, `curves.png`, `experiment/<name>_best.yaml`,
`summary.json`, scores the best trial's best weights on val and test, registers that one version with its sweep
lineage and points the `best` alias at it.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from ecomray import registry
from ecomray.runtime import UserError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
TUNE_DEFAULTS: dict[str, Any] = {
    "resume": True,                 # re-running a sweep name resumes it; false: the old folder is moved aside
    "max_concurrent_trials": None,  # null: floor(cluster resources / one trial's Train workers)
    "driver_cpus": 0.0,             # CPUs the trial's driver function holds (it only waits on its TorchTrainer)
    "alias": "best",                # the alias the winner gets
    "register": True,
}
DRIVER_MEMORY = 64 * 2**20  # bytes a trial's driver function reserves (Tune needs a non-empty resource request)
# What the exported experiment file sets: the config groups (as `override /group: choice`) and these values.
EXPORT_KEYS = ("seed", "registry_name", "dataset", "task", "model", "optim", "scaling", "train")
GROUPS = ("dataset", "task", "model", "optim", "scaling")


# ----------------------------------------------------------------------------------------------- the sweep as data
def sweep_spec(cfg: dict) -> dict[str, Any]:
    """The normalized sweep of a config: defaults filled from `train.*`, the space validated."""
    raw = cfg.get("sweep")
    if not raw:
        raise UserError("no sweep in the config: pass sweep=<name> (one of conf/sweep/*.yaml)")
    spec = copy.deepcopy(raw)
    if not spec.get("name"):
        raise UserError("the sweep has no `name` (its folder under paths.runs)")
    registry._safe(cfg["paths"]["runs"], str(spec["name"]))  # a plain folder name, never a path out of runs/
    spec["metric"] = spec.get("metric") or cfg["train"]["monitor"]
    spec["mode"] = spec.get("mode") or cfg["train"].get("mode", "max")
    if spec["mode"] not in ("min", "max"):
        raise UserError(f"sweep.mode must be min or max, not {spec['mode']!r}")
    spec["num_samples"] = int(spec.get("num_samples", 1))
    spec["search"] = spec.get("search") or "random"
    if spec["search"] not in ("random", "optuna"):
        raise UserError(f"sweep.search must be random or optuna, not {spec['search']!r}")
    sched = spec.get("scheduler") or {"name": "none"}
    spec["scheduler"] = sched if isinstance(sched, dict) else {"name": str(sched)}
    if spec["scheduler"].get("name", "none") not in ("asha", "none"):
        raise UserError(f"sweep.scheduler.name must be asha or none, not {spec['scheduler'].get('name')!r}")
    spec["fixed"] = dict(spec.get("fixed") or {})
    space = _flatten_space(spec.get("space") or {})
    if not space:
        raise UserError(f"sweep {spec['name']!r} has an empty `space`")
    for key, dist in space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise UserError(f"sweep.space.{key}: write one of {{{'|'.join(DISTRIBUTIONS)}: [...]}}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        if kind in ("uniform", "loguniform", "randint") and (not isinstance(args, list) or len(args) != 2):
            raise UserError(f"sweep.space.{key}: {kind} takes [low, high], got {args!r}")
        if kind in ("choice", "grid") and (not isinstance(args, list) or not args):
            raise UserError(f"sweep.space.{key}: {kind} takes a non-empty list, got {args!r}")
        if kind == "grid" and spec["search"] == "optuna":
            raise UserError(f"sweep.space.{key}: grid entries need search=random (Optuna samples; use choice)")
        get_path(cfg, key)  # the key must name an existing config entry: a typo fails here, not in trial 7
    spec["space"] = space
    # Known configurations to try first (a warm start: e.g. the experiment's hand-tuned values), then the search.
    points = spec.get("points_to_evaluate") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise UserError("sweep.points_to_evaluate: write a list of {dotted key: value} mappings")
    for n, point in enumerate(points):
        if set(point) != set(space):
            missing, extra = sorted(set(space) - set(point)), sorted(set(point) - set(space))
            raise UserError(f"sweep.points_to_evaluate[{n}] must give a value for every space key "
                            f"(missing {missing}, not in the space {extra})")
    spec["points_to_evaluate"] = [dict(p) for p in points]
    return spec


def _flatten_space(space: dict, prefix: str = "") -> dict[str, Any]:
    """Nested entries become dotted keys, so a command line can add one: `+sweep.space.model.dim={grid:[16,32]}`."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, dict) and value and not (len(value) == 1 and next(iter(value)) in DISTRIBUTIONS):
            out.update(_flatten_space(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def param_space(space: dict[str, dict]) -> dict[str, Any]:
    """The sweep's space as Tune search-space objects, keyed by the dotted config path."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dist in space.items():
        kind, args = next(iter(dist.items()))
        if kind == "choice":
            out[key] = tune.choice(args)
        elif kind == "grid":
            out[key] = tune.grid_search(args)
        elif kind == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        else:
            out[key] = tune.randint(int(args[0]), int(args[1]))
    return out


def _walk(cfg: dict, key: str) -> tuple[Any, Any]:
    parts = key.split(".")
    node: Any = cfg
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last: Any = int(parts[-1]) if isinstance(node, list) else parts[-1]
    return node, last


def get_path(cfg: dict, key: str) -> Any:
    try:
        node, last = _walk(cfg, key)
        return node[last]
    except (KeyError, IndexError, ValueError, TypeError):
        raise UserError(f"sweep key {key!r} names no entry of the config (dotted path, list items by index: "
                        f"model.hidden.0)") from None


def apply_overrides(cfg: dict, values: dict[str, Any]) -> dict:
    """A deep copy of `cfg` with each dotted key (`optim.lr`, `model.hidden.0`) set to its value."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        get_path(out, key)
        node, last = _walk(out, key)
        node[last] = value
    return out


# ------------------------------------------------------------------------------------------ resources, concurrency
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
    sc = cfg["scaling"]
    n = int(sc.get("num_workers", 1))
    per = dict(sc.get("resources_per_worker") or {})
    cpu = float(per.get("CPU", 1))
    gpu = float(per.get("GPU", 1 if sc.get("use_gpu") else 0))
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


# ---------------------------------------------------------------------------------------------------- the trial
def _trial_cfg(base: dict, values: dict[str, Any], trial_id: str, sweep_dir: str) -> dict:
    cfg = apply_overrides(base, values)
    cfg["paths"] = {**cfg["paths"], "runs": os.path.join(sweep_dir, "trials")}
    cfg["run_name"] = trial_id
    return cfg


def _trial(config: dict, base_cfg: dict, sweep_dir: str) -> None:
    """Tune's trainable: the training driver with this trial's values, metrics forwarded to Tune every epoch."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ecomray.train.driver import fit

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = _trial_cfg(base_cfg, config, trial_id, sweep_dir)
    # Ray is already up in a trial (fit's init_ray is a no-op); the Train run is named by the trial, so a resumed
    # trial resumes its Train run from its last checkpoint.
    fit({**cfg, "_pg_file": _pg_file(sweep_dir, trial_id)}, callbacks=[TuneReportCallback()], register=False,
        evaluate=False, train_fn=_trial_loop)


def _pg_file(sweep_dir: str, trial_id: str) -> str:
    return os.path.join(sweep_dir, "trials", f"{trial_id}.placement_groups")


def _trial_loop(cfg: dict) -> None:
    """The one training loop, after rank 0 has noted its worker group's placement group (`ReleaseStoppedWorkers`)."""
    import ray.train
    from ray.util import get_current_placement_group

    from ecomray.runtime import is_uri

    pg = get_current_placement_group()
    # (on object-store run folders there is no file to append to: Ray Train's own cleaner is all there is)
    if pg is not None and ray.train.get_context().get_world_rank() == 0 and not is_uri(cfg["_pg_file"]):
        os.makedirs(os.path.dirname(cfg["_pg_file"]), exist_ok=True)
        with open(cfg["_pg_file"], "a") as fh:
            fh.write(pg.id.hex() + "\n")
    from ecomray.train.loop import train_loop

    train_loop({k: v for k, v in cfg.items() if k != "_pg_file"})


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
            path = _pg_file(self.sweep_dir, trial_id)
            ids = open(path).read().split() if os.path.exists(path) else []
            for pg_id in ids:
                if pg_id in self.released:
                    continue
                pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
                if placement_group_table(pg).get("state") in ("CREATED", "PENDING", "RESCHEDULING", "PREPARED"):
                    remove_placement_group(pg)
                    print(f"[tune] released the workers' placement group of stopped trial {trial_id}", flush=True)
                self.released.add(pg_id)
            del self.ended[trial_id]


# ---------------------------------------------------------------------------------------------------- the sweep
def _fingerprint(cfg: dict, spec: dict) -> str:
    keep = {k: cfg.get(k) for k in EXPORT_KEYS}
    return hashlib.sha256(json.dumps([keep, {k: v for k, v in spec.items() if k != "time_budget_s"}],
                                     sort_keys=True, default=str).encode()).hexdigest()


def run_sweep(cfg: dict) -> dict[str, Any]:
    """Run (or resume) the sweep in `cfg["sweep"]`, then register and alias its winner. Returns
    {"name", "version", "alias", "best_trial", "metric", "value", "sweep_dir", "trials", "csv", "plot",
    "experiment", "sweep_seconds", "metrics"}."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ecomray.runtime import init_ray

    tcfg = {**TUNE_DEFAULTS, **(cfg.get("tune") or {})}
    spec = sweep_spec(cfg)
    base = apply_overrides({k: v for k, v in cfg.items() if k not in ("sweep", "tune", "hydra")}, spec["fixed"])
    base["run_name"] = None
    sweep_dir = os.path.join(cfg["paths"]["runs"], spec["name"])
    fingerprint = _fingerprint(base, spec)

    summary_path = os.path.join(sweep_dir, "summary.json")
    if os.path.isdir(sweep_dir) and not tcfg["resume"]:
        aside = f"{sweep_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(sweep_dir, aside)
        print(f"[tune] tune.resume=false: moved the earlier sweep aside to {aside}", flush=True)
    spec_path = os.path.join(sweep_dir, "sweep.json")
    if os.path.exists(spec_path):
        with open(spec_path) as fh:
            earlier = json.load(fh)
        if earlier["fingerprint"] != fingerprint:
            raise UserError(f"sweep folder {sweep_dir} holds a sweep with a different config or space: pass "
                            f"sweep.name=<new name> for a new sweep, or tune.resume=false to start this one over")
        if os.path.exists(summary_path):
            with open(summary_path) as fh:
                done = json.load(fh)
            print(f"[tune] sweep {spec['name']} is complete: winner {done['best_trial']} registered as "
                  f"{done['name']} {done['version']} ({done['alias']}); tune.resume=false runs it again", flush=True)
            return done
    os.makedirs(sweep_dir, exist_ok=True)
    with open(spec_path, "w") as fh:
        json.dump({"fingerprint": fingerprint, "sweep": spec}, fh, indent=2, default=str)

    from ecomray.data.prepare import load_manifest

    load_manifest(os.path.join(base["paths"]["data"], base["dataset"]["name"]))  # fail here, not in every trial
    init_ray(num_cpus=(cfg.get("ray") or {}).get("num_cpus"))  # once, here; trials run inside this Ray
    import ray

    reserve, per_trial = trial_resources(base, float(tcfg["driver_cpus"]))
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    concurrent = int(tcfg["max_concurrent_trials"] or max_concurrent_trials(cluster, per_trial))
    print(f"[tune] sweep {spec['name']}: one trial needs {per_trial} (its driver {reserve}); cluster "
          f"{ {k: cluster.get(k, 0.0) for k in ('CPU', 'GPU')} } -> {concurrent} trial(s) at a time", flush=True)

    trainable = tune.with_resources(tune.with_parameters(_trial, base_cfg=base, sweep_dir=sweep_dir),
                                    {k: v for k, v in reserve.items() if v})
    sched = spec["scheduler"]
    scheduler = None
    if sched.get("name") == "asha":
        # stop_last_trials=False: a trial that reaches max_t ends on its own (its Train run shuts down cleanly)
        # rather than being stopped by ASHA at its very last report.
        scheduler = ASHAScheduler(time_attr="training_iteration",
                                  max_t=int(sched.get("max_t") or base["train"]["epochs"]),
                                  grace_period=int(sched.get("grace_period", 1)),
                                  reduction_factor=float(sched.get("reduction_factor", 3)), stop_last_trials=False)
    if spec["search"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.get("seed"),   # Tune wraps a Searcher in a ConcurrencyLimiter
                                  points_to_evaluate=spec["points_to_evaluate"] or None)
    else:
        # A search generator is not wrapped: Tune ignores max_concurrent_trials unless the generator gets it itself.
        search_alg = BasicVariantGenerator(random_state=spec.get("seed"), max_concurrent=concurrent,
                                           points_to_evaluate=spec["points_to_evaluate"] or None)
    run_config = tune.RunConfig(storage_path=cfg["paths"]["runs"], name=spec["name"], verbose=1,
                                callbacks=[ReleaseStoppedWorkers(sweep_dir)])
    t0 = time.time()
    if tcfg["resume"] and tune.Tuner.can_restore(sweep_dir):
        print(f"[tune] resuming the sweep in {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec["space"]),
            tune_config=tune.TuneConfig(metric=spec["metric"], mode=spec["mode"], num_samples=spec["num_samples"],
                                        scheduler=scheduler, search_alg=search_alg,
                                        max_concurrent_trials=concurrent,
                                        time_budget_s=spec.get("time_budget_s")),
            run_config=run_config)
    grid = tuner.fit()
    wall = time.time() - t0
    rows, curves = trial_table(grid, spec, base)
    if not rows:
        raise UserError(f"sweep {spec['name']}: no trial reported a metric (see the errors above)")
    write_results(rows, curves, spec, sweep_dir)
    with open(os.path.join(sweep_dir, "curves.json"), "w") as fh:   # [(epoch, value, unix time)] per trial
        json.dump(curves, fh)
    scored = [r for r in rows if r["best_value"] is not None]
    if not scored:
        raise UserError(f"sweep {spec['name']}: every trial failed before its first epoch ended")
    sign = 1 if spec["mode"] == "max" else -1
    best = max(scored, key=lambda r: sign * r["best_value"])
    print(f"[tune] best trial {best['trial_id']}: {spec['metric']} {best['best_value']:.4f} with "
          + ", ".join(f"{k}={v}" for k, v in best["config"].items()) + f"  (sweep {wall:.0f}s)", flush=True)

    trial_cfg = _trial_cfg(base, best["config"], best["trial_id"], sweep_dir)
    experiment = export_experiment(trial_cfg, spec, best, sweep_dir, (cfg.get("tune") or {}).get("choices"))
    out: dict[str, Any] = {"best_trial": best["trial_id"], "metric": spec["metric"], "value": best["best_value"],
                           "sweep_dir": sweep_dir, "trials": len(rows), "csv": os.path.join(sweep_dir, "trials.csv"),
                           "plot": os.path.join(sweep_dir, "curves.png"), "experiment": experiment,
                           "alias": tcfg["alias"], "name": None, "version": None, "sweep_seconds": wall}
    if tcfg["register"]:
        from ecomray.train.driver import evaluate_checkpoint

        lineage = {"sweep": {"name": spec["name"], "trial_id": best["trial_id"], "config": best["config"],
                             "fixed": spec["fixed"], "metric": spec["metric"], "mode": spec["mode"],
                             "best_value": best["best_value"], "trials": len(rows), "sweep_dir": sweep_dir}}
        scored_out = evaluate_checkpoint(trial_cfg, best["checkpoint"], register=True,
                                         train_seconds=best["wall_s"], extra=lineage)
        registry.set_alias(cfg["paths"]["registry"], scored_out["name"], tcfg["alias"], scored_out["version"])
        print(f"[tune] {scored_out['name']} {scored_out['version']} is now `{tcfg['alias']}`", flush=True)
        out.update(name=scored_out["name"], version=scored_out["version"], metrics=scored_out["metrics"])
        with open(summary_path, "w") as fh:
            json.dump(out, fh, indent=2, default=str)
    return out


# -------------------------------------------------------------------------------------------------- the results
def trial_table(grid: Any, spec: dict, base: dict) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """One row per trial (sorted by trial id) and each trial's validation curve [(epoch, value)]."""
    metric, sign = spec["metric"], (1 if spec["mode"] == "max" else -1)
    epochs = int(base["train"]["epochs"])
    rows, curves = [], {}
    for result in grid:
        df = result.metrics_dataframe
        config = {k: result.config[k] for k in spec["space"] if k in result.config}
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(str(result.path))
        if (df is None or metric not in getattr(df, "columns", []) or df.empty) and (result.metrics or {}).get(
                "checkpoint_path"):
            # a resumed trial whose Train run had already ended: Tune kept only its last result
            df = _history_frame(result.metrics)
        if df is None or metric not in getattr(df, "columns", []) or df.empty:
            rows.append({"trial_id": trial_id, "config": config, "best_value": None, "epochs_run": 0,
                         "stopped_early": False, "stopped_by": "error" if result.error else "not started",
                         "wall_s": 0.0, "checkpoint": None, "error": str(result.error or "")[:200],
                         "started_at": None, "ended_at": None})
            continue
        values = [float(v) for v in df[metric]]
        stamps = [float(t) for t in df["timestamp"]] if "timestamp" in df else [0.0] * len(values)
        curves[trial_id] = [(int(e), v, t) for e, v, t in
                            zip(df["epoch"] if "epoch" in df else range(len(values)), values, stamps)]
        last = df.iloc[-1]
        n = len(values)
        if result.error:
            by = "error"
        elif n >= epochs:
            by = "completed"
        elif float(last.get("stopped_early", 0.0) or 0.0) > 0:
            by = "train_loop"             # the loop's own early stop (train.patience or train.time_budget_s)
        else:
            by = "scheduler"              # ASHA (or the sweep's time budget) stopped it
        end = float(last.get("timestamp", 0.0) or 0.0)
        rows.append({"trial_id": trial_id, "config": config,
                     "best_value": max(values, key=lambda v: sign * v), "epochs_run": n,
                     "started_at": end - float(last.get("time_total_s", 0.0)), "ended_at": end,
                     "stopped_early": by == "scheduler", "stopped_by": by,
                     "wall_s": float(last.get("time_total_s", 0.0)),
                     "checkpoint": last.get("checkpoint_path"), "error": str(result.error or "")[:200]})
    rows.sort(key=lambda r: r["trial_id"])
    t0 = min((r["started_at"] for r in rows if r["started_at"]), default=0.0)
    for r in rows:
        r["start_s"] = None if r["started_at"] is None else r["started_at"] - t0
    return rows, curves


def _history_frame(last: dict) -> Any:
    """Per-epoch rows of a trial from its last Train checkpoint (`state.pt` keeps every epoch's metrics)."""
    import pandas as pd
    import torch
    from ray.train import Checkpoint

    try:
        with Checkpoint(str(last["checkpoint_path"])).as_directory() as d:
            history = torch.load(os.path.join(d, "state.pt"), weights_only=False, map_location="cpu")["history"]
    except (OSError, KeyError, RuntimeError):
        return None
    df = pd.DataFrame(history)
    df["timestamp"] = float(last.get("timestamp", 0.0))
    df["time_total_s"] = float(last.get("time_total_s", 0.0))
    df["checkpoint_path"] = last["checkpoint_path"]
    return df


def write_results(rows: list[dict], curves: dict, spec: dict, sweep_dir: str) -> None:
    """Print the trial table and write it as `trials.csv`; plot every validation curve to `curves.png`."""
    keys = list(spec["space"])
    header = ["trial_id", *keys, f"best {spec['metric']}", "epochs_run", "stopped_early", "stopped_by", "wall_s",
              "start_s"]
    table = [[r["trial_id"], *[r["config"].get(k) for k in keys],
              None if r["best_value"] is None else round(r["best_value"], 6), r["epochs_run"], r["stopped_early"],
              r["stopped_by"], round(r["wall_s"], 1), None if r["start_s"] is None else round(r["start_s"], 1)]
             for r in rows]
    with open(os.path.join(sweep_dir, "trials.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(table)
    fmt = [[_fmt(c) for c in row] for row in [header, *table]]
    widths = [max(len(row[i]) for row in fmt) for i in range(len(header))]
    print("\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in fmt), flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        pts = curves.get(r["trial_id"])
        if pts:
            ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    ls="--" if r["stopped_early"] else "-",
                    label=f"{r['trial_id']} best {_fmt(r['best_value'])}: " + ", ".join(
                        f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in r["config"].items()))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(spec["metric"])
    ax.set_title(f"sweep {spec['name']}: validation curves (dashed: stopped early)")
    ax.grid(alpha=0.3)
    if len(rows) <= 20:   # below the axes, one trial a line: the figure grows to hold it (bbox_inches="tight")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=1, frameon=False)
    fig.savefig(os.path.join(sweep_dir, "curves.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def export_experiment(trial_cfg: dict, spec: dict, best: dict, sweep_dir: str,
                      choices: dict[str, str] | None = None) -> str:
    """Write `<sweep dir>/experiment/<sweep>_best.yaml`: the config groups the trial used (`override /group: choice`)
    and every value where the trial differs from those groups' files and conf/train.yaml (the experiment's own
    settings, the sweep's fixed values and the winning values), so that
    `python -m jobs.train --config-dir <sweep dir> experiment=<sweep>_best` retrains exactly that trial, and
    `scaling=...` on the same command line still picks where it runs."""
    choices = {g: c for g, c in (choices or {}).items() if g in GROUPS and c}
    for g in GROUPS:
        choices.setdefault(g, guess_choice(g, trial_cfg[g]))
    base = _conf_yaml("train.yaml")
    body: dict[str, Any] = {}
    for key in EXPORT_KEYS:
        if key not in trial_cfg:
            continue
        if key in GROUPS:
            group = _conf_yaml(f"{key}/{choices[key]}.yaml") if choices.get(key) else {}
            skip = _group_defaults(group)           # sub-groups the file pulls in itself (dataset: schema, split)
            diff = _diff({k: v for k, v in trial_cfg[key].items() if k not in skip}, group)
        else:
            diff = _diff(trial_cfg[key], base.get(key))
        if diff is not _SAME:
            body[key] = diff
    name = f"{spec['name']}_best"
    lines = ["# @package _global_",
             f"# The winner of sweep `{spec['name']}`: trial {best['trial_id']}, {spec['metric']} = "
             f"{best['best_value']:.6g}",
             f"# with {json.dumps(best['config'], default=str)} (fixed for every trial: "
             f"{json.dumps(spec['fixed'], default=str)}).",
             f"# Retrain: python -m jobs.train --config-dir {sweep_dir} experiment={name}",
             "defaults:", *[f"  - override /{g}: {c}" for g, c in choices.items() if c], ""]
    os.makedirs(os.path.join(sweep_dir, "experiment"), exist_ok=True)
    path = os.path.join(sweep_dir, "experiment", f"{name}.yaml")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + (yaml.safe_dump(body, sort_keys=False) if body else ""))
    return path


_SAME = object()
CONF = Path(__file__).resolve().parents[2] / "conf"


def _conf_yaml(rel: str) -> dict:
    path = CONF / rel
    if not path.exists():
        return {}
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def _group_defaults(raw: dict) -> set[str]:
    """Keys a group file fills from its own defaults list (`- /schema@schema: events` -> "schema")."""
    keys = set()
    for entry in raw.get("defaults") or []:
        if isinstance(entry, dict):
            for k in entry:
                keys.add(str(k).split("@", 1)[-1] if "@" in str(k) else str(k).lstrip("/"))
    return keys


def _diff(value: Any, base: Any) -> Any:
    """The parts of `value` that differ from `base` (dicts recursively; anything else whole), or _SAME."""
    if isinstance(value, dict) and isinstance(base, dict):
        out = {}
        for k, v in value.items():
            d = _diff(v, base.get(k, _SAME))
            if d is not _SAME:
                out[k] = d
        return out if out else _SAME
    return _SAME if value == base else value


def guess_choice(group: str, values: dict) -> str | None:
    """The `conf/<group>/*.yaml` a resolved group came from, when Hydra's choices are not at hand (plain-dict
    callers): the file whose `name` (dataset, task) or `_target_` and keys (model, optim) or values (scaling) match."""
    folder = CONF / group
    best = None
    for f in sorted(folder.glob("*.yaml")):
        with open(f) as fh:
            raw = yaml.safe_load(fh) or {}
        raw.pop("defaults", None)
        if group in ("dataset", "task"):
            hit = raw.get("name") == values.get("name")
        elif group == "scaling":
            hit = raw == values
        else:
            hit = raw.get("_target_") == values.get("_target_") and set(raw) == set(values)
        if hit:
            return f.stem
        if group in ("model", "optim") and raw.get("_target_") == values.get("_target_") and best is None:
            best = f.stem
    return best
