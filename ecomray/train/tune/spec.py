"""A sweep as data: `conf/sweep/<name>.yaml` validated and turned into Tune's search space, and the dotted-key
overrides that make a trial's config."""

from __future__ import annotations

import copy
from typing import Any

from ecomray import registry
from ecomray.runtime import UserError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
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
    if spec["num_samples"] < 1:
        raise UserError(f"sweep.num_samples must be >= 1 (got {spec['num_samples']}): the number of trials "
                        f"(times the grid's points)")
    if spec.get("time_budget_s") is not None and not float(spec["time_budget_s"]) > 0:
        raise UserError(f"sweep.time_budget_s must be > 0, or null for no limit (got {spec['time_budget_s']})")
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
