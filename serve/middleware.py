"""One pure-ASGI middleware in front of the FastAPI app: API key, body size cap, a catch-all for errors, and one
request log line (route, status, latency, model version) per request.

Pure ASGI rather than Starlette's BaseHTTPMiddleware so that the body cap sees the streamed body (a chunked
request has no Content-Length) and nothing is buffered twice.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

# Serve routes the "ray.serve" logger of a replica to its log file (and the driver console); ours rides along.
logger = logging.getLogger("ray.serve")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Routes that never need the key: a load balancer's health probe carries none and learns nothing from it.
OPEN_PATHS = frozenset({"/healthz"})
MODEL_HEADER = b"x-model-version"


@dataclass
class GuardSettings:
    api_key: str | None = None        # None: no key required (loopback bind)
    max_body_bytes: int = 1 << 20
    log_requests: bool = True


async def _json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": raw})


class Guard:
    """ASGI middleware; `settings` is read on every request, so the ingress can fill it in after construction."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: GuardSettings) -> None:
        self.app, self.settings = app, settings

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
            await self._handle(scope, receive, send_logged)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer a proper error, never a bare 500
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                await _json(send_logged, 500, {"detail": "internal error; the server log has the details"})
        finally:
            if self.settings.log_requests:
                logger.info("request route=%s %s status=%s latency_ms=%.2f model_version=%s", scope.get("method"),
                            scope.get("path"), state["status"], (time.perf_counter() - t0) * 1e3, state["version"])

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.settings
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if s.api_key and scope.get("path") not in OPEN_PATHS:
            given = headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(given, s.api_key.encode()):
                await _json(send, 401, {"detail": "missing or wrong API key: send it in the X-API-Key header"},
                            [(b"www-authenticate", b"X-API-Key")])
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
        # Read the whole body (bounded by the cap) before the app sees it: a chunked body has no length to check.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
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
