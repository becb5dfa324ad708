"""Purchase propensity on UCI Online Shoppers: ecomray's DCN-style model vs LightGBM on the same split.

    python benchmarks/propensity.py

Both sides read the same prepared shards (seeded stratified 70/10/20 split), the same features; LightGBM uses
early stopping on the same validation rows. F1 is at the threshold that maximizes F1 on validation.
Writes benchmarks/results/propensity.json.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from sklearn.metrics import f1_score, log_loss, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import lightgbm as lgb
    import polars as pl

    from ecomray.data.prepare import run as prepare
    from ecomray.runtime import to_plain
    from ecomray.tasks.propensity import best_threshold
    from ecomray.train.driver import fit

    os.environ.setdefault("ECOMRAY_DATASETS", str(ROOT.parent / "shared" / "datasets"))
    root = ROOT / "benchmarks" / "work" / "propensity"
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_plain(compose("train", overrides=["experiment=propensity", "scaling=inproc", f"paths.root={root}",
                                                   "overwrite=true"]))
    prepare(cfg)
    t0 = time.time()
    ours = fit(cfg)
    ours_s = time.time() - t0

    folder = Path(cfg["paths"]["data"]) / "shoppers"
    df = pl.read_parquet(str(folder / "shards" / "*.parquet")).sort("_file", "_row")
    task = cfg["task"]
    cats = task["categorical"]
    X = df.select([*task["numeric"], *[pl.col(c).cast(pl.Utf8).cast(pl.Categorical) for c in cats]]).to_pandas()
    y = df["Revenue"].cast(pl.Int8).to_numpy()
    part = {s: (df["split"] == s).to_numpy() for s in ("train", "val", "test")}
    t0 = time.time()
    gbm = lgb.LGBMClassifier(n_estimators=2000, learning_rate=0.03, num_leaves=31, min_child_samples=20,
                             subsample=0.8, subsample_freq=1, colsample_bytree=0.8, random_state=42, verbose=-1)
    gbm.fit(X[part["train"]], y[part["train"]], eval_set=[(X[part["val"]], y[part["val"]])], eval_metric="auc",
            callbacks=[lgb.early_stopping(100, verbose=False)])
    gbm_s = time.time() - t0
    p_val, p_test = gbm.predict_proba(X[part["val"]])[:, 1], gbm.predict_proba(X[part["test"]])[:, 1]
    thr = best_threshold(y[part["val"]], p_val)
    lgbm = {"auc": roc_auc_score(y[part["test"]], p_test), "logloss": log_loss(y[part["test"]], p_test),
            "f1": f1_score(y[part["test"]], p_test >= thr), "threshold": thr, "val_auc": roc_auc_score(y[part["val"]], p_val),
            "seconds": gbm_s, "trees": int(gbm.best_iteration_ or gbm.n_estimators)}
    m = ours["metrics"]
    eco = {"auc": m["test/auc"], "logloss": m["test/logloss"], "f1": m["test/f1"], "threshold": m["test/threshold"],
           "val_auc": m["val/auc"], "seconds": ours_s, "epochs": m["epochs_run"]}
    print(f"\n{'model':10s}{'test AUC':>10s}{'logloss':>10s}{'F1@thr':>9s}{'val AUC':>9s}{'wall s':>8s}")
    for name, r in (("ecomray", eco), ("lightgbm", lgbm)):
        print(f"{name:10s}{r['auc']:10.4f}{r['logloss']:10.4f}{r['f1']:9.4f}{r['val_auc']:9.4f}{r['seconds']:8.1f}")
    print(f"ecomray AUC - LightGBM AUC = {eco['auc'] - lgbm['auc']:+.4f} (target >= 0)")
    out = ROOT / "benchmarks" / "results" / "propensity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"split": {k: int(v.sum()) for k, v in part.items()}, "ecomray": eco, "lightgbm": lgbm,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
