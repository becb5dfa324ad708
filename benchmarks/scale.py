"""Benchmark: the data path at 1M, 10M and 100M events, in bounded memory (issue 14 §2).

    flock /tmp/ecomray-heavy.lock .venv/bin/python benchmarks/scale.py --repeat 3       # 1M, 10M, 100M events
    .venv/bin/python benchmarks/scale.py --sizes 1000000 --stages polars stream        # smoke mode

For each size the built-in synthetic shop (ecomray/data/synthetic.py, Parquet straight from the generator, ~1,000
items) is generated under benchmarks/work/scale/<size>/, then each stage runs in a fresh subprocess:

- `polars`: `ecomray.data.prepare.run` with `prepare.engine=polars`, what `python -m jobs.prepare dataset=synthetic`
  runs (the synthetic adapter reads the generated files);
- `ray`: the same with `prepare.engine=ray` on a local `ray.init(num_cpus=2)` (started inside the timed part);
- `stream`: one epoch of the next-item training data as a training worker reads it (rank 0 of world 1):
  `next_item.build_data` and every batch of `train_batches`, without a model forward.

Seconds are the work alone, timed inside the child (imports excluded); with `--repeat N` the median of N runs (and
the highest memory of the N). Memory is sampled by this driver every 0.2 s over the child's whole process tree (the
Ray head processes and workers are its descendants; Ray processes that appear during the stage are added even if
reparented): the peak of the summed RSS, the peak of the summed PSS (shared pages split between the processes that
map them, so shared libraries and the object store's /dev/shm pages are not counted twice), and the largest single
process. wait4's ru_maxrss of the child cross-checks the sampler. The stream stage also reports `epoch_batches_mb`,
what a whole epoch of batches would take if kept at once (ecomray/train/loop.py did, before tasks could say
`num_batches`).
`--ray-dashboard off` runs the ray stage with `ray.include_dashboard=false` (Ray starts ~12 dashboard processes by
default); pair it with `--json` to keep the default run's results.
Prepared shards hold ~2M rows each (`--rows-per-shard`, at least 8 shards). Generated and prepared files are
deleted after each size unless `--keep`. Writes benchmarks/results/scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZES = [1_000_000, 10_000_000, 100_000_000]
STAGES = ["polars", "ray", "stream"]
# The shop: like benchmarks/prepare.py's, ~19.2 events per user (measured on a pilot of the first 20,000 users).
SYNTH = {"seed": 0, "items": 1000, "categories": 20, "sessions_per_user": 6.0, "taste_dim": 8, "chunk_users": 50000}
PILOT_USERS = 20_000
RSS_MAX_MB, RATE_MIN_RATIO = 3072, 0.8   # at the largest size: peak RSS per stage; rows/s vs the next size down
SAMPLE_S = 0.2
RAY_NAMES = ("raylet", "gcs_server", "dashboard", "Dashboard", "ray::", "log_monitor", "monitor.py", "runtime_env",
             "plasma")


# ----------------------------------------------------------------------------------------------- stages (children)
def config(size_dir: str, users: int, shards: int, engine: str = "polars") -> dict:
    """The plain config `jobs.prepare` / `jobs.train` compose for the synthetic shop of `users` users."""
    from ecomray.config import compose

    overrides = ["dataset=synthetic", f"paths.root={size_dir}", f"paths.data={os.path.join(size_dir, 'data')}",
                 f"dataset.synthetic.users={users}", *[f"dataset.synthetic.{k}={v}" for k, v in SYNTH.items()],
                 f"prepare.shards={shards}", f"prepare.engine={engine}", "ray.num_cpus=2", "overwrite=true"]
    if os.environ.get("SCALE_RAY_DASHBOARD") == "off":
        overrides.append("ray.include_dashboard=false")
    return compose("prepare", overrides)


def stage_generate(size: int, size_dir: str) -> dict:
    """Users for ~`size` events (from a pilot), then the generator's Parquet files where the adapter reads them."""
    from ecomray.data import synthetic
    from ecomray.data.adapters.synthetic import raw_dir

    c = synthetic._conf({**SYNTH, "users": PILOT_USERS})
    per_user = synthetic._chunk_events(c, synthetic._world(c), 0, PILOT_USERS, synthetic._names(c)).height / PILOT_USERS
    users = max(1, round(size / per_user))
    cfg = config(size_dir, users, 8)
    t0 = time.perf_counter()
    summary = synthetic.generate(cfg["dataset"]["synthetic"], raw_dir(cfg["dataset"], cfg["paths"]), fmt="parquet")
    seconds = time.perf_counter() - t0
    raw = os.path.dirname(summary["files"][0])
    return {"rows": summary["rows"], "users": users, "events_per_user_pilot": round(per_user, 3),
            "files": len(summary["files"]), "raw_mb": round(_folder_bytes(raw) / 1e6, 1),
            # a cached run reports the generator's own time from its marker
            "seconds": seconds if seconds > 1.0 else summary["seconds"], "cached": seconds <= 1.0}


