"""One pure-ASGI middleware in front of the FastAPI app: API key, body size cap, a deadline on reading the body, a
catch-all for errors, one request log line and the Prometheus metrics of every request.

Pure ASGI rather than Starlette's BaseHTTPMiddleware so that the body cap and the deadline see the streamed body
(a chunked request has no Content-Length) and nothing is buffered twice. The whole body is read here, before the
app sees it: a client that sends its headers and then stalls holds one ingress slot for at most
`body_timeout_s`, then gets a 408 (Ray Serve's proxy bounds only whole requests and keep-alive, not the body).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

# Serve routes the "ray.serve" logger of a replica to its log file (and the driver console); ours rides along.
logger = logging.getLogger("ray.serve")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Routes that never need the key: a load balancer's health probe carries none and learns nothing from it; the
# playground page (and `/`, its redirect) is a static page a browser opens without custom headers; its API calls
# carry the key the user types in. The API reference (Swagger UI, its assets, the OpenAPI document) is open too
# when `docs_without_key` (serve.docs_without_key): it names the routes and the model versions.
OPEN_PATHS = frozenset({"/healthz", "/playground", "/"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json"})
DOCS_PREFIXES = ("/static-offline-docs/",)
MODEL_HEADER = b"x-model-version"


def _printable(text: str, limit: int) -> str:
    """A client's text as one log line shows it: escaped (a newline in a percent-decoded path forged a second
    request line) and cut."""
    return text.encode("unicode_escape").decode("ascii")[:limit]


def _charset(content_type: bytes) -> str | None:
    """The charset parameter of a Content-Type header, lower-cased and unquoted (None when it has none)."""
    for param in content_type.decode("latin-1").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"').strip().lower()
    return None


@dataclass
class GuardSettings:
    api_key: str | None = None        # None: no key required (loopback bind)
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 10.0      # the whole body must arrive within this long after the headers
    log_requests: bool = True
    metrics: bool = True              # per-route, per-model-version Prometheus metrics (ray.serve.metrics)
    routes: frozenset[str] = field(default_factory=frozenset)   # paths with their own metric label
    docs_without_key: bool = True     # /docs, /openapi.json and Swagger's assets open without the key


class _Metrics:
    """Request count and latency per route, model version and status, through Ray Serve's custom metrics: every
    replica exports them on its node's metrics port and Prometheus sums the replicas. Created lazily, inside the
    replica (the metrics need a running Ray worker)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("ecomray_requests", "HTTP requests answered by the ecomray app",
                                        tag_keys=("route", "status", "model_version"))
        self.latency = metrics.Histogram("ecomray_request_latency_ms", "request latency in the ingress (ms)",
                                         boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
                                         tag_keys=("route", "model_version"))

    def record(self, route: str, status: int, version: str, ms: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status), "model_version": version})
        self.latency.observe(ms, tags={"route": route, "model_version": version})


async def _json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": raw})


class Guard:
    """ASGI middleware; `settings` is read on every request."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: GuardSettings) -> None:
        self.app, self.settings = app, settings
        self._metrics: _Metrics | None | bool = None

    def _record(self, route: str, status: int, version: str, ms: float) -> None:
        if not self.settings.metrics or self._metrics is False:
            return
        try:
            if self._metrics is None:
                self._metrics = _Metrics()
            self._metrics.record(route, status, version, ms)          # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - outside a replica (unit tests) there is no metrics agent
            self._metrics = False

    def _open(self, path: str) -> bool:
        if path in OPEN_PATHS:
            return True
        return self.settings.docs_without_key and (path in DOCS_PATHS or path.startswith(DOCS_PREFIXES))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = {"status": 500, "version": "-", "started": False}

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                for k, v in message.get("headers", []):
                    if k.lower() == MODEL_HEADER:
                        state["version"] = v.decode("latin-1")
            await send(message)

        try:
            await self._handle(scope, receive, send_logged, state)
        except Exception:  # noqa: BLE001 - the last line of defence: one traceback, then a proper JSON 500
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                await _json(send_logged, 500, {"detail": "internal error; the server log has the details"})
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            path, root = str(scope.get("path", "")), str(scope.get("root_path", "") or "")
            path = path[len(root):] if root and path.startswith(root) else path
            route = path if path in self.settings.routes else "other"
            self._record(route, int(state["status"]), str(state["version"]), ms)
            if self.settings.log_requests:
                logger.info("request route=%s %s status=%s latency_ms=%.2f model_version=%s", scope.get("method"),
                            route if route != "other" else _printable(path, 80), state["status"], ms,
                            state["version"])

    async def _handle(self, scope: Scope, receive: Receive, send: Send, state: dict[str, Any]) -> None:
        s = self.settings
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path, root = str(scope.get("path", "")), str(scope.get("root_path", "") or "")
        relative = path[len(root):] if root and path.startswith(root) else path
        if s.api_key and not self._open(relative):
            given = headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(given, s.api_key.encode()):
                await _json(send, 401, {"detail": "missing or wrong API key: send it in the X-API-Key header"},
                            [(b"www-authenticate", b"X-API-Key")])
                return
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        carries_body = headers.get(b"content-length", b"0").strip() not in (b"0", b"") or b"transfer-encoding" in headers
        if encoding not in (b"", b"identity") and carries_body:   # a gzip body read as JSON: "error parsing the body"
            await _json(send, 415, {"detail": f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not "
                                              f"accepted: send the body uncompressed (it is at most "
                                              f"{int(s.max_body_bytes)} bytes)"})
            return
        charset = _charset(headers.get(b"content-type", b""))
        if charset not in (None, "utf-8", "utf8", "us-ascii", "ascii") and carries_body:   # read as UTF-8 regardless
            await _json(send, 415, {"detail": f"Content-Type charset {charset[:40]!r} is not accepted: send the "
                                              f"body as UTF-8 JSON"})
            return
        cap = int(s.max_body_bytes)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _json(send, 400, {"detail": "invalid Content-Length header"})
                return
            if declared > cap:
                await _json(send, 413, {"detail": f"request body of {declared} bytes is over the {cap}-byte limit"})
                return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS") and length is None:
            await self.app(scope, receive, send)
            return
        # Read the whole body (bounded by the cap and the deadline) before the app sees it.
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + float(s.body_timeout_s)
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                await _json(send, 408, {"detail": f"the request body did not arrive within {s.body_timeout_s:g}s"},
                            [(b"connection", b"close")])
                return
            if message["type"] == "http.disconnect":
                state["status"] = 499           # the client went away mid-upload: no answer, and not a 500
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await _json(send, 413, {"detail": f"request body is over the {cap}-byte limit"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
