"""Re-score a registry version on a split, beside baselines in the same harness (most-popular and item-kNN for
next-item; on the synthetic shop also an oracle ranking by the generator's true preferences).

`evaluate.model` names the version as `name`, `name:v0003`, `name:<alias>` or `name:latest`."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from ecomray import registry
from ecomray.data.prepare import load_manifest
from ecomray.inference import build_from_version
from ecomray.tasks import load_task
from ecomray.train.driver import registry_name


def evaluate_version(cfg: dict) -> dict[str, Any]:
    ev = cfg.get("evaluate") or {}
    name, ref = registry.parse_ref(ev.get("model") or registry_name(cfg))
    found = registry.load(cfg["paths"]["registry"], name, ev.get("version") or ref)
    vcfg = {**found["config"], "paths": cfg["paths"]}  # the version's own task/model/dataset, today's locations
    if ev.get("exclude_history") is not None:            # rank with history items excluded or kept
        vcfg["task"] = {**vcfg["task"], "exclude_history": bool(ev["exclude_history"])}
    if ev.get("sampled") is not None:                    # also rank against N seeded random negatives
        vcfg["task"] = {**vcfg["task"], "eval_sampled": int(ev["sampled"])}
    split = ev.get("split", "test")
    task = load_task(vcfg)
    data = task.build_data(vcfg, 0, 1)
    model = build_from_version(found)   # the same loader as serving and batch scoring
    if "threshold" in found["meta"]:  # decision threshold chosen on validation at training time
        data.threshold = found["meta"]["threshold"]
    rows = {"model": task.evaluate(model, data, split)}
    if ev.get("baselines", True) and hasattr(task, "baselines"):
        for who, scorer in task.baselines(data).items():   # most-popular, item-kNN: the same harness
            rows[who] = task.evaluate(None, data, split, scorer=scorer)
        manifest = load_manifest(os.path.join(cfg["paths"]["data"], vcfg["dataset"]["name"]))
        if manifest.get("truth_dir"):
            rows["oracle"] = task.evaluate(None, data, split, scorer=_oracle(manifest["truth_dir"], data))
    exclude = vcfg["task"].get("exclude_history", True)
    report = {"model": name, "version": found["version"], "split": split, "exclude_history": exclude, "metrics": rows}
    print(f"evaluate {name} {found['version']} on {split} (history items {'excluded' if exclude else 'kept'}):")
    keys = [k for k in next(iter(rows.values())) if not k.startswith("sampled_")]
    print("  " + f"{'':12s}" + "".join(f"{k:>10s}" for k in keys))
    for who, m in rows.items():
        print("  " + f"{who:12s}" + "".join(f"{m[k]:10.4f}" for k in keys))
    os.makedirs(cfg["paths"]["reports"], exist_ok=True)
    suffix = "" if exclude else "-history-kept"
    with open(os.path.join(cfg["paths"]["reports"], f"{name}-{found['version']}-{split}{suffix}.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    return report


def _oracle(truth_dir: str, data: Any):
    """Scores every item by the generator's true preference for the user (given the last item)."""
    from ecomray.data import synthetic

    truth = synthetic.load_truth(truth_dir)
    col = np.array([truth.item_index()[i] for i in data.item_ids])  # vocab order -> truth order

    def score(histories: list[np.ndarray], rows: list[int]) -> torch.Tensor:
        users = [data.users[r] for r in rows]
        hist = [[data.item_ids[k - 1] for k in h] for h in histories]
        return torch.from_numpy(synthetic.true_scores(truth, users, hist)[:, col]).float()

    return score