def stage_prepare(size_dir: str, users: int, shards: int, engine: str) -> dict:
    from ecomray.data.prepare import run

    cfg = config(size_dir, users, shards, engine)
    t0 = time.perf_counter()
    manifest = run(cfg)
    seconds = time.perf_counter() - t0
    if engine == "ray":
        import ray

        ray.shutdown()  # the head processes go with the driver, before it exits
    out = os.path.join(cfg["paths"]["data"], cfg["dataset"]["name"])
    return {"rows": manifest["rows_in"], "rows_out": manifest["rows_out"],
            "rows_quarantined": manifest["rows_quarantined"],
            "shards": len(manifest["shards"]), "seconds": seconds, "out_mb": round(_folder_bytes(out) / 1e6, 1)}


def stage_stream(size_dir: str, users: int, shards: int) -> dict:
    """One epoch of next-item training batches on rank 0 of world 1, without a model."""
    from ecomray.data import shards as S
    from ecomray.tasks import next_item

    cfg = config(size_dir, users, shards)
    manifest = S.load_manifest(S.dataset_dir(cfg))
    t0 = time.perf_counter()
    data = next_item.build_data(cfg, 0, 1)
    t_build = time.perf_counter() - t0
    batches = samples = positions = nbytes = 0
    for batch in next_item.train_batches(data, 0, int(cfg["seed"]), int(cfg["train"]["batch_size"])):
        batches += 1
        samples += len(batch["seq"])
        positions += int((batch["target"] > 0).sum())
        nbytes += sum(t.numel() * t.element_size() for t in batch.values())
    seconds = time.perf_counter() - t0
    return {"rows": manifest["rows_out"], "seconds": seconds, "build_data_s": t_build, "batches_s": seconds - t_build,
            "users": len(data.users), "items": data.num_items, "sequence_items": int(sum(len(s) for s in data.seqs)),
            "batches": batches, "samples": samples, "target_positions": positions,
            "batch_size": int(cfg["train"]["batch_size"]), "max_len": data.max_len,
            # what a whole epoch of batches takes when kept at once (the loop did before `num_batches`)
            "epoch_batches_mb": round(nbytes / 2**20, 1)}


