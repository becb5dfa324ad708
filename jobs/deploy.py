"""python -m jobs.deploy experiment=<name>: serve registry models with Ray Serve (serve/app.py).

    python -m jobs.deploy experiment=tiny                         # 127.0.0.1:8000, blocks; Ctrl-C shuts down
    python -m jobs.deploy experiment=tiny deploy.once=true        # deploy, answer one request, shut down
    python -m jobs.deploy experiment=tiny deploy.write_config=serve_config.yaml serve=cluster   # for serve deploy
    python -m jobs.deploy experiment=tiny deploy.rollout=true     # re-resolve refs (a promotion) on the running app

One Ctrl-C (or SIGTERM) stops everything this job started, in seconds: the app, the Ray it started, and any
HAProxy that Ray started, with its temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from typing import Any

import hydra
from omegaconf import DictConfig

from ecomray.runtime import UserError, to_plain, user_errors


def serve_config(plain: dict[str, Any], ignored: list[str] | None = None) -> dict[str, Any]:
    """A Serve config file (`serve deploy`) for this app, every route pinned to the exact version resolved now. The
    API key is never written: the ingress reads ECOMRAY_API_KEY from its environment (set it on the nodes or in
    the runtime_env)."""
    d = plain["deploy"]
    check_port(d)
    args = checked_app_args(plain, ignored)
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


def checked_app_args(plain: dict[str, Any], ignored: list[str] | None = None) -> dict[str, Any]:
    """`serve.settings.app_args`, refused when no route has a model (an app that would answer only 503s).

    `ignored`: command-line overrides of `task.serve` (`main` passes them). A route's batching and limits come from
    the `task.serve` saved with its model version (what it was trained with), so such an override changes nothing:
    the job says so and names the knob that does, `serve.routes.<route>`."""
    from serve.settings import app_args

    args = app_args(plain)
    endpoints = args.get("endpoints") or {}
    if not any("version" in e for e in endpoints.values()):
        why = "; ".join(f"/v1/{r}: {e.get('unavailable')}" for r, e in endpoints.items())
        raise UserError(f"nothing to serve: no route has a model ({why or 'no routes configured'}) in the registry "
                        f"{args['registry']} (paths.root, or the ECOMRAY_HOME environment variable); train one "
                        f"(`python -m jobs.train experiment=<name>`) or choose registered models with "
                        f"deploy.endpoints={{<route>: {{model: <name>}}}}")
    extra = sorted(set(((plain.get("serve") or {}).get("routes") or {})) - set(endpoints))
    if extra:        # a typo (`recomend`) was ignored without a word
        print(f"[deploy] note: serve.routes names {extra}, which this app does not serve (its routes: "
              f"{sorted(endpoints)}): those settings change nothing", flush=True)
    for route, e in endpoints.items():
        ongoing = (e.get("deployment") or {}).get("max_ongoing_requests")
        batch = ((e.get("options") or {}).get("batching") or {}).get("max_batch_size")
        if not e.get("inline") and isinstance(ongoing, int) and isinstance(batch, int) and ongoing < batch:
            print(f"[deploy] note: /v1/{route} has max_ongoing_requests={ongoing} below batching.max_batch_size="
                  f"{batch}: a replica never holds more than {ongoing} requests, so no batch grows past {ongoing}",
                  flush=True)
    for route, e in endpoints.items():      # (promote warned; deploying one said nothing)
        if e.get("research_only"):
            print(f"WARNING: /v1/{route} serves {e['model']} {e['version']}, trained on research-only data: do not "
                  f"serve it to customers or use it commercially", file=sys.stderr, flush=True)
    if ignored:
        route = next(iter(endpoints))
        print(f"[deploy] note: {' '.join(ignored)} changes nothing here: each route serves with the task.serve saved "
              f"with its model version; deploy-time batching and limits go in serve.routes.<route>, e.g. "
              f"'serve.routes={{{route}: {{batching: {{max_batch_size: 64}}}}}}'", flush=True)
    return args


def task_serve_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides (`HydraConfig.get().overrides.task`) that set `task.serve` or a key below it."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".")[:2] == ["task", "serve"]]


def start(plain: dict[str, Any], ignored: list[str] | None = None) -> dict[str, Any]:
    """Start Ray (when needed) and Serve, deploy the app; returns {"url", "models", "mode", "started_ray"}."""
    import httpx
    import ray
    from ray import serve

    from ecomray.runtime import init_ray
    from serve.app import build_app
    from ecomray.runtime import alive_nodes, ray_started_here
    from serve.settings import (api_key, apply_env, check_bind, client_url, free_port, is_loopback,
                                placement_problems, replica_demand, throughput_env)

    d, sc = plain["deploy"], plain.get("serve") or {}
    host = str(d["host"])
    check_port(d)
    key = api_key(d)
    check_bind(host, key)
    args = checked_app_args(plain, ignored)   # reads the registry only: what would be served is known before Ray starts
    started_ray = not ray.is_initialized()
    if started_ray and not os.environ.get("RAY_ADDRESS") and int(d["port"]):
        taken = _port_taken(host, int(d["port"]))   # Serve's proxy would fail to bind, after Ray started (a traceback)
        if taken:
            raise UserError(f"deploy.port={int(d['port'])} on {host} is in use ({taken}): stop what listens there, "
                            f"or pass deploy.port=<another port> (0: any free one)")
    env: dict[str, str] = {}
    if started_ray and not os.environ.get("RAY_ADDRESS"):
        env, mode = throughput_env(sc, host)
        apply_env(env)                          # before Ray starts: its workers inherit the environment
    else:
        mode = "as the running Ray cluster was started"
    init_ray(num_cpus=d.get("ray_num_cpus"), verbose=bool(plain.get("verbose")),
             dashboard=(plain.get("ray") or {}).get("include_dashboard"), **({"_node_ip_address": "127.0.0.1"} if started_ray and not
                                                 os.environ.get("RAY_ADDRESS") and is_loopback(host) else {}))
    problems = placement_problems(replica_demand(args), alive_nodes())
    if problems:
        why = "; ".join(problems)
        if not ray_started_here():   # a cluster: it may add nodes (autoscaling)
            print(f"[deploy] waiting: {why}; an autoscaling cluster adds nodes, otherwise stop (Ctrl-C) and "
                  f"choose another serve config", flush=True)
        else:
            if env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE"):
                shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)
            ray.shutdown()
            raise UserError(f"this machine's Ray cannot hold the app: {why}. Choose settings that fit (serve=local, "
                            f"or serve.routes / serve.common.ray_actor_options / num_replicas), or connect to a "
                            f"cluster with RAY_ADDRESS")
    port = int(d["port"]) or free_port(host)
    port = _start_serve(host, port, str((plain.get("serve") or {}).get("log_level") or "INFO").upper())
    args["api_key"] = key
    t0 = time.perf_counter()
    serve.run(build_app({"app": args}), name=d.get("app_name", "ecomray"), route_prefix=d.get("route_prefix", "/"))
    logging.getLogger("ray.serve").setLevel(str((plain.get("serve") or {}).get("log_level") or "INFO").upper())
    prefix = str(d.get("route_prefix", "/")).rstrip("/")
    url = client_url(host, port, prefix)
    headers = {"X-API-Key": key} if key else {}
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()
    print(f"[deploy] serving at {url} ({mode}; {time.perf_counter() - t0:.1f}s to deploy); docs at {url}/docs",
          flush=True)
    for m in models.get("loaded", []):
        print(f"[deploy]   POST /v1/{m['route']:<18s} {m['name']} {m['version']} (aliases {m.get('aliases') or '-'})",
              flush=True)
    for route, why in models.get("unavailable", {}).items():
        print(f"[deploy]   POST /v1/{route:<18s} not deployed: {why}", flush=True)
    return {"url": url, "models": models, "mode": mode, "started_ray": started_ray, "headers": headers,
            "haproxy_dir": env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")}


def _start_serve(host: str, port: int, log_level: str = "INFO") -> int:
    """Start Serve's HTTP proxy on host:port, or, when Serve already runs in this Ray (another app), use its port
    and say so: Serve applies http_options only when it starts."""
    from ray import serve

    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
    except Exception:  # noqa: BLE001 - no Serve running
        client = None
    if client is not None:
        running = client.http_config
        if (running.host, running.port) != (host, port):
            print(f"[deploy] Serve already runs here on {running.host}:{running.port}; the app joins it "
                  f"(deploy.host/port apply only when Serve starts)", flush=True)
        return int(running.port)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": log_level})
    # serve.run then says 'Connecting to existing Serve app ... New http_options will not be applied' about the
    # Serve just started here with these very options: a line that reads as if deploy.host/port were dropped
    logging.getLogger("ray.serve").addFilter(
        lambda record: not record.getMessage().startswith("Connecting to existing Serve app"))
    return port


def stop(started_ray: bool, app_name: str = "ecomray", haproxy_dir: str | None = None) -> None:
    """Take the app down. A Ray this job started goes down whole (Serve, HAProxy and replicas with it: measured
    2 s, where `serve.shutdown()` in throughput mode waits 30 s for its controller); on a cluster that was already
    running only this app is deleted. An HAProxy that Ray started from this job's folder never outlives it."""
    import ray
    from ray import serve

    if started_ray:
        ray.shutdown()
    else:
        serve.delete(app_name)
    if haproxy_dir:
        _kill_haproxy(haproxy_dir)
        shutil.rmtree(haproxy_dir, ignore_errors=True)


