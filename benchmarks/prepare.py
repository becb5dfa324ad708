"""Time `prepare` against the raw baseline on one event CSV, side by side in one run.

    python benchmarks/prepare.py                 # 20M rows (~1.5 GB CSV, generated once under benchmarks/work/)
    python benchmarks/prepare.py --rows 2000000  # a quicker run

Baseline: `pl.scan_csv(path).sink_parquet(out)` (parse + write, nothing else).
ecomray:  `jobs.prepare` on the same file: validation of every rule, quarantine, exact de-duplication, hash
          partitioning by user, per-user sorting, leave-one-out split, zstd shards, manifest.
Each side runs in its own fresh process so its peak RSS is its own. Prints a table and writes
benchmarks/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"


def make_csv(path: Path, rows: int, seed: int = 0, chunk: int = 2_000_000) -> None:
    """Event log with ~20 events per user, ~0.5% exact duplicates and ~0.3% broken rows."""
    if path.exists() and path.with_suffix(".done").exists():
        return
    rng = np.random.default_rng(seed)
    users, items = max(rows // 20, 1), 50_000
    events = np.array(["view", "click", "cart", "purchase"])
    with open(path, "wb") as fh:
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            u = rng.integers(0, users, n)
            i = rng.integers(0, items, n)
            df = pl.DataFrame({
                "user_id": u, "item_id": i, "event": events[rng.choice(4, n, p=[0.6, 0.25, 0.1, 0.05])],
                "ts": 1767225600 + rng.integers(0, 90 * 86400, n), "price": np.round(rng.gamma(2.0, 20.0, n), 2),
                "category": i % 40, "session_id": u * 10 + rng.integers(0, 10, n), "quantity": rng.integers(1, 4, n),
            }).with_columns(
                user_id=pl.lit("u") + pl.col("user_id").cast(pl.Utf8), item_id=pl.lit("i") + pl.col("item_id").cast(pl.Utf8),
                ts=pl.from_epoch("ts", time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S"),
                category=pl.lit("c") + pl.col("category").cast(pl.Utf8), session_id=pl.lit("s") + pl.col("session_id").cast(pl.Utf8))
            dup = df.sample(fraction=0.005, seed=int(rng.integers(1 << 31)))
            bad = df.sample(fraction=0.003, seed=int(rng.integers(1 << 31))).with_columns(event=pl.lit("refund"))
            pl.concat([df, dup, bad]).sample(fraction=1.0, shuffle=True, seed=int(rng.integers(1 << 31))).write_csv(
                fh, include_header=(lo == 0))
    path.with_suffix(".done").touch()


BASELINE = """
import polars as pl, sys, time
t = time.time(); pl.scan_csv(sys.argv[1]).sink_parquet(sys.argv[2]); print(time.time() - t)
"""

ECOMRAY = """
import sys, time
from hydra import compose, initialize_config_dir
from ecomray.data.prepare import run
from ecomray.runtime import to_plain
with initialize_config_dir(version_base="1.3", config_dir=sys.argv[3]):
    cfg = to_plain(compose("prepare", overrides=["dataset=events", f"dataset.path={sys.argv[1]}", f"paths.root={sys.argv[2]}",
                                                 "overwrite=true", f"prepare.shards={sys.argv[4]}"]))
t = time.time(); m = run(cfg); print(time.time() - t); print(m["rows_in"], m["rows_out"], m["rows_quarantined"])
"""


def timed(code: str, *args: str) -> tuple[list[str], float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(p.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    lines = [ln for ln in p.stdout.strip().splitlines() if ln and ln[0].isdigit()]
    return lines, max(peak, before) / 1024  # KiB -> MiB (ru_maxrss is the max over finished children)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--shards", type=int, default=16)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    csv = WORK / f"events_{args.rows}.csv"
    t = time.time()
    make_csv(csv, args.rows)
    print(f"input {csv} ({csv.stat().st_size / 1e9:.2f} GB), ready in {time.time() - t:.0f}s")
    rows = pl.scan_csv(csv).select(pl.len()).collect().item()
    # baseline first so that its peak RSS is measured alone (ru_maxrss over children is a running max)
    base_lines, base_rss = timed(BASELINE, str(csv), str(WORK / "baseline.parquet"))
    ours_lines, ours_rss = timed(ECOMRAY, str(csv), str(WORK / "runs"), str(ROOT / "conf"), str(args.shards))
    base_s, ours_s = float(base_lines[0]), float(ours_lines[0])
    rows_in, rows_out, rows_q = map(int, ours_lines[1].split())
    assert rows_in == rows == rows_out + rows_q
    result = {
        "rows": rows, "csv_bytes": csv.stat().st_size, "shards": args.shards,
        "baseline": {"seconds": base_s, "rows_per_s": rows / base_s, "peak_rss_mb": base_rss},
        "ecomray": {"seconds": ours_s, "rows_per_s": rows / ours_s, "peak_rss_mb": ours_rss,
                    "rows_out": rows_out, "rows_quarantined": rows_q},
        "ratio": base_s / ours_s, "targets": {"ratio_min": 0.5, "ratio_aim": 0.8, "peak_rss_mb_max": 3072},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "polars": pl.__version__},
    }
    print(f"\n{'':10s}{'seconds':>10s}{'rows/s':>14s}{'peak RSS MB':>14s}")
    for side in ("baseline", "ecomray"):
        r = result[side]
        print(f"{side:10s}{r['seconds']:10.2f}{r['rows_per_s']:14,.0f}{r['peak_rss_mb']:14,.0f}")
    print(f"ratio ecomray/baseline rows/s: {result['ratio']:.2f} (target >= 0.5, aim 0.8); "
          f"peak RSS {ours_rss:,.0f} MB (target <= 3072)")
    out = ROOT / "benchmarks" / "results" / "prepare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
