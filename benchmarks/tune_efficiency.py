"""How much compute ASHA saves over an exhaustive grid on the same search space (tiny experiment, local Ray).

    flock /tmp/ecomray-heavy.lock .venv/bin/python benchmarks/tune_efficiency.py [--users 1500] [--epochs 9]

Runs the same grid (learning rate x model width) twice through `jobs.tune`: every point to the end (`scheduler: none`),
and with ASHA. Each trial is the real training driver (one 1-CPU Ray Train worker; trials two at a time on 2 CPUs).
Training is seeded, so a config trains to the same curve in both sweeps: ASHA can only lose the grid's best by
stopping it. Reports, for each sweep: trial-epochs, reserved CPU-seconds (sum over trials of wall x CPUs), sweep
wall seconds and the best validation metric; and the fraction of the grid's trial-epochs ASHA had spent (in the
order its epochs finished) when its best-so-far first came within 1% of the grid's best. Writes
benchmarks/results/tune_efficiency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LRS, DIMS = [3e-4, 1e-3, 3e-3, 1e-2], [16, 32, 64]


def _cfg(tmp: Path, name: str, scheduler: dict, args: argparse.Namespace, shuffle: int | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    from ecomray.runtime import to_plain

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_plain(compose("tune", overrides=[f"paths.root={tmp}", "experiment=tiny", "sweep=tiny",
                                                  f"dataset.synthetic.users={args.users}"]))
    cfg["sweep"] = {"name": name, "metric": None, "mode": None, "num_samples": 1, "search": "random", "seed": 0,
                    "scheduler": scheduler, "time_budget_s": 3600,
                    "fixed": {"train.epochs": args.epochs, "train.patience": 1000},
                    "space": {"optim.lr": {"grid": _order(LRS, shuffle)}, "model.dim": {"grid": _order(DIMS, shuffle)}}}
    cfg["tune"] = {**cfg.get("tune", {}), "register": False, "resume": False}
    return cfg


def _order(values: list, seed: int | None) -> list:
    """The grid's values as written (ascending), or in a seeded random order: async ASHA keeps whatever beats the
    trials before it, so an ascending learning rate, where every new trial beats the last, is its worst case."""
    if seed is None:
        return list(values)
    import random

    out = list(values)
    random.Random(seed).shuffle(out)
    return out


def _summary(out: dict, cpus_per_trial: float, mode: str) -> dict:
    import csv

    with open(out["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    with open(os.path.join(out["sweep_dir"], "curves.json")) as fh:
        curves = json.load(fh)
    metric_col = next(c for c in rows[0] if c.startswith("best "))
    sign = 1 if mode == "max" else -1
    best = max((float(r[metric_col]) for r in rows), key=lambda v: sign * v)
    # every finished epoch of every trial, in the order they finished: (time, value)
    epochs = sorted((t, v) for pts in curves.values() for _, v, t in pts)
    return {"trials": len(rows), "trial_epochs": sum(int(r["epochs_run"]) for r in rows),
            "stopped_early": sum(r["stopped_early"] == "True" for r in rows),
            "cpu_seconds": sum(float(r["wall_s"]) for r in rows) * cpus_per_trial,
            "sweep_wall_s": out["sweep_seconds"], "best": best, "epochs_in_order": epochs, "metric": out["metric"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled value order")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_efficiency.json"))
    args = p.parse_args()

    import ray

    from ecomray.data.prepare import run as prepare
    from ecomray.train.tune import trial_resources
    from jobs.tune import run

    tmp = Path(tempfile.mkdtemp(prefix="ecomray-tune-bench-"))
    asha = {"name": "asha", "grace_period": 1, "reduction_factor": 3, "max_t": None}
    cfgs = {"grid": _cfg(tmp, "grid", {"name": "none"}, args), "asha": _cfg(tmp, "asha", asha, args),
            "asha_shuffled": _cfg(tmp, "asha_shuffled", asha, args, shuffle=args.seed)}
    prepare(cfgs["grid"])
    ray.init(num_cpus=2, include_dashboard=False)
    cpus = trial_resources(cfgs["grid"])[1]["CPU"]
    mode = cfgs["grid"]["train"]["mode"]
    res = {}
    for name, cfg in cfgs.items():
        t0 = time.time()
        res[name] = _summary(run(cfg), cpus, mode)
        print(f"[bench] {name}: {time.time() - t0:.0f}s", flush=True)
    ray.shutdown()

    grid = res["grid"]
    sign = 1 if mode == "max" else -1
    target = grid["best"] * (0.99 if mode == "max" else 1.01)
    within: dict[str, dict] = {}
    for name in ("asha", "asha_shuffled"):
        ash = res[name]
        spent, reached, best_so_far = 0, None, None
        for _, v in ash["epochs_in_order"]:
            spent += 1
            best_so_far = v if best_so_far is None else max(best_so_far, v, key=lambda x: sign * x)
            if sign * best_so_far >= sign * target:
                reached = spent
                break
        fraction = None if reached is None else reached / grid["trial_epochs"]
        within[name] = {"trial_epochs": reached, "fraction_of_grid_compute": fraction, "target": 0.4,
                        "meets_target": fraction is not None and fraction <= 0.4,
                        "total_fraction": {"trial_epochs": ash["trial_epochs"] / grid["trial_epochs"],
                                           "cpu_seconds": ash["cpu_seconds"] / grid["cpu_seconds"],
                                           "sweep_wall_s": ash["sweep_wall_s"] / grid["sweep_wall_s"]}}
    result = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
                   f"{platform.system()}; local Ray with 2 CPUs; torch CPU; trials 2 at a time",
        "setup": {"experiment": "tiny", "users": args.users, "epochs": args.epochs,
                  "grid": f"optim.lr {LRS} x model.dim {DIMS} (12 points)", "asha": asha,
                  "shuffled_order": {"seed": args.seed, "optim.lr": _order(LRS, args.seed),
                                     "model.dim": _order(DIMS, args.seed)},
                  "metric": grid["metric"], "mode": mode},
        **{name: {k: v for k, v in res[name].items() if k != "epochs_in_order"} for name in res},
        "within_1pct_of_grid_best": within,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print("\n| sweep | trials | stopped early | trial-epochs | reserved CPU-s | sweep wall s | best "
          + grid["metric"] + " |")
    print("|---|---|---|---|---|---|---|")
    for name in ("grid", "asha", "asha_shuffled"):
        r = res[name]
        print(f"| {name} | {r['trials']} | {r['stopped_early']} | {r['trial_epochs']} | {r['cpu_seconds']:.0f} | "
              f"{r['sweep_wall_s']:.0f} | {r['best']:.4f} |")
    for name, w in within.items():
        f, tot = w["fraction_of_grid_compute"], w["total_fraction"]
        print(f"{name}: within 1% of the grid's best after {w['trial_epochs']} trial-epochs = "
              f"{'n/a' if f is None else f'{f:.2f}'} of the grid's {grid['trial_epochs']} (target <= 0.4); in all "
              f"{tot['trial_epochs']:.2f} of its trial-epochs, {tot['cpu_seconds']:.2f} of its CPU-seconds, "
              f"{tot['sweep_wall_s']:.2f} of its wall time")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
