"""Serving latency and throughput: the ecomray app against Serve echoes of the same shape, in the same run.

    flock /tmp/ecomray-heavy.lock .venv/bin/python benchmarks/serve_load.py [--modes throughput,default]
        [--requests 600] [--time-limit 15] [--client raw|httpx] [--targets composed_echo,heavy_on,big_on,big_off]

For each Serve mode (a fresh local Ray per mode, in a subprocess: the mode's env vars must be set before Ray
starts), one Serve instance on a free loopback port (HTTP on 127.0.0.1 only; in HAProxy mode Ray 2.60 binds
HAProxy's stats and metrics listeners on every interface, on free ports) runs these apps one at a time (deployed,
driven, deleted):
  - `echo`: a bare deployment returning a constant: one hop, the framework's floor;
  - `fastapi_echo`: a FastAPI ingress answering itself (one hop, with FastAPI);
  - `composed_echo`: a FastAPI ingress calling a second deployment that echoes through a DeploymentHandle: the
    app's own topology (two hops) without a model: the floor the app is measured against;
  - `tiny` / `tiny_inline`: the ecomray app with the tiny SASRec (experiment tiny) as deployed normally (ingress ->
    handle -> model replica) and with `deploy.endpoints.recommend.inline: true` (the model inside the ingress);
    `tiny_nometrics`: two hops with `serve.metrics=false` (what the app's Prometheus metrics cost);
  - `heavy_on` / `heavy_off`: a SASRec over a ~12,000-item synthetic catalogue (dim 64), max_batch_size 32 vs 1;
  - `big_on` / `big_off`: a SASRec (dim 1024, 1 block, 40M parameters) over a ~33,000-item synthetic catalogue,
    whose single-row forward takes >= 10 ms on one thread: the model that batching is for (for one row the
    catalogue projection and the block's weights are memory-bound reads; one read serves a whole batch),
    max_batch_size 32 vs 1. It is a load model: one epoch on near-uniform choices, its ranking quality is nil.
  - `x_*` (only when named in --targets): tiny / heavy / big with the model on the replica's event loop
    (`batching.in_thread: false`), for an A/B against the default (the model in the batcher's thread).
Every model route has one replica; every replica reserves 0.1 CPU (a reservation only: all fit in `num_cpus=2`;
Ray runs each with one torch thread). A bounded async load (a fixed request count and a time limit per level,
after 20 warm-up requests) drives each target at its concurrency levels and records p50/p95/p99 latency and
requests/s (POST /v1/recommend, POST for the FastAPI echoes, GET for the bare echo). The client (`--client`) is
`raw`, a minimal asyncio HTTP/1.1 keep-alive client (~0.2-0.4 ms of CPU a request here), or `httpx` (~1.3-2 ms):
it runs on the server's cores, so the cheaper one leaves more of them to the server. Per level the JSON also has
`cpu_ms_per_request` (CPU time from /proc, split into client, the target's ingress and model replicas, HAProxy /
proxy, and other: Ray's daemons and anything else running) and, for the model targets, `batches` (the model
replica's own counters from GET /v1/models: batch count, mean size, {size: count}, model wall and CPU seconds). The models' own time is
measured in-process, one torch thread: `task.predict` for one history and for a batch of 32 (the request's
history: the 8 most popular items). The client shares the machine's 2 cores with the server.

Checks (per mode, all in the JSON's "checks", each with "met"; the bars are judged in the mode the app is
configured for, `serve.throughput_optimized: true` in conf/serve/local.yaml, i.e. "throughput"; the default mode's
checks are for comparison):
  - tiny recommend p50 at c=1 <= composed_echo p50 + tiny forward + 1 ms (two hops), and tiny_inline p50 at
    c=1 <= fastapi_echo p50 + tiny forward + 1 ms (one hop);
  - heavy with batching, req/s at c=32 >= 80% of composed_echo's req/s at c=32 (the ceiling of the topology);
  - big: batching on / off req/s at c=32 >= 3x, and big's single-row forward >= 10 ms; batching on both as the
    task configures it (max 32, no wait) and with a 10 ms batch wait (`serve.routes.recommend.batching`), meant
    to let a batch fill.
  - the same two c=1 latency checks, paired: the floor and the app deployed together, driven in alternating rounds
    (6 x 200 requests each, medians of the round p50s), because a p50 drifts by 1-2 ms between deployments here;
    and tiny against `torch_echo`, the two-hop echo whose inner deployment runs the same `predict` (no ecomray
    serving code), with the forward's time as measured inside that replica: what the app's own code adds.
    `--targets paired` runs only these.
Also reported: what one hop saves (composed_echo - fastapi_echo, tiny - tiny_inline, p50 at c=1).
Writes benchmarks/results/serve_load.json.
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

MODEL_SPECS = {
    "tiny": ["experiment=tiny", "train.epochs=2", "dataset.synthetic.users=400"],
    "heavy": ["experiment=tiny", "train.epochs=1", "dataset.name=synthetic12k", "dataset.synthetic.users=10000",
              "dataset.synthetic.items=14000", "model.max_len=50", "model.dim=64", "train.batch_size=256"],
    # A flat-ish choice distribution (temperature 5) so that ~60k views touch most of a 45k-item catalogue;
    # sampled softmax (200 negatives) and max_len 10 keep its one training epoch short.
    "big": ["experiment=tiny", "train.epochs=1", "dataset.name=synthetic45k", "dataset.synthetic.users=5000",
            "dataset.synthetic.items=45000", "dataset.synthetic.temperature=5.0", "model.max_len=10",
            "model.dim=1024", "task.num_negatives=200", "train.batch_size=256", "task.eval_batch_size=256"],
}

# (target, what, levels): what is an echo kind, or (model tag, max_batch_size or the route's batching settings,
# inline, extra serve settings).
ECHO_LEVELS = [1, 8, 32]
TARGETS: list[tuple[str, Any, list[int]]] = [
    ("echo", "echo", ECHO_LEVELS),
    ("fastapi_echo", "fastapi_echo", ECHO_LEVELS),
    ("composed_echo", "composed_echo", ECHO_LEVELS),
    ("tiny", ("tiny", 32, False, {}), [1, 8, 32]),
    ("tiny_inline", ("tiny", 32, True, {}), [1, 8, 32]),
    ("tiny_nometrics", ("tiny", 32, False, {"metrics": False}), [1]),
    ("heavy_on", ("heavy", 32, False, {}), [1, 32]),
    ("heavy_off", ("heavy", 1, False, {}), [1, 32]),
    ("big_on", ("big", 32, False, {}), [1, 32]),
    ("big_on_wait", ("big", {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}, False, {}), [1, 32]),
    ("big_off", ("big", 1, False, {}), [1, 32]),
    # Run only when named in --targets: the model on the replica's event loop (`in_thread: false`), for A/B.
    ("x_tiny_loop", ("tiny", {"max_batch_size": 32, "in_thread": False}, False, {}), [1, 32]),
    ("x_heavy_loop", ("heavy", {"max_batch_size": 32, "in_thread": False}, False, {}), [1, 32]),
    ("x_big_loop", ("big", {"max_batch_size": 32, "in_thread": False}, False, {}), [32]),
]


def train_models(root: Path) -> dict[str, str]:
    """The recommenders of MODEL_SPECS in `root` (reused when already there); returns {tag: registry name}."""
    from ecomray import registry
    from ecomray.config import compose
    from ecomray.data.prepare import run as prepare
    from ecomray.train.driver import fit

    names = {}
    for tag, overrides in MODEL_SPECS.items():
        cfg = compose("deploy", [f"paths.root={root}", "scaling=inproc", f"registry_name=bench_{tag}", "overwrite=true",
                       *overrides])
        names[tag] = f"bench_{tag}"
        if registry.versions(cfg["paths"]["registry"], names[tag]):
            continue
        t = time.time()
        prepare(cfg)
        fit(cfg)
        print(f"trained {names[tag]} in {time.time() - t:.0f}s", flush=True)
    return names


IDLE_GAP_S = 0.005


def model_time(root: Path, name: str, n: int = 100) -> dict[str, Any]:
    """Median milliseconds of the model's own predict: one history, and a batch of 32 histories. One torch thread,
    as in a replica (Ray sets OMP_NUM_THREADS=1 for a replica with less than one CPU)."""
    import torch

    from ecomray.inference import load_model

    torch.set_num_threads(1)
    lm = load_model(str(root / "registry"), name)
    hist = list(lm.meta["popular"][:8])
    for _ in range(10):
        lm.task.predict(lm.model, lm.meta, [hist], k=10)
    one = []
    deadline = time.perf_counter() + 10
    for _ in range(n):
        t = time.perf_counter()
        lm.task.predict(lm.model, lm.meta, [hist], k=10)
        one.append(time.perf_counter() - t)
        if t > deadline:
            break
    b32 = []
    deadline = time.perf_counter() + 10
    for _ in range(max(n // 5, 10)):
        t = time.perf_counter()
        lm.task.predict(lm.model, lm.meta, [hist] * 32, k=10)
        b32.append(time.perf_counter() - t)
        if t > deadline:
            break
    # At concurrency 1 a replica idles between requests (a request spends most of its time in the client and the
    # proxy): the same predict, each call after IDLE_GAP_S of sleep, is what the replica's forward meets there.
    idle = []
    deadline = time.perf_counter() + 10
    for _ in range(n):
        time.sleep(IDLE_GAP_S)
        t = time.perf_counter()
        lm.task.predict(lm.model, lm.meta, [hist], k=10)
        idle.append(time.perf_counter() - t)
        if t > deadline:
            break
    m = lm.model
    return {"predict_1_ms": statistics.median(one) * 1e3, "predict_32_ms": statistics.median(b32) * 1e3,
            "predict_1_after_idle_ms": statistics.median(idle) * 1e3, "idle_gap_ms": IDLE_GAP_S * 1e3,
            "num_items": int(lm.meta["num_items"]), "params": int(sum(p.numel() for p in m.parameters())),
            "dim": int(m.item_emb.embedding_dim) if hasattr(m, "item_emb") else None,
            "version": lm.version}


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, one connection per caller: one prebuilt request,
    the status line, the headers, a Content-Length or chunked body. It costs the shared cores about a fifth of
    what httpx does per request (the JSON's `cpu_ms_per_request.client`), so more of them serve."""

    def __init__(self, url: str, body: dict | None) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", int(u.port or 80)
        head = f"{'GET' if body is None else 'POST'} {u.path or '/'} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        data = b"" if body is None else json.dumps(body).encode()
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.request = (head + "\r\n").encode() + data

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def send(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> tuple[int, bool]:
        """(status, keep the connection)."""
        reader, writer = conn
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
        headers = {k.strip().lower(): v.strip().lower() for k, v in headers.items()}
        if b"content-length" in headers:
            await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        return status, headers.get(b"connection") != b"close"


async def drive(url: str, body: dict | None, concurrency: int, requests: int, limit_s: float,
                snapshot: Any = None, client: str = "raw") -> dict[str, Any]:
    """`concurrency` callers, each sending its next request when the last is answered, until `requests` are sent
    or `limit_s` passed (after 20 warm-up requests). `client`: raw (RawHTTP) or httpx."""
    import httpx

    lat: list[float] = []
    errors = 0
    sent = 0
    raw = RawHTTP(url, body) if client == "raw" else None
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as hx:
        async def one(conn: list) -> bool:
            if raw is None:
                r = await (hx.post(url, json=body) if body is not None else hx.get(url))
                return r.status_code == 200
            if not conn:
                conn.append(await raw.connect())
            try:
                status, keep = await asyncio.wait_for(raw.send(conn[0]), 30)
            except BaseException:
                conn.pop()[1].close()
                raise
            if not keep:
                conn.pop()[1].close()
            return status == 200

        warm: list = []
        for _ in range(min(20, requests)):                          # warm-up, not counted
            await one(warm)
        if warm:
            warm[0][1].close()
        cpu0 = snapshot() if snapshot else None
        t0 = time.perf_counter()
        deadline = t0 + limit_s

        async def worker() -> None:
            nonlocal sent, errors
            conn: list = []
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                t = time.perf_counter()
                try:
                    ok = await one(conn)
                except (httpx.HTTPError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1
            if conn:
                conn[0][1].close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu1 = snapshot() if snapshot else None
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "seconds": round(wall, 3),
            "req_per_s": len(lat) / wall if wall else 0.0,
            "p50_ms": statistics.median(lat) * 1e3 if lat else float("nan"),
            "p95_ms": q[94] * 1e3, "p99_ms": q[98] * 1e3, "cpu0": cpu0, "cpu1": cpu1}


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """{pid: (command line, user + system clock ticks)} of every process we can read (Linux /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(d)] = (cmd, int(fields[11]) + int(fields[12]))
    return out


def cpu_split(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], target: str,
              requests: int) -> dict[str, float]:
    """CPU milliseconds per answered request, by process group, between two `cpu_ticks()` snapshots: the client
    (this process), the target app's ingress and model replicas, HAProxy / Serve's proxy, and the rest (Ray's own
    daemons, other apps' replicas, other users)."""
    hz = os.sysconf("SC_CLK_TCK")
    groups: dict[str, float] = {}
    me = os.getpid()
    for pid, (cmd, t) in after.items():
        d = t - before.get(pid, (cmd, 0))[1] if pid in before else t
        if d <= 0:
            continue
        if pid == me:
            g = "client"
        elif f":{target}:" in cmd or f":{target}#" in cmd:
            g = "model" if ("model_" in cmd or "Inner" in cmd) else "ingress"
        elif "haproxy" in cmd.lower() or "ProxyActor" in cmd:
            g = "proxy"
        else:
            g = "other"
        groups[g] = groups.get(g, 0.0) + d / hz
    return {g: round(v * 1e3 / max(requests, 1), 3) for g, v in sorted(groups.items())}


def batch_stats(url: str) -> dict[str, Any] | None:
    """The model replica's batching counters (GET /v1/models; one replica per route here)."""
    import httpx

    try:
        loaded = httpx.get(url, timeout=10).json()["loaded"]
        return next(m["batching"] for m in loaded if m.get("batching"))
    except Exception:  # noqa: BLE001 - informative only
        return None


def batch_diff(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if not a or not b:
        return None
    sizes = {k: v - a["sizes"].get(k, 0) for k, v in b["sizes"].items() if v - a["sizes"].get(k, 0)}
    n, r = b["batches"] - a["batches"], b["requests"] - a["requests"]
    return {"batches": n, "requests": r, "mean_size": round(r / n, 2) if n else None,
            "model_busy_s": round(b["busy_s"] - a["busy_s"], 3),
            "model_cpu_s": round(b.get("cpu_s", 0.0) - a.get("cpu_s", 0.0), 3),
            "sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))}


def echo_app(kind: str, model: tuple[str, str] | None = None) -> Any:
    """The echo apps: bare (one hop), FastAPI (one hop), FastAPI ingress -> handle -> echo (the app's two hops).
    Same options as the app's deployments (0.1 CPU reserved, max_ongoing_requests 64; the ingress 1024)."""
    from fastapi import FastAPI
    from ray import serve

    if kind == "echo":
        @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
        class Echo:
            async def __call__(self, request: Any) -> dict[str, str]:
                return {"ok": "1"}

        return Echo.bind()
    app = FastAPI()
    if kind == "fastapi_echo":
        @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
        @serve.ingress(app)
        class FastEcho:
            @app.post("/")
            async def post(self, body: dict) -> dict:
                return {"ok": "1"}

        return FastEcho.bind()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class Inner:
        """An echo; as `torch_echo` it first runs the family's `predict` on the body's history (no ecomray serving
        code around it) and keeps the forward's own time, as measured inside this replica."""

        def __init__(self, registry_root: str | None = None, name: str | None = None) -> None:
            self.lm, self.forward_s = None, []
            if name:
                from ecomray.inference import load_model

                self.lm = load_model(registry_root, name)
                self.lm.model.eval()

        async def echo(self, body: dict) -> dict:
            if self.lm is not None:
                t = time.perf_counter()
                self.lm.task.predict(self.lm.model, self.lm.meta, [body["history"]], k=int(body.get("k", 10)))
                self.forward_s.append(time.perf_counter() - t)
            return {"ok": "1"}

        async def forward_ms(self) -> float | None:
            return statistics.median(self.forward_s) * 1e3 if self.forward_s else None

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
    @serve.ingress(app)
    class Outer:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        @app.post("/")
        async def post(self, body: dict) -> dict:
            return await self.inner.echo.remote(body)

        @app.get("/forward_ms")
        async def forward_ms(self) -> float | None:
            return await self.inner.forward_ms.remote()

    return Outer.bind(Inner.bind(*(model or ())))


def one_mode(mode: str, root: Path, names: dict[str, str], requests: int, limit_s: float,
             only: set[str] | None, client: str = "raw") -> dict[str, Any]:
    """Runs in a fresh process: set the mode's env, start Ray + Serve, then deploy, drive and delete each app."""
    import ray
    from ray import serve

    from ecomray.config import compose
    from ecomray.inference import load_model
    from serve.settings import apply_env, free_port, throughput_env

    env, described = throughput_env({"throughput_optimized": mode == "throughput", "ha_proxy": True})
    apply_env(env)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    hists = {tag: list(load_model(str(root / "registry"), n).meta["popular"][:8]) for tag, n in names.items()}
    base = compose("deploy", [f"paths.root={root}"])
    # One app at a time: deployed, driven, deleted. Each serve.delete returns at once (a blocking delete takes
    # ~30 s here); the next app starts after a 3 s pause, so every target sees the same small background (the
    # previous app's replicas stopping) rather than the idle replicas of all the others (with all ten apps up,
    # 17 replicas, the two-hop echo's p50 at c=1 was 6.9 ms, against 4.2 ms with four apps up).
    rows = []
    for target, what, levels in TARGETS:
        if (only and target not in only) or (not only and target.startswith("x_")):
            continue
        t_deploy = time.perf_counter()
        u, body = deploy(target, what, base, names, hists, url)
        print(f"  deployed {target} in {time.perf_counter() - t_deploy:.1f}s", flush=True)
        models_url = None if isinstance(what, str) else f"{url}/{target}/v1/models"
        for c in levels:
            b0 = batch_stats(models_url) if models_url else None
            r = asyncio.run(drive(u, body, c, requests, limit_s, cpu_ticks, client))
            b1 = batch_stats(models_url) if models_url else None
            r["cpu_ms_per_request"] = cpu_split(r.pop("cpu0"), r.pop("cpu1"), target, r["requests"])
            r.update(target=target, mode=mode, batches=batch_diff(b0, b1))
            rows.append(r)
            print(f"  {mode:10s} {target:14s} c={c:<3d} {r['req_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.2f}  "
                  f"p95 {r['p95_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  ({r['requests']} ok, {r['errors']} err)",
                  flush=True)
            print(f"      cpu ms/request {r['cpu_ms_per_request']}" + (
                f"  batches: mean {r['batches']['mean_size']}, sizes {r['batches']['sizes']}" if r["batches"] else ""),
                  flush=True)
        serve.delete(target, _blocking=False)
        time.sleep(3)
    paired = []
    for echo_target, model_target in PAIRS:
        if only and not {echo_target, model_target, "paired"} & only:
            continue
        paired.append(drive_pair(echo_target, model_target, base, names, hists, url, client))
    serve.shutdown()
    ray.shutdown()
    return {"mode": mode, "described": described, "rows": rows, "paired": paired}


# c=1 latency checks compare two apps measured minutes apart, one at a time: on this VM a p50 moves by 1-2 ms between
# deployments of the same app (tiny_nometrics against tiny). The paired measurement deploys the floor and the app
# together and alternates short rounds between them, so drift hits both alike.
PAIRS = [("composed_echo", "tiny"), ("fastapi_echo", "tiny_inline"), ("torch_echo", "tiny")]
PAIR_ROUNDS, PAIR_REQUESTS = 6, 200


def deploy(name: str, what: Any, base: dict, names: dict, hists: dict, url: str,
           model: tuple[str, str] | None = None) -> tuple[str, dict | None]:
    """Deploys one target of TARGETS as app `name` (an echo kind, or (tag, batching, inline, extra serve settings) for
    the ecomray app); returns the URL to drive and the request body."""
    from ray import serve

    from serve.app import build_app
    from serve.settings import app_args

    if isinstance(what, str):
        serve.run(echo_app(what, model), name=name, route_prefix=f"/{name}")
        return f"{url}/{name}" + ("" if what == "echo" else "/"), (None if what == "echo" else
                                                                     {"history": hists["tiny"], "k": 10})
    tag, batch, inline, extra = what
    cfg = json.loads(json.dumps(base))
    cfg["deploy"]["endpoints"] = {"recommend": {"model": names[tag], "inline": inline}}
    cfg["serve"].update({"log_requests": False, **extra})
    cfg["serve"]["common"]["ray_actor_options"] = {"num_cpus": 0.1}
    batching = batch if isinstance(batch, dict) else {"max_batch_size": batch}
    cfg["serve"]["routes"] = {"recommend": {"batching": batching, "num_replicas": 1}}
    serve.run(build_app({"app": app_args(cfg)}), name=name, route_prefix=f"/{name}")
    return f"{url}/{name}/v1/recommend", {"history": hists[tag], "k": 10}


def drive_pair(echo_target: str, model_target: str, base: dict, names: dict, hists: dict, url: str,
               client: str) -> dict[str, Any]:
    from ray import serve

    apps = {}
    for target in (echo_target, model_target):
        what = "composed_echo" if target == "torch_echo" else next(w for t, w, _ in TARGETS if t == target)
        model = (str(Path(base["paths"]["registry"])), names["tiny"]) if target == "torch_echo" else None
        apps[target] = deploy(f"pair_{target}", what, base, names, hists, url, model)
    rounds: dict[str, list[float]] = {echo_target: [], model_target: []}
    for k in range(PAIR_ROUNDS):
        order = (echo_target, model_target) if k % 2 == 0 else (model_target, echo_target)
        for target in order:
            u, body = apps[target]
            r = asyncio.run(drive(u, body, 1, PAIR_REQUESTS, 15.0, None, client))
            rounds[target].append(r["p50_ms"])
    forward_in_replica = None
    if echo_target == "torch_echo":
        import httpx

        forward_in_replica = httpx.get(f"{url}/pair_torch_echo/forward_ms", timeout=10).json()
    for target in apps:
        serve.delete(f"pair_{target}", _blocking=False)
    time.sleep(3)
    out = {"echo": echo_target, "model": model_target, "rounds": PAIR_ROUNDS, "requests_per_round": PAIR_REQUESTS,
           "p50_ms_per_round": rounds,
           "median_p50_ms": {t: statistics.median(v) for t, v in rounds.items()},
           **({"forward_in_replica_ms": forward_in_replica} if forward_in_replica is not None else {})}
    print(f"  paired c=1, {PAIR_ROUNDS} alternating rounds of {PAIR_REQUESTS}: " + ", ".join(
        f"{t} p50 {out['median_p50_ms'][t]:.2f} ms (rounds {', '.join(f'{x:.2f}' for x in v)})"
        for t, v in rounds.items()), flush=True)
    return out


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


def concurrent() -> dict[str, Any]:
    """What else runs on the machine (Ray workers, tests, ecomray jobs of other users), and the load average."""
    try:
        procs = subprocess.run(["pgrep", "-af", r"ray::|pytest|jobs\."], capture_output=True, text=True,
                               timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        procs = ["(pgrep failed)"]
    mine = str(os.getpid())
    return {"processes": [p[:200] for p in procs if p.split(" ", 1)[0] != mine],
            "loadavg": os.getloadavg(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="throughput,default")
    ap.add_argument("--requests", type=int, default=600, help="requests per (target, concurrency) level")
    ap.add_argument("--time-limit", type=float, default=15.0, help="seconds per level, at most")
    ap.add_argument("--targets", default="", help="comma-separated subset of targets (quick runs), e.g. "
                    "composed_echo,heavy_on,big_on,big_off")
    ap.add_argument("--client", default="raw", choices=("raw", "httpx"),
                    help="load generator: a minimal asyncio HTTP/1.1 client (raw) or httpx")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "ecomray-serve-bench"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.root)
    only = set(filter(None, args.targets.split(","))) or None
    if args._child:                                  # one mode, in its own process
        names = json.loads((root / "names.json").read_text())
        res = one_mode(args._child, root, names, args.requests, args.time_limit, only, args.client)
        (root / f"mode-{args._child}.json").write_text(json.dumps(res))
        return
    t0 = time.time()
    before = concurrent()
    print(f"concurrent: load {before['loadavg']}, {len(before['processes'])} other processes", flush=True)
    names = train_models(root)
    (root / "names.json").write_text(json.dumps(names))
    forward = {tag: model_time(root, name) for tag, name in names.items()}
    for tag, f in forward.items():
        print(f"model {tag}: {f['num_items']} items, dim {f['dim']}, {f['params'] / 1e6:.1f}M params: predict "
              f"1 row {f['predict_1_ms']:.2f} ms ({f['predict_1_after_idle_ms']:.2f} ms after {f['idle_gap_ms']:.0f} ms "
              f"idle), 32 rows {f['predict_32_ms']:.2f} ms (in-process, 1 thread)",
              flush=True)
    modes = []
    for mode in args.modes.split(","):
        subprocess.run([sys.executable, __file__, "--_child", mode, "--root", str(root), "--requests",
                        str(args.requests), "--time-limit", str(args.time_limit), "--targets", args.targets,
                        "--client", args.client],
                       check=True)
        modes.append(json.loads((root / f"mode-{mode}.json").read_text()))
    after = concurrent()

    def row(mode: str, target: str, c: int) -> dict[str, Any] | None:
        return next((r for m in modes if m["mode"] == mode for r in m["rows"] if r["target"] == target
                     and r["concurrency"] == c), None)

    checks: dict[str, dict[str, Any]] = {}
    hops: dict[str, dict[str, float]] = {}
    for m in modes:
        mode = m["mode"]
        echo2, tiny, inline, fecho = (row(mode, t, 1) for t in ("composed_echo", "tiny", "tiny_inline", "fastapi_echo"))
        if echo2 and tiny:
            bound = echo2["p50_ms"] + forward["tiny"]["predict_1_ms"] + 1.0
            checks[f"{mode}: tiny recommend p50 at c=1 <= two-hop echo p50 + forward + 1 ms"] = {
                "recommend_p50_ms": tiny["p50_ms"], "bound_ms": bound, "two_hop_echo_p50_ms": echo2["p50_ms"],
                "forward_ms": forward["tiny"]["predict_1_ms"], "gap_ms": tiny["p50_ms"] - bound,
                "met": tiny["p50_ms"] <= bound}
        if inline and echo2 and fecho and tiny:
            hops[mode] = {"echo_two_hop_minus_one_hop_p50_ms": echo2["p50_ms"] - fecho["p50_ms"],
                          "tiny_two_hop_minus_inline_p50_ms": tiny["p50_ms"] - inline["p50_ms"],
                          "tiny_p50_ms": tiny["p50_ms"], "tiny_inline_p50_ms": inline["p50_ms"]}
            checks[f"{mode}: tiny inline (one hop) p50 at c=1 <= one-hop FastAPI echo p50 + forward + 1 ms"] = {
                "inline_p50_ms": inline["p50_ms"], "one_hop_echo_p50_ms": fecho["p50_ms"],
                "bound_ms": fecho["p50_ms"] + forward["tiny"]["predict_1_ms"] + 1.0,
                "met": inline["p50_ms"] <= fecho["p50_ms"] + forward["tiny"]["predict_1_ms"] + 1.0}
        for pair in m.get("paired") or []:
            e, t = pair["median_p50_ms"][pair["echo"]], pair["median_p50_ms"][pair["model"]]
            if pair["echo"] == "torch_echo":   # same topology, same model, no ecomray serving code: what ours adds
                checks[f"{mode}: paired: tiny p50 at c=1 <= torch_echo p50 + 1 ms (the two-hop echo running the same "
                       f"predict in its inner deployment), median of {pair['rounds']} alternating rounds"] = {
                    "model_p50_ms": t, "torch_echo_p50_ms": e, "forward_in_replica_ms": pair.get("forward_in_replica_ms"),
                    "forward_in_process_ms": forward["tiny"]["predict_1_ms"], "gap_ms": t - e - 1.0,
                    "met": t <= e + 1.0}
                continue
            bound = e + forward["tiny"]["predict_1_ms"] + 1.0
            hop = "two hops" if pair["echo"] == "composed_echo" else "one hop"
            checks[f"{mode}: paired: {pair['model']} ({hop}) p50 at c=1 <= {pair['echo']} p50 + forward + 1 ms, "
                   f"median of {pair['rounds']} alternating rounds"] = {
                "model_p50_ms": t, "echo_p50_ms": e, "forward_ms": forward["tiny"]["predict_1_ms"],
                "bound_ms": bound, "gap_ms": t - bound, "met": t <= bound}
        echo32, heavy32 = row(mode, "composed_echo", 32), row(mode, "heavy_on", 32)
        if echo32 and heavy32:
            frac = heavy32["req_per_s"] / echo32["req_per_s"]
            checks[f"{mode}: heavy batching req/s at c=32 >= 80% of two-hop echo req/s at c=32"] = {
                "heavy_on_req_per_s": heavy32["req_per_s"], "two_hop_echo_req_per_s": echo32["req_per_s"],
                "fraction": frac, "met": frac >= 0.8}
        off = row(mode, "big_off", 32)
        for on_target, how in (("big_on", "batching 32, no wait (the task's default)"),
                               ("big_on_wait", "batching 32, batch_wait_timeout_s 0.01")):
            on = row(mode, on_target, 32)
            if on and off:
                ratio = on["req_per_s"] / off["req_per_s"]
                checks[f"{mode}: big (forward >= 10 ms), {how}: on/off req/s at c=32 >= 3x"] = {
                    "on_req_per_s": on["req_per_s"], "off_req_per_s": off["req_per_s"], "ratio": ratio,
                    "forward_1_ms": forward["big"]["predict_1_ms"], "forward_32_ms": forward["big"]["predict_32_ms"],
                    "met": ratio >= 3.0 and forward["big"]["predict_1_ms"] >= 10.0}
    idle_ms = forward["tiny"].get("predict_1_after_idle_ms") if "tiny" in forward else None
    for check in checks.values():   # the c=1 bounds (the tiny forward in them) again with the forward as it runs
        if idle_ms is not None and "bound_ms" in check:   # between requests: reported beside, `met` unchanged
            p50 = check.get("recommend_p50_ms", check.get("inline_p50_ms", check.get("model_p50_ms")))
            check["forward_after_idle_ms"] = idle_ms
            check["bound_with_forward_after_idle_ms"] = check["bound_ms"] - forward["tiny"]["predict_1_ms"] + idle_ms
            check["met_with_forward_after_idle"] = p50 <= check["bound_with_forward_after_idle_ms"]
    if "big" in forward:
        checks["big model's single-row forward >= 10 ms (in-process, 1 thread)"] = {
            "forward_1_ms": forward["big"]["predict_1_ms"], "met": forward["big"]["predict_1_ms"] >= 10.0}
    client = f"{args.client}, one Python process (also the Ray driver) on the same {os.cpu_count()} cores"
    out = {"machine": machine(), "concurrent": {"before": before, "after": after, "client": client},
           "models": {tag: {"registry_name": names[tag], "trained_with": MODEL_SPECS[tag], **forward[tag]}
                      for tag in names},
           "forward": forward, "modes": modes, "one_hop_saves": hops, "checks": checks,
           "requests_per_level": args.requests, "time_limit_s": args.time_limit, "client": args.client,
           "bars_judged_on": "throughput (conf/serve/local.yaml serve.throughput_optimized: true, the app's mode)",
           "note": f"client ({args.client}, one Python process) and server share the machine's cores; one replica per "
                   "deployment; one app at a time (deploy, drive, delete)",
           "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                                else sys.executable, "benchmarks/serve_load.py", *sys.argv[1:]]),
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))

    print(f"\n{'mode':10s} {'target':14s} {'c':>3s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for m in modes:
        for r in m["rows"]:
            print(f"{m['mode']:10s} {r['target']:14s} {r['concurrency']:3d} {r['req_per_s']:8.1f} "
                  f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    print("\none hop saves (p50 at c=1): " + json.dumps({k: {a: round(b, 2) for a, b in v.items()}
                                                         for k, v in hops.items()}))
    print("\nchecks:")
    for k, v in checks.items():
        print(f"  {'MET ' if v['met'] else 'MISS'} {k}: " + ", ".join(f"{a} {b:.2f}" for a, b in v.items()
                                                                        if isinstance(b, float)))
    print(f"wrote {args.out} in {out['seconds']:.0f}s")


if __name__ == "__main__":
    main()
