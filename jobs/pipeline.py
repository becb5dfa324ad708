"""python -m jobs.pipeline [experiment=tiny]: prepare -> train -> evaluate -> tune -> deploy, end to end, on one config.

The deploy stage answers one request from itself and shuts down (so the quickstart terminates), unless
`pipeline.keep_serving=true`. `pipeline.stages=[prepare,train,evaluate]` runs a prefix (or any subset, in order).
At the end it writes a run report, `<paths.reports>/pipeline-<time>/report.html` (ecomray/report.py).
"""
from __future__ import annotations

import os
import time

import hydra
from omegaconf import DictConfig

from ecomray.runtime import UserError, to_plain, user_errors

STAGES = ("prepare", "train", "evaluate", "tune", "deploy")


def run(cfg: DictConfig | dict) -> dict:
    plain = to_plain(cfg)
    stages = plain["pipeline"]["stages"]
    stages = [stages] if isinstance(stages, str) else list(stages or [])     # (a string was split into letters)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown pipeline stage(s) {unknown}: choose from {list(STAGES)}")
    if not stages:
        raise UserError(f"pipeline.stages is empty: nothing to run (choose from {list(STAGES)})")
    if not isinstance(plain["pipeline"].get("keep_serving", False), bool):      # "maybe" counted as true
        raise UserError(f"pipeline.keep_serving={plain['pipeline']['keep_serving']!r}: use true or false")
    if len(set(stages)) != len(stages):      # a stage twice ran twice, and the report counted it once
        raise UserError(f"pipeline.stages={stages}: a stage is listed twice")
    if {"train", "tune"} & set(stages):
        # before the prepare stage publishes anything: a bad train setting used to fail after it
        from ecomray.train.driver import check_train_config

        check_train_config(plain)
    if "evaluate" in stages:     # and a bad evaluate setting after training had registered a version
        from ecomray.evaluation import check_settings

        check_settings(plain.get("evaluate") or {})
        from ecomray import registry

        ev = plain.get("evaluate") or {}
        name, ref = registry.parse_ref(str(ev.get("model") or registry.model_name(plain)))
        named = [k for k, given in (("model", name != registry.model_name(plain) or ref), ("version", ev.get("version")))
                 if given]
        if named and "train" in stages and stages.index("train") < stages.index("evaluate"):
            raise UserError(f"pipeline: evaluate.{named[0]} names a version, but the evaluate stage scores the "
                            f"version the train stage makes; drop it, or run `python -m jobs.evaluate` for that one")
    results: dict = {}
    timings: dict[str, float] = {}
    t0 = time.time()
    for n, stage in enumerate(stages, start=1):
        print(f"\n=== pipeline {n}/{len(stages)}: {stage} ===", flush=True)
        t_stage = time.time()
        if stage == "prepare":
            from ecomray.data.prepare import run as prepare

            results["prepare"] = prepare(plain)
        elif stage == "train":
            from ecomray.train.driver import fit

            results["train"] = fit(plain)
        elif stage == "evaluate":
            from jobs.evaluate import run as evaluate

            version = (results.get("train") or {}).get("version")
            results["evaluate"] = evaluate({**plain, "evaluate": {**plain.get("evaluate", {}),
                                                                  **({"version": version} if version else {})}})
        elif stage == "tune":
            from jobs.tune import run as tune

            results["tune"] = tune(plain)
        elif stage == "deploy":
            from jobs.deploy import run as deploy

            keep = bool(plain["pipeline"].get("keep_serving", False))
            # once: a free port, so the quickstart can't collide with something already serving on 8000
            quiet = {} if keep or plain.get("verbose") else {"serve": {**(plain.get("serve") or {}),
                                                                       "log_level": "WARNING", "log_requests": False}}
            results["deploy"] = deploy({**plain, **quiet, "deploy": {**_serve_this_run(plain, results),
                                                                     "once": not keep,
                                                                     **({} if keep else {"port": 0})}})
        timings[stage] = time.time() - t_stage
        print(f"=== {stage} done in {timings[stage]:.1f}s ===", flush=True)
    from ecomray import report

    out = os.path.join(plain["paths"]["reports"], f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out):      # another pipeline ended in the same second: its report stays its own
        out = f"{out}-{os.getpid()}"
    results["report"] = report.write(results, timings, plain, out)
    print(f"\n=== pipeline done in {time.time() - t0:.1f}s: {', '.join(stages)}; report {results['report']} ===",
          flush=True)
    return results


def _serve_this_run(plain: dict, results: dict) -> dict:
    """`deploy` for the deploy stage: the version this run trained or tuned (the sweep's winner first), when the
    config names no endpoints. A `prod` alias set earlier used to win (prod, else best, else the newest): the
    report paired this run's evaluation with another version's answer."""
    made = results.get("tune") or results.get("train") or {}
    if plain["deploy"].get("endpoints") is not None or not made.get("version"):
        return plain["deploy"]
    from ecomray.tasks import SERVING, load_task, supports

    task = load_task(plain)
    if not supports(task, SERVING):
        return plain["deploy"]
    print(f"[pipeline] deploying {made['name']} {made['version']}, the version this run "
          f"{'tuned' if results.get('tune') else 'trained'} (aliases such as prod are left as they are)", flush=True)
    return {**plain["deploy"], "endpoints": {task.ROUTE: {"model": f"{made['name']}:{made['version']}"}}}


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