def child_main(args: argparse.Namespace) -> None:
    if args.stage == "generate":
        result = stage_generate(args.size, args.dir)
    elif args.stage == "stream":
        result = stage_stream(args.dir, args.users, args.shards)
    else:
        result = stage_prepare(args.dir, args.users, args.shards, args.stage)
    with open(args.result, "w") as fh:
        json.dump(result, fh)


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------------------------- memory sampler
def _proc_kb(pid: int) -> dict[str, int]:
    """RSS and its parts (status), PSS and its parts (smaps_rollup), in kB; {} when the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem")):
                    out[line.split(":")[0]] = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith(("Pss:", "Pss_Anon", "Pss_File", "Pss_Shmem")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return {}
    return out


class TreeSampler(threading.Thread):
    """Every SAMPLE_S seconds: RSS / PSS summed over a process tree (plus Ray processes started meanwhile)."""

    def __init__(self, pid: int, before: set[int]) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.root, self.before = psutil, psutil.Process(pid), before
        self.stop_event = threading.Event()
        self.peak = {"rss_sum_kb": 0, "pss_sum_kb": 0, "rss_anon_sum_kb": 0, "rss_shmem_sum_kb": 0,
                     "pss_shmem_sum_kb": 0, "rss_max_kb": 0, "processes": 0, "dev_shm_used_kb": 0}
        self.largest = {"name": None, "rss_kb": 0}
        self.at_peak: list[dict] = []
        self.at_peak_kinds: dict[str, dict] = {}
        self.names: dict[str, int] = {}
        self.samples = 0
        self.shm0 = _dev_shm_used()

    def _members(self) -> list:
        procs = {}
        try:
            procs[self.root.pid] = self.root
            for p in self.root.children(recursive=True):
                procs[p.pid] = p
        except self.psutil.Error:
            pass
        me = os.getuid()
        for p in self.psutil.process_iter(["name", "cmdline", "uids"]):
            if p.pid in procs or p.pid in self.before or not p.info["uids"] or p.info["uids"].real != me:
                continue
            text = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
            if any(n in text for n in RAY_NAMES):
                procs[p.pid] = p
        return list(procs.values())

    def sample(self) -> None:
        rows = []
        for p in self._members():
            kb = _proc_kb(p.pid)
            if not kb:
                continue
            try:
                cmd = p.cmdline()
                name, kind = " ".join(cmd[:3])[:80] or p.name(), _kind(" ".join(cmd) or p.name())
            except self.psutil.Error:
                name = kind = "?"
            rows.append({"pid": p.pid, "name": name, "kind": kind, **kb})
        if not rows:
            return
        self.samples += 1
        total = {"rss_sum_kb": sum(r.get("VmRSS", 0) for r in rows), "pss_sum_kb": sum(r.get("Pss", 0) for r in rows),
                 "rss_anon_sum_kb": sum(r.get("RssAnon", 0) for r in rows),
                 "rss_shmem_sum_kb": sum(r.get("RssShmem", 0) for r in rows),
                 "pss_shmem_sum_kb": sum(r.get("Pss_Shmem", 0) for r in rows),
                 "rss_max_kb": max(r.get("VmRSS", 0) for r in rows), "processes": len(rows),
                 "dev_shm_used_kb": max(0, _dev_shm_used() - self.shm0)}
        for r in rows:
            self.names[r["kind"]] = max(self.names.get(r["kind"], 0), r.get("VmRSS", 0))
        if total["rss_sum_kb"] > self.peak["rss_sum_kb"]:
            self.at_peak_kinds = {}
            for r in rows:
                k = self.at_peak_kinds.setdefault(r["kind"], {"processes": 0, "rss_mb": 0.0, "pss_mb": 0.0})
                k["processes"] += 1
                k["rss_mb"] = round(k["rss_mb"] + r.get("VmRSS", 0) / 1024, 1)
                k["pss_mb"] = round(k["pss_mb"] + r.get("Pss", 0) / 1024, 1)
            self.at_peak = sorted(({"pid": r["pid"], "name": r["name"], "rss_mb": round(r.get("VmRSS", 0) / 1024, 1),
                                    "rss_shmem_mb": round(r.get("RssShmem", 0) / 1024, 1),
                                    "pss_mb": round(r.get("Pss", 0) / 1024, 1)} for r in rows),
                                  key=lambda r: -r["rss_mb"])
        top = max(rows, key=lambda r: r.get("VmRSS", 0))
        if top.get("VmRSS", 0) > self.largest["rss_kb"]:
            self.largest = {"name": top["name"], "rss_kb": top.get("VmRSS", 0)}
        for k, v in total.items():
            self.peak[k] = max(self.peak[k], v)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(SAMPLE_S)

    def result(self) -> dict:
        mb = {k.replace("_kb", "_mb"): round(v / 1024, 1) for k, v in self.peak.items() if k != "processes"}
        return {**mb, "processes_max": self.peak["processes"], "samples": self.samples,
                "largest_process": {"name": self.largest["name"], "rss_mb": round(self.largest["rss_kb"] / 1024, 1)},
                "max_rss_mb_by_kind": {k: round(v / 1024, 1) for k, v in sorted(self.names.items())},
                "at_peak_by_kind": self.at_peak_kinds, "at_peak": self.at_peak[:12]}


def _kind(name: str) -> str:
    for n in RAY_NAMES:
        if n in name:
            return {"ray::": "ray worker", "Dashboard": "dashboard"}.get(n, n)
    return "python (stage driver)" if "scale.py" in name else name.split()[0].rsplit("/", 1)[-1]


def _dev_shm_used() -> int:
    try:
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------- driver
def others() -> dict:
    """What else ran on the machine at this moment: load average and the busiest processes not ours."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            cpu, rss = p.cpu_percent(None), p.memory_info().rss
        except psutil.Error:
            continue
        if cpu >= 5.0 or rss >= 300 * 2**20:
            busy.append({"pid": p.pid, "cmd": " ".join(p.info["cmdline"] or [p.info["name"] or ""])[:100],
                         "cpu_percent": round(cpu, 1), "rss_mb": round(rss / 2**20)})
    return {"loadavg": [round(x, 2) for x in os.getloadavg()],
            "busy": sorted(busy, key=lambda b: -b["cpu_percent"])[:6],
            "memory_available_gb": round(psutil.virtual_memory().available / 2**30, 1)}


