"""Benchmark: `ecomray prepare` against a plain Polars CSV -> Parquet conversion of the same file, side by side.

    python benchmarks/prepare.py                  # ~20M rows (~1.4 GB CSV), generated once under benchmarks/work/
    python benchmarks/prepare.py --rows 200000    # smoke mode
    python benchmarks/prepare.py --base HEAD~1     # also the prepare of another commit, interleaved (an A/B)

The baseline is `pl.scan_csv(path).sink_parquet(out)`: no validation, no quarantine, no dedup, no sharding, no
sort, no split. ecomray's prepare does all of those, so it is slower; the question is by how much, and whether its
memory stays bounded. Each side runs in a fresh subprocess (interleaved, `--repeat` times) so that its peak RSS
(wait4's ru_maxrss of that child) is its own. Seconds are the work alone, timed inside the child (imports excluded);
the table quotes medians. Writes benchmarks/results/prepare.json (prepare-<rows>.json for other sizes).

With `--base REF`, a third side runs `ecomray prepare` from a git worktree of REF (its code and its conf/), in the
same rounds: this VM's speed drifts by 10% and more between runs, so a change is judged against its parent in the
same run. The two ecomray sides must write the same rows (counts checked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_ROWS = 20_000_000
# The shop behind the CSV: ~18 rows per user, so 20M rows is ~1.1M users; 1,000 items keeps generation ~2 minutes.
SYNTH = {"seed": 0, "items": 1000, "categories": 20, "sessions_per_user": 6.0, "taste_dim": 8, "chunk_users": 50000}
# A log as exported: in time order (users interleaved within each 50k-user chunk), with 0.5% exact duplicate rows
# and 0.3% rows of an unknown event type, so dedup and quarantine do real work.
NOISE = {"order": "time", "duplicates": 0.005, "invalid": 0.003}
TARGET_RATIO, AIM_RATIO, TARGET_RSS_MB = 0.5, 0.8, 3072


# ----------------------------------------------------------------------------------------------- the input
def ensure_csv(rows: int, work: str) -> dict:
    """The benchmark CSV for `rows`, generated once and reused while the generator and its config are unchanged.

    Runs in a child process: the driver must stay small, because a child's peak RSS as the kernel reports it
    starts from the size of the process that spawned it.
    """
    from ecomray.data import synthetic

    work = os.path.abspath(work)   # the sides run with their own working folder
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, f"events-{rows}.csv")
    meta_path = path + ".json"
    key = {"rows": rows, "synthetic": SYNTH, "noise": NOISE, "generator_version": synthetic.GENERATOR_VERSION}
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("key") == key and meta.get("bytes") == os.path.getsize(path):
            print(f"input: {path} ({rows:,} rows, cached)", flush=True)
            return meta
    print(f"input: generating {rows:,} rows into {path} ...", flush=True)
    info = synthetic.write_csv(SYNTH, path, rows, **NOISE)
    meta = {"key": key, "path": path, **info}
    with open(meta_path, "w") as fh:
        json.dump(meta, fh, indent=2)
    print(f"input: {info['rows']:,} rows, {info['bytes'] / 1e6:,.0f} MB, {info['users']:,} users "
          f"in {info['seconds']:.0f}s ({info['duplicates']:,} duplicates, {info['invalid']:,} invalid rows)")
    return meta


def warm_page_cache(path: str) -> None:
    """Read the file once so neither side pays for the cold read alone."""
    with open(path, "rb") as fh:
        while fh.read(1 << 20):
            pass


# ----------------------------------------------------------------------------------------------- the sides (children)
def side_baseline(csv: str, out: str) -> dict:
    import polars as pl

    t0 = time.perf_counter()
    pl.scan_csv(csv).sink_parquet(out)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "out_bytes": os.path.getsize(out)}


def prepare_config(csv: str, out: str, shards: int, engine: str) -> dict:
    """The plain-dict config `ecomray.data.prepare.run` takes, composed from conf/ like `python -m jobs.prepare`."""
    from hydra import compose, initialize_config_dir

    from ecomray.runtime import to_plain

    overrides = ["dataset=events", f"dataset.name={os.path.basename(out)}", f"dataset.path={csv}", "dataset.format=csv",
                 "dataset.licence=synthetic", f"paths.root={os.path.dirname(out)}", f"paths.data={os.path.dirname(out)}",
                 f"prepare.shards={shards}", f"prepare.engine={engine}", "overwrite=true"]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=overrides)
    return to_plain(cfg)


def side_ecomray(csv: str, out: str, shards: int, engine: str, root: str | None = None) -> dict:
    if root:  # the ecomray of another commit (--base): its package and its conf/
        global ROOT
        ROOT = root
        sys.path.insert(0, root)
    import ecomray
    from ecomray.data import prepare as P

    phases: dict[str, float] = {}

    def timed(name: str, fn):  # seconds per phase: pass 1, the split plan, pass 2, the quarantine file
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    if engine == "polars":  # the ray engine runs the passes as tasks in other processes
        for name, attr in (("pass1_stage", "stage_source"), ("plan", "plan"), ("pass2_shards", "finalize_shard"),
                           ("quarantine", "_write_quarantine")):
            setattr(P, attr, timed(name, getattr(P, attr)))
    cfg = prepare_config(csv, out, shards, engine)
    t0 = time.perf_counter()
    manifest = P.run(cfg)
    seconds = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    return {"seconds": seconds, "out_bytes": size, "rows_in": manifest["rows_in"], "rows_out": manifest["rows_out"],
            "rows_quarantined": manifest["rows_quarantined"], "shards": len(manifest["shards"]),
            "code": os.path.dirname(os.path.dirname(ecomray.__file__)),
            "phases_s": {k: round(v, 3) for k, v in phases.items()}}


def own_peak_rss_mb() -> float | None:
    """This process's own high-water RSS since exec (VmHWM), not inherited from the spawning process."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return None