def _kill_haproxy(folder: str) -> None:
    """SIGTERM, then SIGKILL, every HAProxy process whose command line names this job's config folder."""
    victims = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
        except OSError:
            continue
        if "haproxy" in cmd and folder in cmd:
            victims.append(int(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGTERM and victims:
            time.sleep(0.5)


def check_port(d: dict[str, Any]) -> None:
    try:
        port_ok = not isinstance(d.get("port"), bool) and 0 <= int(d.get("port")) <= 65535  # "8080" from ${oc.env:}
    except (TypeError, ValueError):
        port_ok = False
    if not port_ok:
        raise UserError(f"deploy.port={d.get('port')!r}: a TCP port, 0-65535 (0: a free one)")


def _port_taken(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on now, or None when it can."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"the host does not resolve: {err}"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as err:
            return err.strerror or str(err)
    return None


def rollout(plain: dict[str, Any], ignored: list[str] | None = None) -> dict[str, Any]:
    """Re-resolve every route's ref (a promotion moved `prod`, say) and roll the running app onto the versions:
    Serve replaces the changed deployments' replicas one by one (requests keep being answered), and every new
    replica loads exactly the resolved version. Connects to RAY_ADDRESS, else to the Ray running on this machine."""
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.settings import api_key

    d = plain["deploy"]
    args = checked_app_args(plain, ignored)     # (before connecting: a bad version is refused without a cluster)
    args["api_key"] = api_key(d)
    bad = {route: e["unavailable"] for route, e in args["endpoints"].items() if "unavailable" in e}
    if bad:   # rolled out, such a route would fail to deploy and answer 503 from then on
        raise UserError("rollout refused, the running app is unchanged: " + "; ".join(
            f"/v1/{route}: {why}" for route, why in bad.items()))
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as err:
            raise UserError(f"deploy.rollout: no running Ray at {address} ({str(err).splitlines()[0][:160]}); "
                            f"deploy the app first (python -m jobs.deploy ...), or set RAY_ADDRESS") from None
    name = d.get("app_name", "ecomray")
    if name not in serve.status().applications:
        raise UserError(f"no running Serve app {name!r} to roll out to (deploy it first: python -m jobs.deploy ...)")
    for route, e in args["endpoints"].items():
        print(f"[deploy] rollout /v1/{route}: {e['model']} -> {e.get('version', 'unavailable')}", flush=True)
    serve.run(build_app({"app": args}), name=name, route_prefix=d.get("route_prefix", "/"))
    return {"app": name, "endpoints": {r: e.get("version") for r, e in args["endpoints"].items()}}


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
    print(f"[deploy] POST /v1/{route} {json.dumps(req, ensure_ascii=False)} -> {r.status_code}", flush=True)
    for key, value in (out.items() if isinstance(out, dict) else [("body", out)]):   # one line per field
        print(f"  {key}: {json.dumps(value, ensure_ascii=False)}", flush=True)
    if r.status_code >= 400:    # a smoke test (the pipeline's last stage) must not pass on an error answer
        raise UserError(f"the sample request POST /v1/{route} answered {r.status_code} (above); the app was stopped")
    return out


def run(cfg: DictConfig | dict, overrides: list[str] | None = None) -> dict[str, Any]:
    """`overrides`: the command line's (for the note on `task.serve` overrides, which do not apply here)."""
    plain = to_plain(cfg)
    ignored = task_serve_overrides(overrides or [])
    d = plain["deploy"]
    if d.get("write_config"):
        import yaml

        path = os.path.abspath(str(d["write_config"]))
        with open(path, "w") as fh:
            yaml.safe_dump(serve_config(plain, ignored), fh, sort_keys=False)
        print(f"[deploy] wrote {path}: serve deploy {path} -a http://HEAD:8265", flush=True)
        return {"config": path}
    if d.get("rollout"):
        return rollout(plain, ignored)
    info = start(plain, ignored)
    try:
        if d.get("once"):
            return {"url": info["url"], "models": info["models"], "response": _one_request(plain, info)}
        # Our own handlers: libraries that ran earlier in this process (Tune, in the pipeline) may have left theirs
        # on SIGINT, and Ray's SIGTERM handler dumps a stack. One Ctrl-C or SIGTERM stops everything, cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        print("[deploy] Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[deploy] shutting down", flush=True)
        return {"url": info["url"], "models": info["models"]}
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)          # a second Ctrl-C must not cut the shutdown short
        stop(info["started_ray"], d.get("app_name", "ecomray"), info.get("haproxy_dir"))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@hydra.main(version_base="1.3", config_path="../conf", config_name="deploy")
@user_errors
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
