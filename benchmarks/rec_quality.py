"""Sequential recommendation on Amazon Beauty / Sports against the published bars (eSASRec paper, same files).

    python benchmarks/rec_quality.py                    # both datasets
    python benchmarks/rec_quality.py --datasets beauty

Protocol (amazon_seqrec/SOURCE.md): leave-one-out, full ranking over all items, max length 50; the model is
selected on validation (early stopping on val/ndcg@10) and scored once on test, with history items excluded
(the comparison) and kept. Trains through the platform (`jobs.prepare`, `jobs.train` with Ray Train).
Writes benchmarks/results/rec_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
BARS = {"beauty": {"hr@10": 0.0928, "ndcg@10": 0.0531}, "sports": {"hr@10": 0.0569, "ndcg@10": 0.0323}}
NAMES = {"beauty": ("amazon_beauty", "beauty_sasrec"), "sports": ("amazon_sports", "sports_sasrec")}


def run_one(key: str, root: str, extra: list[str], reuse: dict | None = None) -> dict:
    from ecomray.data.prepare import run as prepare
    from ecomray.evaluation import evaluate_version
    from ecomray.runtime import to_plain
    from ecomray.train.driver import fit

    dataset, experiment = NAMES[key]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_plain(compose("evaluate", overrides=[f"experiment={experiment}", f"paths.root={root}",
                                                      "overwrite=true", *extra]))
    t0 = time.time()
    if reuse:  # re-score the version an earlier run registered; keep that run's training figures
        res = dict(reuse)
        out = {"version": reuse["version"]}
    else:
        prepare(cfg)
        out = fit(cfg)
        res = {"wall_seconds": time.time() - t0, "epochs_run": out["metrics"]["epochs_run"], "version": out["version"],
               "val": {k[4:]: v for k, v in out["metrics"].items() if k.startswith("val/")}}
    for exclude in (True, False):
        vcfg = {**cfg, "evaluate": {"version": out["version"], "split": "test", "baselines": True,
                                    "task": {"exclude_history": exclude}}}
        rep = evaluate_version(vcfg)
        res["test_history_excluded" if exclude else "test_history_kept"] = rep["metrics"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["beauty", "sports"], choices=list(NAMES))
    ap.add_argument("--root", default=str(ROOT / "benchmarks" / "work" / "rec"))
    ap.add_argument("--rescore", action="store_true", help="only re-score the versions of the last results file")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the experiment")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results" / "rec_quality.json"
    previous = json.loads(out.read_text())["results"] if args.rescore else {}
    os.environ.setdefault("ECOMRAY_DATASETS", str(ROOT.parent / "shared" / "datasets"))
    results = {}
    for key in args.datasets:
        results[key] = run_one(key, args.root, args.overrides, previous.get(key))
    print(f"\n{'dataset':8s}{'HR@10':>9s}{'bar':>8s}{'NDCG@10':>9s}{'bar':>8s}{'pop HR@10':>11s}{'kNN HR@10':>11s}"
          f"{'wall s':>9s}  (test, history excluded)")
    for key, r in results.items():
        rows = r["test_history_excluded"]
        m, pop, knn = rows["model"], rows["popularity"], rows.get("item_knn", {"hr@10": float("nan")})
        print(f"{key:8s}{m['hr@10']:9.4f}{BARS[key]['hr@10']:8.4f}{m['ndcg@10']:9.4f}{BARS[key]['ndcg@10']:8.4f}"
              f"{pop['hr@10']:11.4f}{knn['hr@10']:11.4f}{r['wall_seconds']:9.0f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bars": BARS, "results": results,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    if out.exists():  # keep other datasets' earlier results
        old = json.loads(out.read_text())
        payload["results"] = {**old.get("results", {}), **results}
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
