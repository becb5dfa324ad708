"""Run (or resume) a sweep, then score, register and alias its winner."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from ecomray import registry
from ecomray.data import shards
from ecomray.inference import pin_init_from
from ecomray.runtime import UserError, check_writable, user_error_in, write_atomic
from ecomray.train.tune.export import EXPORT_KEYS, export_experiment
from ecomray.train.tune.resources import ReleaseStoppedWorkers, TrialLines, max_concurrent_trials, trial_resources
from ecomray.train.tune.results import trial_table, write_results
from ecomray.train.tune.spec import apply_overrides, param_space, sweep_spec
from ecomray.train.tune.trial import trial, trial_cfg


def _fingerprint(cfg: dict, spec: dict) -> str:
    keep = {k: cfg.get(k) for k in EXPORT_KEYS}
    return hashlib.sha256(json.dumps([keep, {k: v for k, v in spec.items() if k != "time_budget_s"}],
                                     sort_keys=True, default=str).encode()).hexdigest()


def run_sweep(cfg: dict) -> dict[str, Any]:
    """Run (or resume) the sweep in `cfg["sweep"]`, then register and alias its winner. Returns
    {"name", "version", "alias", "best_trial", "metric", "value", "sweep_dir", "trials", "csv", "plot",
    "experiment", "sweep_seconds", "metrics"}. One job per sweep name at a time: a second one started beside it
    "resumed" the running sweep, ran its trials again into the same folders and registered another winner."""
    from ecomray.runtime import is_uri, one_at_a_time

    name, runs = sweep_spec(cfg)["name"], cfg["paths"]["runs"]
    if is_uri(runs):
        return _run_sweep(cfg)
    check_writable(runs, "paths.runs")
    os.makedirs(os.path.join(runs, ".locks"), exist_ok=True)
    with one_at_a_time(os.path.join(runs, ".locks", f"{name}.lock"), f"sweep {name}",
                       busy="wait for it to finish (a later run of the same command then resumes or reports it), or "
                            "choose another sweep.name"):
        return _run_sweep(cfg)


def _run_sweep(cfg: dict) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ecomray.runtime import init_ray

    tcfg = cfg["tune"]          # conf/common/tune.yaml
    spec = sweep_spec(cfg)
    base = apply_overrides({k: v for k, v in cfg.items() if k not in ("sweep", "tune", "hydra")}, spec["fixed"])
    base["run_name"] = None
    if int(base["scaling"].get("num_workers", 1)) == 0:
        # A trial cannot run the loop in its own process (Ray Train's context does not exist in a Tune function:
        # every trial failed before its first epoch): each trial is one Ray Train worker instead
        print("[tune] scaling=inproc: each trial runs as one Ray Train worker (scaling=cpu1)", flush=True)
        base["scaling"] = {**base["scaling"], "num_workers": 1,
                           "resources_per_worker": base["scaling"].get("resources_per_worker") or {"CPU": 1}}
    sweep_dir = os.path.join(cfg["paths"]["runs"], spec["name"])
    fingerprint = _fingerprint(base, spec)      # the config as given (model.init_from as written, not pinned)

    summary_path = os.path.join(sweep_dir, "summary.json")
    if os.path.isdir(sweep_dir) and not tcfg["resume"]:
        aside = f"{sweep_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(sweep_dir, aside)
        print(f"[tune] tune.resume=false: moved the earlier sweep aside to {aside}", flush=True)
    spec_path = os.path.join(sweep_dir, "sweep.json")
    data_hash, earlier = None, {}
    if os.path.exists(spec_path):
        earlier = _read_json(spec_path)
        if earlier["fingerprint"] != fingerprint:
            raise UserError(f"sweep folder {sweep_dir} holds a sweep with a different config or space: pass "
                            f"sweep.name=<new name> for a new sweep, or tune.resume=false to start this one over")
        data_hash = earlier.get("data_manifest_hash")
        if os.path.exists(summary_path):
            done = _read_json(summary_path)
            print(f"[tune] sweep {spec['name']} is complete: winner {done['best_trial']} registered as "
                  f"{done['name']} {done['version']} ({done['alias']}); tune.resume=false runs it again", flush=True)
            return done
    # Every trial starts from the same version of model.init_from, and a resumed sweep from the one it pinned when
    # it started (a version registered since, or a moved alias, must not change it halfway)
    if earlier.get("init_from"):
        base = {**base, "model": {**base["model"], "init_from": earlier["init_from"]}}
    else:
        base = pin_init_from(base)
    # fail here, not in every trial (or prepare the built-in synthetic shop)
    current = shards.require(base).get("hash")   # None: a manifest written by hand, nothing to compare
    check_writable(cfg["paths"]["runs"], "paths.runs")
    if tcfg["register"]:    # the winner is registered only at the very end
        check_writable(cfg["paths"]["registry"], "paths.registry")
    if data_hash is not None and current is not None and data_hash != current:
        raise UserError(f"{shards.dataset_dir(base)} was prepared again since sweep {spec['name']} started "
                        f"(manifest hash {data_hash[:12]} -> {current[:12]}): its finished trials trained on the "
                        f"old data; pass tune.resume=false to start over on the new data, or sweep.name=<new name>")
    os.makedirs(sweep_dir, exist_ok=True)
    write_atomic(spec_path, json.dumps({"fingerprint": fingerprint, "sweep": spec, "data_manifest_hash": current,
                                        "init_from": base["model"].get("init_from")}, indent=2, default=str))

    # once, here; trials run inside this Ray
    init_ray(num_cpus=(cfg.get("ray") or {}).get("num_cpus"), verbose=bool(cfg.get("verbose")),
             dashboard=(cfg.get("ray") or {}).get("include_dashboard"))
    import ray

    reserve, per_trial = trial_resources(base, float(tcfg["driver_cpus"]))
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    concurrent = int(tcfg["max_concurrent_trials"] or max_concurrent_trials(cluster, per_trial))
    print(f"[tune] sweep {spec['name']}: one trial needs {per_trial} (its driver {reserve}); cluster "
          f"{ {k: cluster.get(k, 0.0) for k in ('CPU', 'GPU')} } -> {concurrent} trial(s) at a time", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(trial, base_cfg=base, sweep_dir=sweep_dir, metric=spec["metric"]),
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
    run_config = tune.RunConfig(storage_path=cfg["paths"]["runs"], name=spec["name"],
                                verbose=2 if cfg.get("verbose") else 0,   # 0: our one line per finished trial
                                callbacks=[ReleaseStoppedWorkers(sweep_dir),
                                           TrialLines(spec["metric"], spec["mode"], list(spec["space"]))])
    if not cfg.get("verbose"):
        # Tune's newer console output prints its experiment table even at verbose=0; the classic one stays silent
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune catches Ctrl-C itself and returns the trials so far as if the sweep had ended: the winner of a partial
    # sweep was registered and aliased `best`, and tune.resume then found the sweep complete. Ctrl-C stops the job;
    # the sweep folder keeps the trials, and the same command resumes it.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    t0 = time.time()
    if tcfg["resume"] and tune.Tuner.can_restore(sweep_dir):
        print(f"[tune] resuming the sweep in {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec["space"]),
            tune_config=tune.TuneConfig(metric=spec["metric"], mode=spec["mode"], num_samples=spec["num_samples"],
                                        scheduler=scheduler, search_alg=search_alg,
                                        # a generator limits itself (above); Tune warns if told again
                                        max_concurrent_trials=None if isinstance(search_alg, BasicVariantGenerator)
                                        else concurrent,
                                        time_budget_s=spec.get("time_budget_s")),
            run_config=run_config)
    grid = tuner.fit()
    wall = time.time() - t0
    rows, curves = trial_table(grid, spec, base)
    if not rows:
        raise _trial_user_error(grid, spec["name"]) or UserError(f"sweep {spec['name']}: no trial reported a "
                                                                 f"metric (see the errors above)")
    write_results(rows, curves, spec, sweep_dir)
    with open(os.path.join(sweep_dir, "curves.json"), "w") as fh:   # [(epoch, value, unix time)] per trial
        json.dump(curves, fh)
    scored = [r for r in rows if r["best_value"] is not None]
    if not scored:
        raise _trial_user_error(grid, spec["name"]) or UserError(f"sweep {spec['name']}: every trial failed "
                                                                 f"before its first epoch ended")
    sign = 1 if spec["mode"] == "max" else -1
    best = max(scored, key=lambda r: sign * r["best_value"])
    print(f"[tune] best trial {best['trial_id']}: {spec['metric']} {best['best_value']:.4f} with "
          + ", ".join(f"{k}={v}" for k, v in best["config"].items()) + f"  (sweep {wall:.0f}s)", flush=True)

    winner_cfg = trial_cfg(base, best["config"], best["trial_id"], sweep_dir)
    experiment = export_experiment(winner_cfg, spec, best, sweep_dir, tcfg.get("choices"))
    out: dict[str, Any] = {"best_trial": best["trial_id"], "metric": spec["metric"], "value": best["best_value"],
                           "sweep_dir": sweep_dir, "trials": len(rows), "csv": os.path.join(sweep_dir, "trials.csv"),
                           "plot": os.path.join(sweep_dir, "curves.png"), "experiment": experiment,
                           "alias": tcfg["alias"], "name": None, "version": None, "sweep_seconds": wall}
    if tcfg["register"]:
        from ecomray.train.driver import evaluate_checkpoint

        lineage = {"sweep": {"name": spec["name"], "trial_id": best["trial_id"], "config": best["config"],
                             "fixed": spec["fixed"], "metric": spec["metric"], "mode": spec["mode"],
                             "best_value": best["best_value"], "trials": len(rows), "sweep_dir": sweep_dir}}
        root, model = cfg["paths"]["registry"], registry.model_name(winner_cfg)
        done_before = _registered_winner(root, model, sweep_dir, best["trial_id"])
        if done_before:   # a run of this sweep was stopped after registering its winner, before its summary
            print(f"[tune] the winner is already registered as {model} {done_before}; not registering it again",
                  flush=True)
            scored_out = {"name": model, "version": done_before,
                          "metrics": registry.load(root, model, done_before, state=False)["metrics"]}
        else:
            scored_out = evaluate_checkpoint(winner_cfg, best["checkpoint"], register=True,
                                             train_seconds=best["wall_s"], extra=lineage, data_hash=current)
        registry.set_alias(cfg["paths"]["registry"], scored_out["name"], tcfg["alias"], scored_out["version"])
        print(f"[tune] {scored_out['name']} {scored_out['version']} is now `{tcfg['alias']}`", flush=True)
        out.update(name=scored_out["name"], version=scored_out["version"], metrics=scored_out["metrics"])
        write_atomic(summary_path, json.dumps(out, indent=2, default=str))
    return out


def _registered_winner(root: str, name: str, sweep_dir: str, trial_id: str) -> str | None:
    """The version this sweep's winning trial was registered as, if it was (lineage.json's `sweep`)."""
    for version in reversed(registry.versions(root, name)):
        try:
            with open(os.path.join(root, name, version, "lineage.json")) as fh:
                sweep = json.load(fh).get("sweep") or {}
        except (OSError, ValueError):
            continue
        if sweep.get("sweep_dir") == sweep_dir and sweep.get("trial_id") == trial_id:
            return version
    return None


def _read_json(path: str) -> dict:
    """A sweep's own JSON file (written atomically, so only a hand edit or a disk error damages it)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError as err:
        raise UserError(f"{path} is damaged ({err}): restore it, or pass tune.resume=false to start the sweep "
                        f"over (the old folder is moved aside)") from None


def _trial_user_error(grid: Any, name: str) -> UserError | None:
    """A config or data error (UserError) a trial ended with, as the error of a sweep none of whose trials finished an
    epoch: with a wrong `sweep.metric` (or a model config no model can be built from) every trial fails the same way."""
    for err in getattr(grid, "errors", None) or []:
        found = user_error_in(err)
        if found is not None:
            return UserError(f"sweep {name}: no trial finished an epoch; a trial's error: {found}")
    return None