def child_main(args: argparse.Namespace) -> None:
    if args.side == "generate":
        result = ensure_csv(args.rows, args.work)
    elif args.side == "baseline":
        result = side_baseline(args.csv, args.out)
    else:
        result = side_ecomray(args.csv, args.out, args.shards, args.engine, args.root)
    result["own_peak_rss_mb"] = own_peak_rss_mb()
    with open(args.result, "w") as fh:
        json.dump(result, fh)


# ----------------------------------------------------------------------------------------------- the driver
def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def run_side(side: str, csv: str, scratch: str, shards: int, engine: str, root: str | None = None) -> dict:
    out = os.path.join(scratch, "baseline.parquet" if side == "baseline" else side)
    _remove(out)
    result_file = os.path.join(scratch, f"{side}.result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--side", "baseline" if side == "baseline" else "ecomray",
           "--csv", csv, "--out", out, "--result", result_file, "--shards", str(shards), "--engine", engine]
    if root:
        cmd += ["--root", root]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS, not the driver's
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark side {side!r} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    with open(result_file) as fh:
        result = json.load(fh)
    peak_kb = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024
    _remove(out)
    # wait4's figure covers the child and the descendants it waited for; VmHWM (the child alone) cross-checks it
    return {**result, "process_seconds": wall, "peak_rss_mb": peak_kb / 1024}


