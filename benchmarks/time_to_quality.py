"""Wall time until ecomray's SASRec reaches RecBole's validation quality on Amazon Beauty.

    python benchmarks/time_to_quality.py [--target 0.0465] [--epochs 4] [extra Hydra overrides]

The peer figure is RecBole 1.2.1's SASRec (CE loss, batch 256, full ranking) measured on this 2-core machine:
validation NDCG@10 0.0465 after 6 epochs, about 27 minutes (amazon_seqrec/SOURCE.md). RecBole pins an old Ray and
cannot be installed beside Ray 2.60, so that side is the recorded figure, not a side-by-side run.

ecomray's side is the real job, `python -m jobs.train experiment=beauty_sasrec` with the single SASRec
(`model=sasrec`, no label smoothing, no weight EMA: the fast configuration, not the 3-member ensemble that sets the
quality bars) on one Ray Train worker, started as a subprocess after `jobs.prepare`. The clock starts before
prepare does, so preparing the shards, Python and Ray start-up, data loading and every validation pass are included;
the time is taken when the epoch line whose `val/ndcg@10` first reaches the target is printed.
Writes benchmarks/results/time_to_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECBOLE = {"val_ndcg@10": 0.0465, "epochs": 6, "minutes": 27.0, "seconds_per_epoch": 270.0}
FAST = ["model=sasrec", "~model.members", "task.label_smoothing=0.0", "train.ema_decay=null"]
EPOCH_LINE = re.compile(r"\[train\] epoch\s+(\d+)\s.*?val/ndcg@10 ([0-9.]+)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=RECBOLE["val_ndcg@10"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--root", default=str(ROOT / "benchmarks" / "work" / "ttq"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the experiment")
    args = ap.parse_args()
    datasets = os.environ.get("ECOMRAY_DATASETS", str(ROOT.parent / "shared" / "datasets"))
    env = {**os.environ, "ECOMRAY_DATASETS": datasets}
    common = [f"paths.root={args.root}", "overwrite=true"]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "jobs.prepare", "dataset=amazon_beauty", *common], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "-m", "jobs.train", "experiment=beauty_sasrec", *FAST, f"train.epochs={args.epochs}",
           f"train.patience={args.epochs}", *common, *args.overrides]
    prepare_s = time.time() - t0
    print(f"prepared in {prepare_s:.1f} s\n$", " ".join(cmd[1:]), flush=True)
    epochs: dict[int, dict] = {}
    reached = None
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:                     # each epoch line comes once from the worker (Ray may repeat it)
            m = EPOCH_LINE.search(line)
            if not m or int(m.group(1)) in epochs:
                continue
            epoch, ndcg = int(m.group(1)), float(m.group(2))
            epochs[epoch] = {"epoch": epoch, "val_ndcg@10": ndcg, "wall_s": time.time() - t0}
            print(f"epoch {epoch}: val/ndcg@10 {ndcg:.4f} at {epochs[epoch]['wall_s']:.0f} s", flush=True)
            if reached is None and ndcg >= args.target:
                reached = epochs[epoch]
        total = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"jobs.train exited with {proc.returncode}")
    recbole_s = RECBOLE["minutes"] * 60
    print(f"\n{'side':34s}{'val/ndcg@10':>12s}{'epochs':>8s}{'wall s':>9s}")
    print(f"{'RecBole 1.2.1 SASRec (recorded)':34s}{RECBOLE['val_ndcg@10']:12.4f}{RECBOLE['epochs']:8d}{recbole_s:9.0f}")
    if reached:
        print(f"{'ecomray SASRec, 1 Ray Train worker':34s}{reached['val_ndcg@10']:12.4f}{reached['epoch'] + 1:8d}"
              f"{reached['wall_s']:9.0f}")
        print(f"speed-up to RecBole's quality: {recbole_s / reached['wall_s']:.1f}x (target >= 10x, <= 162 s)")
    else:
        print(f"ecomray did not reach val/ndcg@10 {args.target} in {args.epochs} epochs")
    out = ROOT / "benchmarks" / "results" / "time_to_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "target_val_ndcg@10": args.target, "recbole": RECBOLE, "command": " ".join(cmd[1:]),
        "epochs": list(epochs.values()), "reached": reached, "prepare_s": prepare_s, "process_wall_s": total,
        "speedup": recbole_s / reached["wall_s"] if reached else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}},
        indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
