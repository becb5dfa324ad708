"""Re-score a registry version on a split, beside the baselines its task defines in the same harness (the task's
`evaluation_table`, when it has one).

`evaluate.model` names the version as `name`, `name:v0003`, `name:<alias>` or `name:latest`; `evaluate.task`
overrides task settings for this scoring only (for example `evaluate.task={exclude_history: false}`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from ecomray import registry
from ecomray.data import shards
from ecomray.inference import build_from_version
from ecomray.runtime import UserError, write_atomic
from ecomray.tasks import key_metrics, load_task


def _current_task_keys(name: str | None) -> set[str]:
    """The settings of `conf/task/<name>.yaml` today: a version registered before a setting existed (the task reads
    it with a default) may still be evaluated with it."""
    import yaml

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "task", f"{name}.yaml")
    try:
        with open(path, encoding="utf-8") as fh:
            return set(yaml.safe_load(fh) or {})
    except (OSError, yaml.YAMLError, TypeError):
        return set()


SETTINGS = ("model", "version", "split", "task", "baselines", "other_data")


def check_settings(ev: dict) -> None:
    """`evaluate.*` typed before anything runs (the pipeline calls it before its first stage): `other_data=no`
    counted as true and scored a version on data it never saw, `baselines=no` still ran them, and `+evaluate.splt`
    was ignored."""
    unknown = sorted(set(ev) - set(SETTINGS))
    if unknown:
        raise UserError(f"evaluate: unknown setting(s) {unknown} (it has {list(SETTINGS)})")
    for key in ("baselines", "other_data"):
        if key in ev and not isinstance(ev[key], bool):
            raise UserError(f"evaluate.{key}={ev[key]!r}: true or false")
    if ev.get("split", "test") not in ("val", "test"):
        raise UserError(f"evaluate.split={ev.get('split')!r}: use val or test (the splits a model is scored on)")
    if ev.get("task") is not None and not isinstance(ev["task"], dict):
        raise UserError(f"evaluate.task={ev['task']!r}: write a mapping of task settings, e.g. "
                        f"'evaluate.task={{eval_sampled: 100}}'")


def evaluate_version(cfg: dict) -> dict[str, Any]:
    ev = cfg.get("evaluate") or {}
    check_settings(ev)
    name, ref = registry.parse_ref(ev.get("model") or registry.model_name(cfg))
    found = registry.load(cfg["paths"]["registry"], name, ev.get("version") or ref)
    # the version's own task/model/dataset, today's locations, and this run's task overrides
    vcfg = {**found["config"], "paths": cfg["paths"]}
    overrides = ev.get("task") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"evaluate.task={overrides!r}: write a mapping of task settings, e.g. "
                        f"'evaluate.task={{eval_sampled: 100}}'")
    task_name = vcfg["task"].get("name")
    unknown = sorted(set(overrides) - set(vcfg["task"]) - _current_task_keys(task_name))
    if unknown:     # a typo used to be ignored: the figures were the defaults'
        raise UserError(f"evaluate.task: {name} {found['version']}'s task {task_name} has no "
                        f"setting(s) {unknown} (it has {sorted(k for k in vcfg['task'] if not k.startswith('_'))})")
    scoring = getattr(load_task(vcfg), "EVAL_OPTIONS", None)
    if scoring is not None and set(overrides) - set(scoring):
        # a setting that builds the data or the features (a vocabulary's min_count, max_chars) would score a model
        # on inputs it never saw, under the version's name
        raise UserError(f"evaluate.task: {sorted(set(overrides) - set(scoring))} change(s) how task {task_name} "
                        f"builds its data or features, not how a version is scored; evaluate.task takes "
                        f"{sorted(scoring) or 'no settings'} (train again to try the others)")
    vcfg["task"] = {**vcfg["task"], **overrides}
    split = ev.get("split", "test")
    if split not in ("val", "test"):
        raise UserError(f"evaluate.split={split!r}: use val or test (the splits a model is scored on)")
    task = load_task(vcfg)
    trained_on = (found.get("lineage") or {}).get("data_manifest_hash")
    now = shards.require(vcfg, check_options=False).get("hash")   # (the hash check below decides: other_data)
    if trained_on and now != trained_on:
        # The task fits its features (tokenizer, vocabularies, statistics) on the train split as it builds the data:
        # on another preparation they are not the version's, and the figures are not the model's (a text classifier
        # scored 0.68 here and 0.96 in batch_predict, which uses the version's own features).
        why = (f"{name} {found['version']} trained on another preparation of {shards.dataset_dir(vcfg)} (manifest "
               f"hash {trained_on[:12]}, now {str(now)[:12]}; the same files prepared in another folder count too: "
               f"the hash names the sources, their size and modification time): the task's features would be fitted again on this one, and its {split} "
               f"rows may include rows the model trained on")
        if not ev.get("other_data"):
            raise UserError(f"{why}; score new rows with `python -m jobs.batch_predict` (the version's own "
                            f"features), train again, or pass evaluate.other_data=true to score anyway")
        print(f"WARNING: {why}: these figures are not comparable with its registered metrics", flush=True)
    data = task.build_data(vcfg, 0, 1)
    model = build_from_version(found)   # the same loader as serving and batch scoring
    baselines = bool(ev.get("baselines", True))
    if hasattr(task, "evaluation_table"):
        rows = task.evaluation_table(model, found["meta"], data, split, baselines)
    else:
        rows = {"model": task.evaluate(model, data, split)}
    report = {"model": name, "version": found["version"], "split": split, "task_overrides": overrides,
              "data_manifest_hash": now, "same_data_as_training": (now == trained_on) if trained_on else None,
              "metrics": rows}
    print(f"evaluate {name} {found['version']} on {split}"
          + (f" (task overrides {json.dumps(overrides)})" if overrides else "") + ":")
    first = next(iter(rows.values()))
    keys = [k for k in key_metrics(task) if k in first] or [k for k, v in first.items() if isinstance(v, float)]
    keys += [f"sampled_{k}" for k in keys if f"sampled_{k}" in first]   # (eval_sampled: they were in the JSON only)
    widths = [max(10, len(k) + 2) for k in keys]
    print("  " + f"{'':12s}" + "".join(f"{k:>{w}s}" for k, w in zip(keys, widths)))
    for who, m in rows.items():
        print("  " + f"{who:12s}" + "".join(f"{m.get(k, float('nan')):{w}.4f}" for k, w in zip(keys, widths)))
    os.makedirs(cfg["paths"]["reports"], exist_ok=True)
    suffix = "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
    if len(suffix) > 100 or not re.fullmatch(r"[\w.=+-]*", suffix):   # a value with '/' named a folder that wasn't
        suffix = "-task-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:12]
    if report["same_data_as_training"] is False:    # never in place of the version's own evaluation
        suffix += "-other_data"
    write_atomic(os.path.join(cfg["paths"]["reports"], f"{name}-{found['version']}-{split}{suffix}.json"),
                 json.dumps(report, indent=2))
    return report
