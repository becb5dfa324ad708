"""Serving latency and throughput: the ecomray app against a bare Serve echo in the same mode, batching on vs off.

    python benchmarks/serve_load.py [--modes throughput,default] [--requests 600] [--time-limit 15]

For each Serve mode (a fresh local Ray per mode, in a subprocess: the mode's env vars must be set before Ray
starts), one Serve instance on a free loopback port runs four apps side by side:
  - `echo`: a bare deployment returning a constant (the framework's floor);
  - `fastapi_echo` / `composed_echo`: a FastAPI ingress answering itself / calling a second deployment through a
    DeploymentHandle (the app's shape without a model), to show where the app's time goes;
  - `tiny`: the ecomray app with the tiny SASRec (experiment tiny), batching on;
  - `heavy_on` / `heavy_off`: the ecomray app with a SASRec over a ~12,000-item synthetic catalogue (a
    Beauty-size catalogue, 1 epoch), `max_batch_size` 32 vs 1.
A bounded async httpx load (fixed request count and time limit per level) drives each at concurrency 1, 8, 32
and records p50/p95/p99 latency and requests/s of POST /v1/recommend (GET for the echo). The model's own time is
measured in-process: `task.predict` for one history, and for a batch of 32. The client shares the machine's cores
with the server. Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_models(root: Path) -> dict[str, str]:
    """Tiny and heavy recommenders in `root` (reused when already there); returns {tag: registry name}."""
    from ecomray import registry
    from ecomray.data.prepare import run as prepare
    from ecomray.train.driver import fit
    from ecomray.config import compose

    specs = {"tiny": ["experiment=tiny", "train.epochs=2", "dataset.synthetic.users=400"],
             "heavy": ["experiment=tiny", "train.epochs=1", "dataset.name=synthetic12k",
                       "dataset.synthetic.users=10000", "dataset.synthetic.items=14000", "model.max_len=50",
                       "model.dim=64", "train.batch_size=256"]}
    names = {}
    for tag, overrides in specs.items():
        cfg = compose("deploy", [f"paths.root={root}", "scaling=inproc", f"registry_name=bench_{tag}", "overwrite=true",
                       *overrides])
        names[tag] = f"bench_{tag}"
        if registry.versions(cfg["paths"]["registry"], names[tag]):
            continue
        prepare(cfg)
        fit(cfg)
    return names


def model_time(root: Path, name: str, n: int = 200) -> dict[str, float]:
    """Median milliseconds of the model's own predict: one history, and a batch of 32 histories. One torch thread,
    as in a replica (Ray sets OMP_NUM_THREADS=1 for a replica with less than one CPU)."""
    import torch

    from ecomray.inference import load_model

    torch.set_num_threads(1)

    lm = load_model(str(root / "registry"), name)
    hist = list(lm.meta["popular"][:8])
    for _ in range(20):
        lm.task.predict(lm.model, lm.meta, [hist], k=10)
    one = []
    for _ in range(n):
        t = time.perf_counter()
        lm.task.predict(lm.model, lm.meta, [hist], k=10)
        one.append(time.perf_counter() - t)
    b32 = []
    for _ in range(max(n // 10, 10)):
        t = time.perf_counter()
        lm.task.predict(lm.model, lm.meta, [hist] * 32, k=10)
        b32.append(time.perf_counter() - t)
    return {"predict_1_ms": statistics.median(one) * 1e3, "predict_32_ms": statistics.median(b32) * 1e3,
            "num_items": int(lm.meta["num_items"])}


async def drive(url: str, body: dict | None, concurrency: int, requests: int, limit_s: float) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    errors = 0
    sent = 0
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        for _ in range(min(20, requests)):                          # warm-up, not counted
            await (client.post(url, json=body) if body is not None else client.get(url))
        t0 = time.perf_counter()
        deadline = t0 + limit_s

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                t = time.perf_counter()
                try:
                    r = await (client.post(url, json=body) if body is not None else client.get(url))
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "seconds": round(wall, 3),
            "req_per_s": len(lat) / wall, "p50_ms": statistics.median(lat) * 1e3, "p95_ms": q[94] * 1e3,
            "p99_ms": q[98] * 1e3}


def one_mode(mode: str, root: Path, names: dict[str, str], levels: list[int], requests: int,
             limit_s: float) -> dict[str, Any]:
    """Runs in a fresh process: set the mode's env, start Ray + Serve, deploy the four apps, drive them."""
    import ray
    from ray import serve

    from ecomray.config import compose
    from serve.app import build_app
    from serve.settings import app_args, apply_env, free_port, throughput_env

    env, described = throughput_env(mode == "throughput", ha_proxy=True)
    apply_env(env)
    ray.init(num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class Echo:
        async def __call__(self, request: Any) -> dict[str, str]:
            return {"ok": "1"}

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")

    # The gap between the bare echo and the app, decomposed: a FastAPI ingress that answers itself, and a FastAPI
    # ingress that calls a second deployment through a DeploymentHandle (the app's shape, without a model).
    # 0.1 CPU each: with the three ecomray apps (0.25 per replica) everything fits in 2 CPUs (a reservation only).
    from fastapi import FastAPI

    fast, composed = FastAPI(), FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    @serve.ingress(fast)
    class FastEcho:
        @fast.post("/")
        async def post(self, body: dict) -> dict:
            return {"ok": "1"}

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class Inner:
        async def echo(self, body: dict) -> dict:
            return {"ok": "1"}

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    @serve.ingress(composed)
    class Outer:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        @composed.post("/")
        async def post(self, body: dict) -> dict:
            return await self.inner.echo.remote(body)

    serve.run(FastEcho.bind(), name="fastapi_echo", route_prefix="/fastapi_echo")
    serve.run(Outer.bind(Inner.bind()), name="composed_echo", route_prefix="/composed_echo")
    base = compose("deploy", [f"paths.root={root}"])
    for app_name, tag, batch in (("tiny", "tiny", 32), ("heavy_on", "heavy", 32), ("heavy_off", "heavy", 1)):
        cfg = json.loads(json.dumps(base))
        cfg["deploy"]["endpoints"] = {"recommend": {"model": names[tag]}}
        cfg["serve"]["log_requests"] = False
        cfg["serve"]["routes"] = {"recommend": {"batching": {"max_batch_size": batch}, "num_replicas": 1}}
        serve.run(build_app({"app": app_args(cfg)}), name=app_name, route_prefix=f"/{app_name}")
    url = f"http://127.0.0.1:{port}"
    from ecomray.inference import load_model

    hists = {tag: list(load_model(str(root / "registry"), n).meta["popular"][:8]) for tag, n in names.items()}
    rows = []
    body0 = {"history": hists["tiny"], "k": 10}
    targets = [("echo", f"{url}/echo", None), ("fastapi_echo", f"{url}/fastapi_echo/", body0),
               ("composed_echo", f"{url}/composed_echo/", body0)] + [
        (a, f"{url}/{a}/v1/recommend", {"history": hists[t], "k": 10})
        for a, t in (("tiny", "tiny"), ("heavy_on", "heavy"), ("heavy_off", "heavy"))]
    for target, u, body in targets:
        for c in levels:
            r = asyncio.run(drive(u, body, c, requests, limit_s))
            r.update(target=target, mode=mode)
            rows.append(r)
            print(f"  {mode:10s} {target:10s} c={c:<3d} {r['req_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.2f}  "
                  f"p95 {r['p95_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  ({r['requests']} ok, {r['errors']} err)",
                  flush=True)
    ray.shutdown()
    return {"mode": mode, "described": described, "rows": rows}


def machine() -> dict[str, Any]:
    import ray
    import torch

    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu_model": cpu, "ray": ray.__version__, "torch": torch.__version__, "gpu": torch.cuda.is_available()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="throughput,default")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=600, help="requests per (target, concurrency) level")
    ap.add_argument("--time-limit", type=float, default=15.0, help="seconds per level, at most")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "ecomray-serve-bench"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.root)
    levels = [int(x) for x in args.levels.split(",")]
    if args._child:                                  # one mode, in its own process
        names = json.loads((root / "names.json").read_text())
        res = one_mode(args._child, root, names, levels, args.requests, args.time_limit)
        (root / f"mode-{args._child}.json").write_text(json.dumps(res))
        return
    t0 = time.time()
    names = train_models(root)
    (root / "names.json").write_text(json.dumps(names))
    forward = {tag: model_time(root, name) for tag, name in names.items()}
    print(f"model time (in-process predict): {json.dumps(forward)}", flush=True)
    modes = []
    for mode in args.modes.split(","):
        subprocess.run([sys.executable, __file__, "--_child", mode, "--root", str(root), "--levels", args.levels,
                        "--requests", str(args.requests), "--time-limit", str(args.time_limit)], check=True)
        modes.append(json.loads((root / f"mode-{mode}.json").read_text()))

    def row(mode: str, target: str, c: int) -> dict[str, Any]:
        return next(r for m in modes if m["mode"] == mode for r in m["rows"] if r["target"] == target
                    and r["concurrency"] == c)

    checks = {}
    for m in modes:
        mode = m["mode"]
        if 1 in levels:
            echo, tiny = row(mode, "echo", 1)["p50_ms"], row(mode, "tiny", 1)["p50_ms"]
            bound = echo + forward["tiny"]["predict_1_ms"] + 2.0
            checks[f"{mode}: tiny recommend p50 at c=1 <= echo p50 + forward + 2 ms"] = {
                "recommend_p50_ms": tiny, "bound_ms": bound, "echo_p50_ms": echo,
                "forward_ms": forward["tiny"]["predict_1_ms"], "met": tiny <= bound}
        if 32 in levels:
            on, off = row(mode, "heavy_on", 32)["req_per_s"], row(mode, "heavy_off", 32)["req_per_s"]
            checks[f"{mode}: heavy batching on/off throughput at c=32 >= 3x"] = {
                "on_req_per_s": on, "off_req_per_s": off, "ratio": on / off, "met": on / off >= 3.0,
                "forward_1_ms": forward["heavy"]["predict_1_ms"], "forward_32_ms": forward["heavy"]["predict_32_ms"]}
    out = {"machine": machine(), "forward": forward, "modes": modes, "checks": checks,
           "requests_per_level": args.requests, "time_limit_s": args.time_limit,
           "note": "client (httpx, one Python process) and server share the machine's cores",
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("\nchecks:")
    for k, v in checks.items():
        print(f"  {'MET ' if v['met'] else 'MISS'} {k}: " + ", ".join(f"{a} {b:.2f}" for a, b in v.items()
                                                                        if isinstance(b, float)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