def run_stage(stage: str, size: int, size_dir: str, users: int, shards: int) -> dict:
    import psutil

    result_file = os.path.join(size_dir, f"{stage}.result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--size", str(size), "--dir", size_dir,
           "--users", str(users), "--shards", str(shards), "--result", result_file]
    context = others()
    before = {p.pid for p in psutil.process_iter()}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    sampler = TreeSampler(proc.pid, before)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.stop_event.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    leftover: list[str] = []
    for _ in range(30):  # Ray's head processes exit shortly after the driver's ray.shutdown()
        leftover = [" ".join(p.cmdline()[:2]) for p in psutil.process_iter() if p.pid not in before and _is_ray(p)]
        if not leftover:
            break
        time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} at {size:,} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    with open(result_file) as fh:
        result = json.load(fh)
    result.update(process_seconds=round(wall, 2), memory=sampler.result(),
                  child_ru_maxrss_mb=round(usage.ru_maxrss / 1024, 1), others=context,
                  leftover_ray_processes=leftover, command=" ".join(cmd[1:]))
    result["rows_per_s"] = round(result["rows"] / result["seconds"]) if result["seconds"] else None
    return result


def _is_ray(p) -> bool:
    try:
        return any(n in " ".join(p.cmdline()) for n in RAY_NAMES)
    except Exception:  # noqa: BLE001 - gone or not ours
        return False


