"""python -m jobs.deploy experiment=<name>: serve the experiment's registry models with Ray Serve (serve/app.py).

    python -m jobs.deploy experiment=tiny                         # 127.0.0.1:8000, blocks; Ctrl-C shuts down
    python -m jobs.deploy experiment=tiny deploy.once=true        # deploy, answer one request, shut down
    python -m jobs.deploy experiment=tiny deploy.write_config=serve_config.yaml serve=cluster   # for serve deploy
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import hydra
from omegaconf import DictConfig

from ecomray.runtime import to_plain, user_errors


def serve_config(plain: dict[str, Any]) -> dict[str, Any]:
    """A Serve config file (`serve deploy`) for this app, every route pinned to the exact version resolved now. The
    API key is never written: the ingress reads ECOMRAY_API_KEY from its environment (set it on the nodes or in
    the runtime_env)."""
    from serve.settings import app_args

    d = plain["deploy"]
    args = app_args(plain)
    args["api_key"] = None
    # Per-route user_config: edit `version` here (a version id; `ref`, an alias, is resolved by each replica) and
    # `serve deploy` again to hot-swap (reconfigure, no replica restart); the builder's user_config is the same.
    deployments = [{"name": f"model_{route.replace('/', '_')}",
                    "user_config": {"version": e["version"], "ref": e.get("ref"),
                                    "batching": (e.get("options") or {}).get("batching") or {}}}
                   for route, e in args["endpoints"].items() if "version" in e and not e.get("inline")]
    return {"proxy_location": "EveryNode",
            "http_options": {"host": str(d["host"]), "port": int(d["port"])},
            "applications": [{"name": d.get("app_name", "ecomray"), "route_prefix": d.get("route_prefix", "/"),
                              "import_path": "serve.app:build_app", "args": {"app": args},
                              "deployments": deployments}]}


def start(plain: dict[str, Any]) -> dict[str, Any]:
    """Start Ray (when needed) and Serve, deploy the app; returns {"url", "models", "mode", "started_ray"}."""
    import httpx
    import ray
    from ray import serve

    from ecomray.runtime import init_ray
    from serve.app import build_app
    from serve.settings import api_key, app_args, apply_env, check_bind, free_port, throughput_env

    d, sc = plain["deploy"], plain.get("serve") or {}
    host = str(d["host"])
    key = api_key(d)
    check_bind(host, key)
    started_ray = not ray.is_initialized()
    if started_ray and not os.environ.get("RAY_ADDRESS"):
        env, mode = throughput_env(bool(sc.get("throughput_optimized", True)), bool(sc.get("ha_proxy", True)))
        apply_env(env)                          # before Ray starts: its workers inherit the environment
    else:
        mode = "as the running Ray cluster was started"
    init_ray(num_cpus=d.get("ray_num_cpus"))
    port = int(d["port"]) or free_port(host)
    serve.start(http_options={"host": host, "port": port})
    args = app_args(plain)
    args["api_key"] = key
    t0 = time.perf_counter()
    serve.run(build_app({"app": args}), name=d.get("app_name", "ecomray"), route_prefix=d.get("route_prefix", "/"))
    prefix = str(d.get("route_prefix", "/")).rstrip("/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{prefix}"
    headers = {"X-API-Key": key} if key else {}
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()
    print(f"[deploy] serving at {url} ({mode}; {time.perf_counter() - t0:.1f}s to deploy); docs at {url}/docs",
          flush=True)
    for m in models.get("loaded", []):
        print(f"[deploy]   POST /v1/{m['route']:<18s} {m['name']} {m['version']} (aliases {m.get('aliases') or '-'})",
              flush=True)
    for route, why in models.get("unavailable", {}).items():
        print(f"[deploy]   POST /v1/{route:<18s} not deployed: {why}", flush=True)
    return {"url": url, "models": models, "mode": mode, "started_ray": started_ray, "headers": headers}


def stop(started_ray: bool, app_name: str = "ecomray") -> None:
    """Take the app down. A Ray this job started goes down whole (Serve, HAProxy and replicas with it: measured
    2 s, where `serve.shutdown()` in throughput mode waits 30 s for its controller); on a cluster that was already
    running only this app is deleted."""
    import ray
    from ray import serve

    if started_ray:
        ray.shutdown()
    else:
        serve.delete(app_name)


def _one_request(plain: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """POST the first deployed route's first stored example (or `deploy.request`), print the answer."""
    import httpx

    examples = httpx.get(f"{info['url']}/v1/examples", headers=info["headers"], timeout=30).json()
    route = next((r for r in examples if examples[r]), None)
    if route is None:
        print("[deploy] no deployed route has an example request; skipping it", flush=True)
        return {}
    req = {**examples[route][0], **(plain["deploy"].get("request") or {})}
    r = httpx.post(f"{info['url']}/v1/{route}", json=req, headers=info["headers"], timeout=30)
    out = r.json()
    print(f"[deploy] POST /v1/{route} {json.dumps(req, ensure_ascii=False)} -> {r.status_code}\n"
          f"{json.dumps(out, indent=2, ensure_ascii=False)}", flush=True)
    return out


def run(cfg: DictConfig | dict) -> dict[str, Any]:
    plain = to_plain(cfg)
    d = plain["deploy"]
    if d.get("write_config"):
        import yaml

        path = os.path.abspath(str(d["write_config"]))
        with open(path, "w") as fh:
            yaml.safe_dump(serve_config(plain), fh, sort_keys=False)
        print(f"[deploy] wrote {path}: serve deploy {path} -a http://HEAD:8265", flush=True)
        return {"config": path}
    info = start(plain)
    try:
        if d.get("once"):
            return {"url": info["url"], "models": info["models"], "response": _one_request(plain, info)}
        print("[deploy] Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[deploy] shutting down", flush=True)
        return {"url": info["url"], "models": info["models"]}
    finally:
        stop(info["started_ray"], d.get("app_name", "ecomray"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="deploy")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
