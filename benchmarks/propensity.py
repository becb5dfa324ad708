"""Purchase propensity on UCI Online Shoppers: ecomray's models vs LightGBM on the same split, side by side.

    python benchmarks/propensity.py [--seeds 42 1 2]     (needs the `bench` extra: LightGBM)

All sides read the same prepared shards (seeded stratified 70/10/20 split) and the same numeric columns, and every
choice is made on validation: ecomray keeps its best-val-AUC epoch (`experiment=propensity`, DCN ensemble; the
single DCN `model=tabular_dcn` is shown for reference) and uses the categoricals its experiment chose on validation;
LightGBM picks its categoricals from the same candidate sets (CATEGORICAL_SETS) and its size from a small grid, both
by validation AUC, and its number of trees by early stopping on the same validation rows. F1 is at the threshold that maximizes F1 on
validation. With several seeds the table shows medians over seeds (the split stays fixed; the seed moves the
models' initialization and data order, and LightGBM's bagging). For each seed a paired bootstrap over the test
rows (the same resampled rows scored for both sides) gives a 95% interval for ecomray's AUC minus LightGBM's, which
says whether a gap of a few thousandths is more than the test split's noise.
Writes benchmarks/results/propensity.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from sklearn.metrics import f1_score, log_loss, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
# n_jobs=1: on a shared 2-core box OpenMP threads spin-wait behind other processes (one fit took minutes).
LGBM_GRID = {"num_leaves": [7, 15, 31], "min_child_samples": [20, 50]}
# Categorical columns each side may use: every set considered when choosing ecomray's features on validation (the
# experiment keeps one of them). LightGBM picks its own set, with its size, by validation AUC.
CATEGORICAL_SETS = {
    "all": ["Month", "OperatingSystems", "Browser", "Region", "TrafficType", "VisitorType", "Weekend"],
    "no_region": ["Month", "OperatingSystems", "Browser", "TrafficType", "VisitorType", "Weekend"],
    "no_browser": ["Month", "OperatingSystems", "Region", "TrafficType", "VisitorType", "Weekend"],
    "no_os": ["Month", "Browser", "Region", "TrafficType", "VisitorType", "Weekend"],
    "no_region_browser_os": ["Month", "TrafficType", "VisitorType", "Weekend"],
    "month_visitor_weekend": ["Month", "VisitorType", "Weekend"],
    "no_month": ["OperatingSystems", "Browser", "Region", "TrafficType", "VisitorType", "Weekend"],
}


def _cfg(root: Path, *overrides: str) -> dict:
    from ecomray.runtime import to_plain

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return to_plain(compose("train", overrides=["experiment=propensity", "scaling=inproc", f"paths.root={root}",
                                                    "overwrite=true", *overrides]))


def _ecomray(cfg: dict) -> dict[str, Any]:
    """Train (the real loop, in-process), then score the best epoch's weights once: metrics and test probabilities."""
    import torch

    from ecomray.tasks import propensity
    from ecomray.train.driver import fit

    t0 = time.time()
    run = fit(cfg, register=False, evaluate=False)
    state = torch.load(Path(run["checkpoint"]) / "state.pt", weights_only=False, map_location="cpu")
    data = propensity.build_data(cfg)
    model = propensity.build_model(cfg, data)
    model.load_state_dict(state["best_model"])
    val = propensity.evaluate(model, data, "val")           # first: it sets the F1 threshold on validation
    test = propensity.evaluate(model, data, "test")
    seconds = time.time() - t0
    return {"auc": test["auc"], "logloss": test["logloss"], "f1": test["f1"], "threshold": test["threshold"],
            "val_auc": val["auc"], "seconds": seconds, "epochs": len(state["history"]),
            # the best epoch's test probabilities, for the paired bootstrap (rows in the task's order: _file, _row)
            "p_test": propensity.probabilities(model, data.splits["test"])}


def paired_bootstrap(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, rounds: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same rows, and its 2.5/97.5 percentiles over `rounds` resamples of the rows."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        diffs.append(roc_auc_score(y[idx], p_a[idx]) - roc_auc_score(y[idx], p_b[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": float(roc_auc_score(y, p_a) - roc_auc_score(y, p_b)), "ci95": [float(lo), float(hi)],
            "p_b_better": float(np.mean(np.asarray(diffs) < 0))}