def machine() -> dict:
    import psutil

    info = {"cpu_count": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    names = ("polars", "pyarrow", "ray", "torch", "numpy")
    code = f"import {', '.join(names)}; print(*(m.__version__ for m in ({', '.join(names)})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    info.update(zip(names, out.stdout.split()))
    return info


def summarize(runs: list[dict]) -> dict:
    """A stage over its repeats: the median seconds (and rows/s from it), the highest memory of any run; the run
    with the highest summed RSS is kept whole."""
    worst = max(runs, key=lambda r: r["memory"]["rss_sum_mb"])
    seconds = statistics.median(r["seconds"] for r in runs)
    return {**worst, "seconds": seconds, "rows_per_s": round(worst["rows"] / seconds), "repeats": len(runs),
            "runs": [{"seconds": round(r["seconds"], 2), "rss_sum_mb": r["memory"]["rss_sum_mb"],
                      "pss_sum_mb": r["memory"]["pss_sum_mb"], "largest_mb": r["memory"]["largest_process"]["rss_mb"],
                      "loadavg_before": r["others"]["loadavg"], "busy_before": r["others"]["busy"]} for r in runs]}


def bars(results: dict[int, dict]) -> dict:
    """Per stage at the largest size: peak RSS (summed over the tree) <= 3 GB; rows/s >= 0.8x the next size down."""
    sizes = sorted(results)
    top, prev = sizes[-1], (sizes[-2] if len(sizes) > 1 else None)
    out = {"size": top, "compared_with": prev, "peak_rss_mb_max": RSS_MAX_MB, "rows_per_s_min_ratio": RATE_MIN_RATIO,
           "stages": {}}
    for stage, r in results[top]["stages"].items():
        rss = r["memory"]["rss_sum_mb"]
        check = {"peak_rss_sum_mb": rss, "rss_ok": rss <= RSS_MAX_MB,
                 "peak_pss_sum_mb": r["memory"]["pss_sum_mb"], "pss_ok": r["memory"]["pss_sum_mb"] <= RSS_MAX_MB}
        dashboard = r["memory"].get("at_peak_by_kind", {}).get("dashboard")
        if dashboard:  # Ray's dashboard (started by ray.init by default): its share of the peak sample
            check["dashboard_at_peak"] = dashboard
            check["peak_rss_sum_without_dashboard_mb"] = round(rss - dashboard["rss_mb"], 1)
        if prev is not None and stage in results[prev]["stages"]:
            ratio = r["rows_per_s"] / results[prev]["stages"][stage]["rows_per_s"]
            check.update(rows_per_s_ratio=round(ratio, 3), rate_ok=ratio >= RATE_MIN_RATIO)
        check["pass"] = check["rss_ok"] and check.get("rate_ok", True)
        out["stages"][stage] = check
    out["pass"] = all(c["pass"] for c in out["stages"].values())
    return out


def what_else_ran(results: dict[int, dict]) -> dict:
    """Other processes seen busy (>= 5% CPU or >= 300 MB) just before any stage, and the load averages then."""
    busy: dict[str, dict] = {}
    loads = []
    for size, res in sorted(results.items()):
        for stage, r in res["stages"].items():
            runs = r.get("runs") or []
            for run in [*runs, {"busy_before": r["others"]["busy"]}]:   # (the kept run's own snapshot as well)
                loads.extend(run["loadavg_before"][:1] if "loadavg_before" in run else [])
                for b in run.get("busy_before", []):
                    if f"{size}/{stage}" in busy.get(b["cmd"], {}).get("before", []):
                        continue
                    seen = busy.setdefault(b["cmd"], {"cmd": b["cmd"], "max_cpu_percent": 0.0, "max_rss_mb": 0,
                                                      "before": []})
                    seen["max_cpu_percent"] = max(seen["max_cpu_percent"], b["cpu_percent"])
                    seen["max_rss_mb"] = max(seen["max_rss_mb"], b["rss_mb"])
                    seen["before"].append(f"{size}/{stage}")
    return {"busy_processes": list(busy.values()), "loadavg_1min_before_stages": {"min": min(loads), "max": max(loads)},
            "note": "heavy runs (this one included) take /tmp/ecomray-heavy.lock, so other benchmarks on the machine "
                    "wait; a snapshot of 1 s is taken before every stage run"}


def table(results: dict[int, dict]) -> str:
    lines = [f"  {'events':>12s} {'stage':8s}{'rows':>13s}{'seconds':>9s}{'rows/s':>12s}{'RSS sum MB':>11s}"
             f"{'PSS sum MB':>11s}{'largest MB':>11s}  largest process"]
    for size in sorted(results):
        for stage, r in results[size]["stages"].items():
            m = r["memory"]
            lines.append(f"  {size:>12,} {stage:8s}{r['rows']:>13,}{r['seconds']:>9.1f}{r['rows_per_s']:>12,}"
                         f"{m['rss_sum_mb']:>11,.0f}{m['pss_sum_mb']:>11,.0f}{m['largest_process']['rss_mb']:>11,.0f}"
                         f"  {_kind(m['largest_process']['name'] or '?')}")
    return "\n".join(lines)


def plot(results: dict[int, dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this environment: no plot"
    sizes = sorted(results)
    stages = [s for s in STAGES if any(s in results[n]["stages"] for n in sizes)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, stage in enumerate(stages):
        xs, color = [n for n in sizes if stage in results[n]["stages"]], f"C{k}"
        ax1.plot(xs, [results[n]["stages"][stage]["rows_per_s"] for n in xs], "o-", color=color, label=stage)
        ax2.plot(xs, [results[n]["stages"][stage]["memory"]["rss_sum_mb"] for n in xs], "o-", color=color,
                 label=f"{stage} (RSS sum)")
        ax2.plot(xs, [results[n]["stages"][stage]["memory"]["pss_sum_mb"] for n in xs], "x--", color=color, alpha=0.6,
                 label=f"{stage} (PSS sum)")
    ax2.axhline(RSS_MAX_MB, color="red", lw=1, ls=":", label="bar: 3 GB")
    for ax, title in ((ax1, "throughput (rows/s)"), (ax2, "peak memory over the process tree (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("events")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    fig.suptitle(f"ecomray data path at scale ({os.cpu_count()} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="target event counts")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--rows-per-shard", type=int, default=2_000_000, help="prepared shards: max(8, events / this)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per stage; seconds are medians, memory the max")
    parser.add_argument("--keep", action="store_true", help="keep the generated and prepared files of each size")
    parser.add_argument("--ray-dashboard", choices=["on", "off"], default="on",
                        help="off: the ray stage runs with ray.include_dashboard=false")
    parser.add_argument("--work", default=os.path.join(HERE, "work", "scale"))
    parser.add_argument("--json", default=os.path.join(HERE, "results", "scale.json"))
    # internal: one stage in a child process
    parser.add_argument("--stage", choices=["generate", *STAGES], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--users", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        child_main(args)
        return

    os.environ["SCALE_RAY_DASHBOARD"] = args.ray_dashboard         # read by the stage children's config()
    work = os.path.abspath(args.work)
    results: dict[int, dict] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for size in sorted(args.sizes):
        size_dir = os.path.join(work, str(size))
        os.makedirs(size_dir, exist_ok=True)
        shards = max(8, math.ceil(size / args.rows_per_shard))
        print(f"== {size:,} events: generating ...", flush=True)
        gen = run_stage("generate", size, size_dir, 0, shards)
        print(f"   {gen['rows']:,} events, {gen['users']:,} users, {gen['files']} files, {gen['raw_mb']:,} MB "
              f"in {gen['seconds']:.0f}s{' (cached)' if gen['cached'] else ''}", flush=True)
        results[size] = {"events": gen["rows"], "users": gen["users"], "shards": shards, "generate": gen, "stages": {}}
        runs: dict[str, list[dict]] = {stage: [] for stage in args.stages}
        for rep in range(args.repeat):
            for stage in args.stages:
                print(f"== {size:,} events: {stage} (run {rep + 1}/{args.repeat}) ...", flush=True)
                r = run_stage(stage, size, size_dir, gen["users"], shards)
                runs[stage].append(r)
                print(f"   {r['rows']:,} rows in {r['seconds']:.1f}s = {r['rows_per_s']:,} rows/s; peak RSS sum "
                      f"{r['memory']['rss_sum_mb']:,.0f} MB (PSS {r['memory']['pss_sum_mb']:,.0f} MB, largest "
                      f"{r['memory']['largest_process']['rss_mb']:,.0f} MB)", flush=True)
        results[size]["stages"] = {stage: summarize(rs) for stage, rs in runs.items()}
        if not args.keep:
            shutil.rmtree(size_dir, ignore_errors=True)
    result = {
        "benchmark": "scale", "issue": "14 §2: 100M events in bounded memory", "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "synthetic": SYNTH, "rows_per_shard": args.rows_per_shard, "stages": args.stages, "repeat": args.repeat,
        "ray_dashboard": args.ray_dashboard,
        "memory_method": (
            f"sampled every {SAMPLE_S}s by the benchmark driver over the stage child's process tree (psutil children, "
            "recursive) plus any Ray process (raylet, gcs_server, ray::*, dashboard, ...) of this user that appeared "
            "during the stage; rss_sum = peak of the summed VmRSS, pss_sum = peak of the summed Pss (smaps_rollup), "
            "largest_process = the largest single VmRSS seen; child_ru_maxrss = wait4 of the child (its own peak, "
            "or a waited-for descendant's)"),
        "object_store_counted": None, "sizes": {str(k): v for k, v in results.items()}, "bars": bars(results),
        "machine": machine(),
    }
    result["object_store_counted"] = object_store_note(results)
    result["what_else_ran"] = what_else_ran(results)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    note = plot(results, os.path.splitext(args.json)[0] + ".png")
    print()
    print(f"scale benchmark, {result['machine']['cpu_count']} CPUs, {result['machine']['memory_gb']} GiB")
    print(table(results))
    b = result["bars"]
    for stage, c in b["stages"].items():
        rate = (f"rows/s {c['rows_per_s_ratio']:.2f}x of {b['compared_with']:,}" if "rows_per_s_ratio" in c
                else "rows/s: n/a")
        print(f"  bars at {b['size']:,}: {stage:7s} peak RSS sum {c['peak_rss_sum_mb']:,.0f} MB "
              f"{'OK' if c['rss_ok'] else 'MISSED'} (<= {RSS_MAX_MB}); {rate} "
              f"{'OK' if c.get('rate_ok', True) else 'MISSED'} (>= {RATE_MIN_RATIO})")
    print(f"  wrote {os.path.relpath(args.json, ROOT)}" + (f"; {note}" if note else " and the .png"))


def object_store_note(results: dict[int, dict]) -> dict:
    """Whether Ray's object store shows up in the figures: its arena is /dev/shm, mapped by the raylet (plasma) and by
    every worker that reads an object; touched pages count as RssShmem in each of them (in rss_sum once per mapping
    process, in pss_sum once in all)."""
    ray_runs = [(n, r["stages"]["ray"]) for n, r in sorted(results.items()) if "ray" in r["stages"]]
    if not ray_runs:
        return {"note": "no ray stage run"}
    per_size = {str(n): {"rss_shmem_sum_mb": r["memory"]["rss_shmem_sum_mb"],
                         "pss_shmem_sum_mb": r["memory"]["pss_shmem_sum_mb"],
                         "dev_shm_growth_mb": r["memory"]["dev_shm_used_mb"],
                         "raylet_max_rss_mb": r["memory"]["max_rss_mb_by_kind"].get("raylet")} for n, r in ray_runs}
    touched = any(v["rss_shmem_sum_mb"] or v["dev_shm_growth_mb"] for v in per_size.values())
    found = ("shared-memory pages were touched: they are in rss_sum (per mapping process) and pss_sum (split)"
             if touched
             else "no shared-memory page was touched in any sample (RssShmem 0 in every process, /dev/shm did not "
                  "grow): prepare's tasks take and return small dicts, passed inline, and read and write Parquet "
                  "files, so the object store held nothing; its reserved arena is not resident and costs nothing here")
    how = ("Ray's object store is an arena in /dev/shm mapped by the raylet (plasma) and by every worker that reads an "
           "object; its touched pages are RssShmem in each mapping process: counted once per process in rss_sum, split "
           "between them in pss_sum")
    return {"counted": touched, "note": f"{how}. Found: {found}.", "per_size": per_size}


if __name__ == "__main__":
    main()
