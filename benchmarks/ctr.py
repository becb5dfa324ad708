"""Click-through rate on BARS Frappe_x1: ecomray's DeepFM (and DCN-V2, FinalMLP) against FuxiCTR's DeepFM, side by
side.

    python benchmarks/ctr.py [--seeds 2021 1 2] [--models deepfm dcnv2 finalmlp] [--skip-fuxictr]

Both sides read the same three files of `$ECOMRAY_DATASETS/frappe_x1` (the exact BARS valid and test, and a train
rebuilt from the raw logs: results are close to, not strictly comparable with, the BARS leaderboard; see its
SOURCE.md), use the BARS DeepFM settings, choose the epoch on valid AUC and score test once, on the same 2 cores.

- ecomray: `python -m jobs.train experiment=frappe_<model> seed=<s>` in a subprocess (one Ray Train worker with
  both cores, the registry version's metrics), after `jobs.prepare dataset=frappe` (timed once).
- FuxiCTR: `benchmarks/ctr_fuxictr.py` in its own virtual environment (`benchmarks/work/fuxictr-venv`, made here:
  fuxictr 2.3.x with `polars<2`, because its CSV reader calls `scan_csv(dtypes=...)`, gone in Polars 2; the same
  CPU torch), DeepFM built from FuxiCTR's BaseModel, feature processing and layers.

Wall time: ecomray = prepare + the training job (Python and Ray start-up, training, scoring val and test,
registering); FuxiCTR = its feature building + training + scoring. Runs are one at a time. Writes
benchmarks/results/ctr.json (mean and standard deviation over seeds, and every run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"
VENV = WORK / "fuxictr-venv"
FUXICTR = "fuxictr==2.3.10"
BARS = {"DeepFM": (0.9842, 0.1482), "DCN-V2": (0.9845, 0.1491), "FinalMLP": (0.9861, 0.1484),
        "FinalNet (best logloss)": (0.9857, 0.1311)}


def datasets() -> Path:
    return Path(os.environ.get("ECOMRAY_DATASETS", ROOT.parent / "shared" / "datasets"))


def fuxictr_python() -> str:
    """The benchmark's own environment for FuxiCTR (made once; the CPU torch wheel is installed first)."""
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import fuxictr, polars; assert polars.__version__ < '2'"],
                                      capture_output=True).returncode == 0:
        return str(py)
    print(f"[ctr] making {VENV} ({FUXICTR}, polars<2, torch==2.13.0 CPU)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, os.environ.get("ECOMRAY_TORCH", "torch==2.13.0")], check=True)
    subprocess.run([*pip, FUXICTR, "polars<2"], check=True)
    return str(py)


def run_ecomray(model: str, seed: int, root: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "jobs.train", f"experiment=frappe_{model}", f"seed={seed}", f"paths.root={root}",
           f"registry_name=bench_frappe_{model}", f"paths.datasets={datasets()}"]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    version = re.search(r"registered (\S+) (v\d+)", out.stdout)
    assert version, out.stdout[-2000:]
    folder = root / "registry" / version.group(1) / version.group(2)
    m = json.loads((folder / "metrics.json").read_text())
    return {"seed": seed, "test_auc": m["test/auc"], "test_logloss": m["test/logloss"], "val_auc": m["val/auc"],
            "epochs": m["epochs_run"], "train_s": round(m.get("train_seconds", float("nan")), 2),
            "wall_s": round(wall, 2), "version": version.group(2)}


def run_fuxictr(py: str, seed: int) -> dict[str, Any]:
    cmd = [py, str(ROOT / "benchmarks" / "ctr_fuxictr.py"), "--data", str(datasets() / "frappe_x1"),
           "--work", str(WORK / "fuxictr-frappe"), "--seed", str(seed), "--threads", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


def summary(runs: list[dict[str, Any]], extra_s: float = 0.0) -> dict[str, Any]:
    def ms(key: str, add: float = 0.0) -> tuple[float, float]:
        vals = [r[key] + add for r in runs]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    (auc, auc_sd), (ll, ll_sd), (wall, wall_sd) = ms("test_auc"), ms("test_logloss"), ms("wall_s", extra_s)
    return {"test_auc_mean": auc, "test_auc_std": auc_sd, "test_logloss_mean": ll, "test_logloss_std": ll_sd,
            "wall_s_mean": wall, "wall_s_std": wall_sd, "epochs": [r["epochs"] for r in runs], "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[2021, 1, 2])
    ap.add_argument("--models", nargs="+", default=["deepfm", "dcnv2", "finalmlp"])
    ap.add_argument("--skip-fuxictr", action="store_true")
    ap.add_argument("--note", default="nothing else running (flock /tmp/ecomray-heavy.lock)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the runs already in benchmarks/work/ctr/runs.jsonl (same side and seed)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the sides already in benchmarks/results/ctr.json that this run does not measure")
    args = ap.parse_args()
    root = WORK / "ctr"
    t0 = time.time()
    prep = subprocess.run([sys.executable, "-m", "jobs.prepare", "dataset=frappe", f"paths.root={root}",
                           f"paths.datasets={datasets()}", "overwrite=true"], cwd=ROOT, capture_output=True, text=True)
    if prep.returncode != 0:
        raise RuntimeError(prep.stderr[-3000:])
    prepare_s = time.time() - t0
    sides: dict[str, Any] = {}
    py = None if args.skip_fuxictr else fuxictr_python()
    log = root / "runs.jsonl"             # every run as it ends: a crash loses nothing (--resume reuses them)
    done = {}
    if args.resume and log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["side"], r["seed"])] = r

    def one(side: str, seed: int, fn: Any) -> None:
        r = done.get((side, seed)) or {"side": side, **fn()}
        if (side, seed) not in done:
            with open(log, "a") as fh:
                fh.write(json.dumps(r) + "\n")
        sides.setdefault(side, []).append(r)
        print(f"[ctr] {side} seed {seed}: test AUC {r['test_auc']:.4f} logloss {r['test_logloss']:.4f}"
              f" ({r['epochs']} epochs, {r['wall_s']:.0f}s)", flush=True)

    for seed in args.seeds:           # interleaved: a slow spell of the machine hits both sides alike
        for model in args.models:
            one(f"ecomray {model}", seed, lambda: run_ecomray(model, seed, root))
        if py:
            one("FuxiCTR deepfm", seed, lambda: run_fuxictr(py, seed))
    results = {name: summary(runs, prepare_s if name.startswith("ecomray") else 0.0) for name, runs in sides.items()}
    path = ROOT / "benchmarks" / "results" / "ctr.json"
    if args.merge and path.exists():
        earlier = json.loads(path.read_text())
        results = {**{k: {**v, "measured_in": "an earlier run"} for k, v in earlier["results"].items()
                      if k not in results}, **results}
    print(f"\nBARS Frappe_x1 test (train rebuilt from the raw logs), mean +- std over seeds {args.seeds}:")
    print(f"{'side':<20}{'test AUC':>18}{'test logloss':>18}{'wall s':>14}")
    for name, r in results.items():
        print(f"{name:<20}{r['test_auc_mean']:>10.4f} +-{r['test_auc_std']:.4f}{r['test_logloss_mean']:>10.4f} +-"
              f"{r['test_logloss_std']:.4f}{r['wall_s_mean']:>8.0f} +-{r['wall_s_std']:.0f}")
    for name, (auc, ll) in BARS.items():
        print(f"{'BARS ' + name:<20}{auc:>18.4f}{ll:>18.4f}{'':>14}")
    out = {"benchmark": "ctr_frappe_x1", "seeds": args.seeds, "prepare_s": round(prepare_s, 2), "results": results,
           "bars_published": {k: {"test_auc": v[0], "test_logloss": v[1]} for k, v in BARS.items()},
           "train_note": "train_reconstructed.csv: positives exact, negatives' items re-drawn (frappe_x1/SOURCE.md)",
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": False},
           "fuxictr": FUXICTR if py else None, "concurrent_load": args.note,
           "wall_s": round(time.time() - t0, 1)}
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
