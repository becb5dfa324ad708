"""The sweep's winner as a Hydra experiment file, so that

    python -m jobs.train --config-dir <sweep dir> experiment=<sweep>_best

retrains exactly that trial. The file is written from the winning trial's resolved config alone (it never reads
`conf/`, which an installed package does not carry): the config groups the run chose (`choices`, recorded by
`runtime.to_plain`) become `override /group: option` lines, and the complete values of every exported section
follow, so the groups' files can change later without changing what the experiment trains. Scaling is only named
as a group (never written as values), so `scaling=...` on the same command line still picks where it runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

# What the sweep's fingerprint covers, and (minus scaling) what the exported file sets in full.
EXPORT_KEYS = ("seed", "registry_name", "dataset", "task", "model", "optim", "scaling", "train")
GROUPS = ("dataset", "task", "model", "optim", "scaling")


def export_experiment(trial_cfg: dict, spec: dict, best: dict, sweep_dir: str,
                      choices: dict[str, str] | None = None) -> str:
    """Write `<sweep dir>/experiment/<sweep>_best.yaml`; returns its path."""
    chosen = {**(trial_cfg.get("choices") or {}), **(choices or {})}
    overrides = []
    for g in GROUPS:
        if chosen.get(g):
            overrides.append(f"  - override /{g}: {chosen[g]}")
        elif g != "scaling":
            overrides.append(f"  - override /{g}: null")   # the values below are the whole section
    body = {k: trial_cfg[k] for k in EXPORT_KEYS if k in trial_cfg and k != "scaling"}
    if not chosen.get("scaling"):
        body["scaling"] = trial_cfg["scaling"]                # unknown group: keep the trial's own resources
    name = f"{spec['name']}_best"
    lines = ["# @package _global_",
             f"# The winner of sweep `{spec['name']}`: trial {best['trial_id']}, {spec['metric']} = "
             f"{best['best_value']:.6g}",
             f"# with {json.dumps(best['config'], default=str)} (fixed for every trial: "
             f"{json.dumps(spec['fixed'], default=str)}).",
             f"# Retrain: python -m jobs.train --config-dir {sweep_dir} experiment={name}",
             "defaults:", *overrides, ""]
    os.makedirs(os.path.join(sweep_dir, "experiment"), exist_ok=True)
    path = os.path.join(sweep_dir, "experiment", f"{name}.yaml")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + yaml.safe_dump(_escape(body), sort_keys=False, allow_unicode=True))
    return path


def _escape(value: Any) -> Any:
    """Strings that OmegaConf would read as interpolations (`${...}`) are escaped, so they stay literal."""
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    if isinstance(value, str) and "${" in value:
        return value.replace("${", "\\${")
    return value