def machine() -> dict:
    import polars as pl
    import pyarrow as pa

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "polars": pl.__version__, "pyarrow": pa.__version__, "polars_max_threads": pl.thread_pool_size()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        with open("/proc/meminfo") as fh:
            info["memory_gb"] = round(int(next(line.split()[1] for line in fh if line.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows in the synthetic CSV (smoke: 200000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side, interleaved; medians are quoted")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--engine", default="polars", choices=["polars", "ray"])
    parser.add_argument("--work", default=os.path.join(HERE, "work"), help="cache for the input and scratch output")
    parser.add_argument("--base", default=None, help="also run the prepare of this git ref (an A/B in one run)")
    parser.add_argument("--json", default=None, help="results file (default benchmarks/results/prepare[-ROWS].json)")
    # internal: one side in a child process
    parser.add_argument("--side", choices=["generate", "baseline", "ecomray"], help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child_main(args)
        return

    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    meta_file = os.path.join(work, "input.result.json")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--side", "generate", "--rows", str(args.rows),
                    "--work", work, "--result", meta_file], cwd=ROOT, check=True)
    with open(meta_file) as fh:
        meta = json.load(fh)
    csv, rows = meta["path"], meta["rows"]
    scratch = os.path.join(work, "scratch")
    os.makedirs(scratch, exist_ok=True)
    warm_page_cache(csv)
    from scale import others  # what else runs on the machine: load average and the busiest other processes

    beside = {"before": others()}
    runs: dict[str, list[dict]] = {"baseline": [], "ecomray": []}
    base = None
    if args.base:
        found = subprocess.run(["git", "rev-parse", "--short", "--verify", f"{args.base}^{{commit}}"], cwd=ROOT,
                               capture_output=True, text=True)
        if found.returncode != 0:
            raise SystemExit(f"--base {args.base!r}: not a commit in this repository ({found.stderr.strip()})")
        sha = found.stdout.strip()
        base = {"side": f"ecomray@{sha}", "ref": args.base, "tree": os.path.join(scratch, f"tree-{sha}")}
        _remove(base["tree"])
        subprocess.run(["git", "worktree", "add", "--detach", base["tree"], sha], cwd=ROOT, check=True,
                       capture_output=True)
        runs[base["side"]] = []
    try:
        for r in range(args.repeat):
            for side in runs:
                print(f"run {r + 1}/{args.repeat}: {side} ...", flush=True)
                root = base["tree"] if base and side == base["side"] else None
                runs[side].append(run_side(side, csv, scratch, args.shards, args.engine, root))
    finally:
        if base:
            subprocess.run(["git", "worktree", "remove", "--force", base["tree"]], cwd=ROOT, capture_output=True)
    beside["after"] = others()
    got = runs["ecomray"][0]
    if got["rows_in"] != rows:
        raise SystemExit(f"ecomray prepare read {got['rows_in']:,} rows, the CSV holds {rows:,}")
    counts = ("rows_in", "rows_out", "rows_quarantined", "shards")
    if base and any(runs[base["side"]][0][k] != got[k] for k in counts):
        raise SystemExit(f"{base['side']} and this tree prepared different rows: "
                         f"{ {k: runs[base['side']][0][k] for k in counts} } vs { {k: got[k] for k in counts} }")

    summary = {}
    for side, rs in runs.items():
        seconds = statistics.median(x["seconds"] for x in rs)
        summary[side] = {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds),
                         "peak_rss_mb": round(max(x["peak_rss_mb"] for x in rs), 1),
                         "own_peak_rss_mb": round(max(x["own_peak_rss_mb"] or 0.0 for x in rs), 1),
                         "out_mb": round(rs[0]["out_bytes"] / 1e6, 1), "runs_seconds": [round(x["seconds"], 3) for x in rs]}
    for side in runs:
        if side != "baseline":
            summary[side].update({k: runs[side][0][k] for k in ("rows_out", "rows_quarantined", "shards", "code")})
            summary[side]["phases_s_median"] = {k: round(statistics.median(x["phases_s"][k] for x in runs[side]), 3)
                                                for k in runs[side][0]["phases_s"]}
    ratio = summary["ecomray"]["rows_per_s"] / summary["baseline"]["rows_per_s"]
    rss = summary["ecomray"]["peak_rss_mb"]
    result = {
        "benchmark": "prepare", "input": {"path": os.path.relpath(csv, ROOT), "rows": rows, "bytes": meta["bytes"],
                                          "users": meta["users"], "duplicates": meta["duplicates"],
                                          "invalid": meta["invalid"], "synthetic": SYNTH, "noise": NOISE},
        "engine": args.engine, "shards": args.shards, "repeat": args.repeat, "sides": summary,
        "ratio_ecomray_over_baseline": round(ratio, 3),
        **({"base": {"ref": base["ref"], "side": base["side"],
                     "ratio_over_baseline": round(summary[base["side"]]["rows_per_s"] / summary["baseline"]["rows_per_s"], 3),
                     "speedup_of_this_tree": round(summary[base["side"]]["seconds"] / summary["ecomray"]["seconds"], 3)}}
           if base else {}),
        "targets": {"ratio_min": TARGET_RATIO, "ratio_aim": AIM_RATIO, "peak_rss_mb_max": TARGET_RSS_MB,
                    "ratio_ok": ratio >= TARGET_RATIO, "rss_ok": rss <= TARGET_RSS_MB},
        "machine": machine(), "beside": beside, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    print()
    print(f"prepare benchmark: {rows:,} rows, {meta['bytes'] / 1e6:,.0f} MB CSV, engine {args.engine}, "
          f"{args.shards} shards, median of {args.repeat}, {result['machine']['cpu_count']} CPUs")
    print(f"  {'side':16s}{'rows':>14s}{'seconds':>10s}{'rows/s':>14s}{'ratio':>8s}{'peak RSS MB':>13s}{'out MB':>9s}")
    for side, s in summary.items():
        r = s["rows_per_s"] / summary["baseline"]["rows_per_s"]
        print(f"  {side:16s}{s['rows']:>14,}{s['seconds']:>10.2f}{s['rows_per_s']:>14,}{r:>8.2f}"
              f"{s['peak_rss_mb']:>13,.0f}{s['out_mb']:>9,.1f}")
    print(f"  targets: ratio >= {TARGET_RATIO} (aim {AIM_RATIO}): {ratio:.2f} "
          f"{'OK' if ratio >= TARGET_RATIO else 'MISSED'}; peak RSS <= {TARGET_RSS_MB} MB: {rss:,.0f} "
          f"{'OK' if rss <= TARGET_RSS_MB else 'MISSED'}")
    for side, sm in summary.items():
        if "phases_s_median" in sm:
            print(f"  {side} phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in sm["phases_s_median"].items()))
    if base:
        print(f"  this tree against {base['side']} ({base['ref']}), same runs: "
              f"speedup {result['base']['speedup_of_this_tree']:.2f}x (base seconds / this tree's; same rows written)")
    path = args.json or os.path.join(HERE, "results", "prepare.json" if args.rows == DEFAULT_ROWS
                                     else f"prepare-{args.rows}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"  wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
