"""What the ingress's own code costs per request, without HTTP, proxies or Ray: ASGI calls in one process.

    flock /tmp/ecomray-heavy.lock .venv/bin/python benchmarks/serve_inprocess.py [--requests 2000] [--rounds 5]

Builds the app's FastAPI ingress (`serve.app.build_fastapi`: the Guard middleware, validation, edge checks, the
route handler) with the tiny recommender inline (`deploy.endpoints.recommend.inline: true`, the model in the
ingress), from the registry `benchmarks/serve_load.py` trains (`--root`, default /tmp/ecomray-serve-bench; run that
first), and sends it POST /v1/recommend as raw ASGI calls on one event loop, one torch thread (as in a replica).
Beside it, in the same rounds: the family's `predict` alone and its `serve_batch` alone on the same request (the
difference is the price of the serving code around the model), and `predict` after 5 ms of idling before each call
(median of a quarter as many calls), which is how a model replica meets requests at concurrency 1. Medians of `--rounds`; writes
benchmarks/results/serve_inprocess.json. With `--profile`, a cProfile of one round (top functions by own time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(root: Path, name: str):
    from ecomray.config import compose
    from serve.app import Ingress, build_fastapi
    from serve.settings import app_args

    cfg = compose("deploy", [f"paths.root={root}"])
    cfg["deploy"]["endpoints"] = {"recommend": {"model": name, "inline": True}}
    cfg["serve"].update({"log_requests": False})
    cfg["serve"]["routes"] = {"recommend": {"batching": {"max_batch_size": 32}, "num_replicas": 1}}
    a = app_args(cfg)
    settings = {"host": "127.0.0.1", "api_key": None, "registry": a["registry"], "endpoints": a["endpoints"],
                "retries": 1, "max_body_bytes": 1 << 20, "body_timeout_s": 10.0, "log_requests": False,
                "metrics": True}
    # the user class under Serve's deployment and ingress wrappers: built directly, no Ray
    cls = next(c for c in Ingress.func_or_class.__mro__ if "__serve_build_asgi_app__" in c.__dict__)
    ingress = cls({}, settings)
    return build_fastapi(ingress), a["registry"]


def asgi_request(app, body: bytes):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/recommend", "raw_path": b"/v1/recommend", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}

    async def call() -> None:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(dict(scope), receive, send)
        if sent[0]["status"] != 200:
            raise SystemExit(f"the app answered {sent[0]['status']}: {sent[1].get('body', b'')[:300]!r}")

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/ecomray-serve-bench")
    ap.add_argument("--model", default="bench_tiny")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_inprocess.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from ecomray.inference import load_model

    app, registry_root = build(Path(args.root), args.model)
    lm = load_model(registry_root, args.model)
    lm.model.eval()
    request = {"history": list(lm.meta["popular"][:8]), "k": 10}
    body = json.dumps(request).encode()
    call = asgi_request(app, body)
    n = args.requests

    async def requests(k: int) -> None:
        for _ in range(k):
            await call()

    def ms_per(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) / n * 1e3

    asyncio.run(requests(200))                                  # warm-up
    def idle_predict_ms(k: int, idle_s: float = 0.005) -> float:
        """`predict` after `idle_s` of sleep each time, as a model replica runs it at low load: the same call
        is several times slower here once the CPU has idled (caches, the VM's vCPU wake-up)."""
        times = []
        for _ in range(k):
            time.sleep(idle_s)
            t = time.perf_counter()
            lm.task.predict(lm.model, lm.meta, [request["history"]], k=10)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    sides = {"ingress_request": [], "serve_batch": [], "predict": [], "predict_after_5ms_idle": []}
    for _ in range(args.rounds):
        sides["ingress_request"].append(ms_per(lambda: asyncio.run(requests(n))))
        sides["serve_batch"].append(ms_per(lambda: [lm.task.serve_batch(lm.model, lm.meta, [dict(request)], {})
                                                    for _ in range(n)]))
        sides["predict"].append(ms_per(lambda: [lm.task.predict(lm.model, lm.meta, [request["history"]], k=10)
                                                for _ in range(n)]))
        sides["predict_after_5ms_idle"].append(idle_predict_ms(max(n // 4, 1)))
    med = {k: statistics.median(v) for k, v in sides.items()}
    out = {"model": args.model, "requests_per_round": n, "rounds": args.rounds,
           "ms_per_request_median": {k: round(v, 4) for k, v in med.items()},
           "ms_per_request_rounds": {k: [round(x, 4) for x in v] for k, v in sides.items()},
           "serving_code_ms": round(med["ingress_request"] - med["predict"], 4),
           "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
           "loadavg_before": os.getloadavg(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"{'side':24s}{'ms/request (median of ' + str(args.rounds) + ')':>30s}")
    for k, v in med.items():
        print(f"{k:24s}{v:>30.3f}")
    print(f"the serving code around predict: {out['serving_code_ms']:.3f} ms per request (in-process, no HTTP)")
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(requests(n))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    out["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