def _lightgbm(Xs: dict[str, Any], y: np.ndarray, part: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """LightGBM's best (feature set, size) by validation AUC; trees by early stopping on the validation rows."""
    import lightgbm as lgb

    from ecomray.tasks.propensity import best_threshold

    # lightgbm 4.6+ prefers eval_X/eval_y; eval_set still works and keeps the `bench` extra's lightgbm>=4.3.
    warnings.filterwarnings("ignore", message="The argument 'eval_set' is deprecated")
    t0 = time.time()
    best: tuple[float, Any, dict, str] | None = None
    for features, X in Xs.items():
        for values in itertools.product(*LGBM_GRID.values()):
            params = dict(zip(LGBM_GRID, values))
            gbm = lgb.LGBMClassifier(n_estimators=3000, learning_rate=0.02, subsample=0.8, subsample_freq=1,
                                     colsample_bytree=0.8, random_state=seed, verbose=-1, n_jobs=1, **params)
            gbm.fit(X[part["train"]], y[part["train"]], eval_set=[(X[part["val"]], y[part["val"]])],
                    eval_metric="auc", callbacks=[lgb.early_stopping(200, verbose=False)])
            val_auc = roc_auc_score(y[part["val"]], gbm.predict_proba(X[part["val"]])[:, 1])
            if best is None or val_auc > best[0]:
                best = (val_auc, gbm, params, features)
    val_auc, gbm, params, features = best
    X = Xs[features]
    p_val, p_test = gbm.predict_proba(X[part["val"]])[:, 1], gbm.predict_proba(X[part["test"]])[:, 1]
    thr = best_threshold(y[part["val"]], p_val)
    yt = y[part["test"]]
    return {"auc": roc_auc_score(yt, p_test), "logloss": log_loss(yt, p_test), "f1": f1_score(yt, p_test >= thr),
            "threshold": thr, "val_auc": val_auc, "seconds": time.time() - t0,
            "trees": int(gbm.best_iteration_ or gbm.n_estimators), "params": params, "categoricals": features,
            "p_test": p_test}


def main() -> None:
    import polars as pl

    from ecomray.data.prepare import run as prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--note", default="nothing else running (flock /tmp/ecomray-heavy.lock)",
                    help="what else ran on the machine meanwhile (concurrent_load in the JSON)")
    args = ap.parse_args()
    t0 = time.time()
    try:
        import lightgbm  # noqa: F401  (checked before any training: the comparison needs it)
    except ImportError:
        raise SystemExit("benchmarks/propensity.py needs LightGBM, in the `bench` extra: "
                         "ECOMRAY_EXTRAS=bench bash scripts/setup.sh (or pip install -e '.[bench]')") from None
    os.environ.setdefault("ECOMRAY_DATASETS", str(ROOT.parent / "shared" / "datasets"))
    root = ROOT / "benchmarks" / "work" / "propensity"
    base = _cfg(root)
    prepare(base)

    folder = Path(base["paths"]["data"]) / base["dataset"]["name"]
    df = pl.read_parquet(str(folder / "shards" / "*.parquet")).sort("_file", "_row")
    task = base["task"]
    label = task.get("label") or base["dataset"]["schema"]["label"]
    assert task["categorical"] in CATEGORICAL_SETS.values(), "the experiment's categoricals are not a candidate set"
    Xs = {name: df.select([*task["numeric"], *[pl.col(c).cast(pl.Utf8).cast(pl.Categorical) for c in cats]]
                          ).to_pandas() for name, cats in CATEGORICAL_SETS.items()}
    y = df[label].cast(pl.Int8).to_numpy()
    part = {s: (df["split"] == s).to_numpy() for s in ("train", "val", "test")}

    sides = {"ecomray dcn_ensemble": lambda s: _ecomray(_cfg(root, f"seed={s}")),
             "ecomray tabular_dcn": lambda s: _ecomray(_cfg(root, f"seed={s}", "model=tabular_dcn", "~model.members",
                                                              "model.hidden=[64]", "model.dropout=0.1")),
             "lightgbm": lambda s: _lightgbm(Xs, y, part, s)}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for seed in args.seeds:                     # interleaved, so machine load hits every side alike
        for name, side in sides.items():
            runs[name].append({"seed": seed, **side(seed)})
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("auc", "logloss", "f1", "val_auc", "seconds")}
           for name, rs in runs.items()}

    print(f"\nmedian over seeds {args.seeds}; test split {int(part['test'].sum())} rows")
    print(f"{'model':22s}{'test AUC':>10s}{'logloss':>10s}{'F1@thr':>9s}{'val AUC':>9s}{'wall s':>8s}")
    for name, r in med.items():
        print(f"{name:22s}{r['auc']:10.4f}{r['logloss']:10.4f}{r['f1']:9.4f}{r['val_auc']:9.4f}{r['seconds']:8.1f}")
    diff = [a["auc"] - b["auc"] for a, b in zip(runs["ecomray dcn_ensemble"], runs["lightgbm"])]
    print(f"ecomray (dcn_ensemble) AUC - LightGBM AUC per seed: {' '.join(f'{d:+.4f}' for d in diff)} (target >= 0)")
    yt = y[part["test"]]
    for r in runs["ecomray dcn_ensemble"]:   # same rows, same order as the task's test split
        assert abs(roc_auc_score(yt, r["p_test"]) - r["auc"]) < 1e-9, "test rows are not aligned"
    boot = [{"seed": a["seed"], **paired_bootstrap(yt, a["p_test"], b["p_test"], seed=a["seed"])}
            for a, b in zip(runs["ecomray dcn_ensemble"], runs["lightgbm"])]
    for b in boot:
        print(f"  seed {b['seed']}: paired bootstrap 95% interval of the difference [{b['ci95'][0]:+.4f}, "
              f"{b['ci95'][1]:+.4f}]; LightGBM ahead in {100 * b['p_b_better']:.0f}% of resamples")
    for rs in runs.values():          # probabilities are not kept in the JSON
        for r in rs:
            r.pop("p_test", None)
    out = ROOT / "benchmarks" / "results" / "propensity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "split": {k: int(v.sum()) for k, v in part.items()}, "seeds": args.seeds, "median": med, "runs": runs,
        "auc_diff_vs_lightgbm": diff,
        "paired_bootstrap": boot, "ecomray_model": base["model"], "lightgbm_grid": LGBM_GRID,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "concurrent_load": args.note, "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0, 1)},
        indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
