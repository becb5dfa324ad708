"""The ecomray Serve application: a FastAPI ingress and one model deployment per route, generated from the
table of deployed endpoints (`deploy.endpoints`, resolved by `serve.settings.app_args`).

    serve build serve.app:build_app experiment=tiny -o serve_config.yaml    # Hydra overrides as builder args
    serve deploy serve_config.yaml -a http://HEAD:8265
    python -m jobs.deploy experiment=tiny                                    # the same app, locally

Routes (OpenAPI at /docs): POST /v1/<route> for each endpoint (its request and response models come from its
family's task module), GET /v1/models, GET /healthz. An endpoint whose model is not in the registry answers 503
saying why.

Topology: ingress -> DeploymentHandle -> model replicas (`serve/endpoint.py`), so each route scales, batches and
gets GPUs on its own; an endpoint with `inline: true` is served inside the ingress instead (one hop less).
"""

import logging
import os
from importlib import import_module
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ecomray import registry, serving
from serve import schemas
from serve.endpoint import ModelDeployment, ModelServer, replica_versions
from serve.middleware import DOCS_PATHS, MODEL_HEADER, OPEN_PATHS, Guard, GuardSettings
from serve.settings import DEPLOYMENT_KEYS, api_key, app_args, check_bind

logger = logging.getLogger("ray.serve")

# Exceptions a handle call raises when the replica it was routed to died or is going away: the ingress retries
# those once (Serve routes the retry to a live replica) before answering 503.
_RETRYABLE: tuple[type[BaseException], ...]
try:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    _RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError, ReplicaUnavailableError)
except ImportError:  # pragma: no cover - older Ray
    from ray.exceptions import RayActorError

    _RETRYABLE = (RayActorError,)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "a bad Content-Length header"},
    401: {"description": "missing or wrong X-API-Key (when the server has a key)"},
    408: {"description": "the body did not arrive within serve.body_timeout_s"},
    413: {"description": "body over serve.max_body_bytes"},
    415: {"description": "a compressed body (Content-Encoding), or a charset other than UTF-8"},
    422: {"description": "malformed JSON (or a body that is not UTF-8), or a field is missing, has the wrong type, "
                         "or a value the model can't take"},
    503: {"description": "the route's model is not available (not in the registry, overloaded, replica lost)"},
}


PLAYGROUND = (Path(__file__).parent / "playground.html").read_text()


class Unavailable(Exception):
    def __init__(self, route: str, why: str) -> None:
        super().__init__(why)
        self.route, self.why = route, why


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    """Validates requests against each route's schema and the edge checks, sends them to the route's model (a
    handle, or in-process), shapes the response. The FastAPI app is built per replica from the endpoint table."""

    def __init__(self, handles: dict[str, DeploymentHandle] | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        s = dict(settings or {})
        self.endpoints: dict[str, dict[str, Any]] = dict(s.get("endpoints") or {})
        self.retries = int(s.get("retries", 1))
        host = str(s.get("host", "127.0.0.1"))
        key = s.get("api_key") or os.environ.get("ECOMRAY_API_KEY") or None
        check_bind(host, key)          # never serve a non-loopback address without a key
        self.guard = GuardSettings(api_key=key, max_body_bytes=int(s.get("max_body_bytes", 1 << 20)),
                                   body_timeout_s=float(s.get("body_timeout_s", 10.0)),
                                   log_requests=bool(s.get("log_requests", True)),
                                   metrics=bool(s.get("metrics", True)),
                                   docs_without_key=bool(s.get("docs_without_key", True)),
                                   routes=frozenset(f"/v1/{r}" for r in self.endpoints))
        self.backends: dict[str, Any] = dict(handles or {})
        for route, e in self.endpoints.items():
            if e.get("inline") and "version" in e:
                self.backends[route] = ModelServer(s["registry"], e["model"], e["version"], route, e["options"])
        self.registry = s.get("registry")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self)

    async def call(self, route: str, method: str, *args: Any) -> Any:
        backend = self.backends.get(route)
        if backend is None:
            why = self.endpoints.get(route, {}).get("unavailable", "no model configured for this route")
            raise Unavailable(route, why)
        if isinstance(backend, ModelServer):          # inline: in this process
            fn = backend if method == "__call__" else getattr(backend, method)
            out = fn(*args)
            return await out if hasattr(out, "__await__") else out
        for attempt in range(self.retries + 1):
            try:
                target = backend if method == "__call__" else getattr(backend, method)
                return await target.remote(*args)
            except BackPressureError as err:   # the route's queue is full (max_queued_requests): shed load
                raise Unavailable(route, "overloaded; retry shortly") from err
            except _RETRYABLE as err:
                if attempt == self.retries:
                    raise Unavailable(route, f"replica failure ({type(err).__name__}); retry shortly") from err
                logger.warning("[%s] replica failure (%s); retrying once", route, type(err).__name__)
        raise AssertionError("unreachable")


def _route_handler(ingress: Ingress, route: str, request_model: type) -> Any:
    """The POST handler of one route: pydantic has validated the body against the family's schema; the edge checks
    (valid Unicode, finite numbers in range) run on every value; then the model answers."""

    async def handler(req: request_model) -> JSONResponse:  # type: ignore[valid-type]
        body = req.model_dump(by_alias=True)
        bad = serving.edge_errors(body)
        if bad:
            return JSONResponse({"detail": serving.clean_details(bad)}, status_code=422)
        out = await ingress.call(route, "__call__", body)
        if out["status"] != 200:
            detail = out["detail"]
            return JSONResponse({"detail": serving.clean_details(detail) if isinstance(detail, list) else detail},
                                status_code=int(out["status"]))
        model = out["body"].get("model") or {}
        return JSONResponse(out["body"], headers={MODEL_HEADER.decode(): f"{model.get('name')}:{model.get('version')}"})

    handler.__name__ = f"post_{route.replace('/', '_').replace('-', '_')}"
    return handler


def _unavailable_handler(route: str, why: str) -> Any:
    async def handler() -> JSONResponse:
        raise Unavailable(route, why)

    handler.__name__ = f"post_{route.replace('/', '_').replace('-', '_')}"
    return handler


def _declare_api_key(app: FastAPI) -> None:
    """The OpenAPI document says every route but the open ones takes `X-API-Key` (the Guard checks it), so
    Swagger UI's Authorize button sends it with "Try it out"."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            for path, ops in schema.get("paths", {}).items():
                if path not in OPEN_PATHS and path not in DOCS_PATHS:
                    for op in ops.values():
                        op["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_fastapi(ingress: Ingress) -> FastAPI:
    # FastAPIOffline: /docs loads Swagger UI's assets from this server, not a CDN (it works without internet).
    app = FastAPIOffline(title="ecomray", version="1", redoc_url=None,
                         description="Models from the ecomray registry: " + ", ".join(
                             f"POST /v1/{r} ({e.get('model')} {e.get('version', 'unavailable')})"
                             for r, e in ingress.endpoints.items()))
    app.add_middleware(Guard, settings=ingress.guard)
    if ingress.guard.api_key:
        _declare_api_key(app)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's default, minus the echoed input, with every location part clipped. Values no model can take
        # (a lone surrogate, a number out of range) are named by the edge checks first: pydantic would report
        # them once per member of a union type, at locations that end in the member's name.
        # (in a thread: a body of up to max_body_bytes of arbitrary JSON takes a walk of some 0.1 s that the event
        # loop, and every other request, would otherwise wait on)
        bad = await run_in_threadpool(serving.edge_errors, err.body) if isinstance(err.body, (dict, list)) else []
        return JSONResponse({"detail": serving.clean_details(bad or list(err.errors()))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers a body its JSON parser gives up on with a bare 400 "There was an error parsing the body";
        # malformed JSON is a 422 json_invalid: so are these, saying why
        why = {RecursionError: "JSON nested deeper than the parser allows",
               UnicodeDecodeError: "the body is not UTF-8 text"}.get(type(err.__cause__))
        if why is None and isinstance(err.__cause__, ValueError) and "digits" in str(err.__cause__):
            why = "an integer with more digits than the parser allows (4300)"
        if err.status_code == 400 and why:
            return JSONResponse({"detail": [{"loc": ["body"], "msg": why, "type": "json_invalid"}]}, status_code=422)
        return await http_exception_handler(request, err)

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, err: Unavailable) -> JSONResponse:
        return JSONResponse({"detail": f"{err.route} is not available: {err.why}"}, status_code=503,
                            headers={"retry-after": "5"})

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, err: Exception) -> JSONResponse:
        # A JSON body; Starlette re-raises after this, and the Guard logs the traceback, once.
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)

    for route, e in ingress.endpoints.items():
        if "version" not in e:
            app.post(f"/v1/{route}", responses=ERROR_RESPONSES, summary=f"{route} (not available)")(
                _unavailable_handler(route, e.get("unavailable", "not available")))
            continue
        meta = registry.load(ingress.registry, e["model"], e["version"], state=False)["meta"]
        request_model, response_model = import_module(e["module"]).api(meta, (e["options"] or {}).get("limits") or {})
        app.post(f"/v1/{route}", response_model=response_model, responses=ERROR_RESPONSES,
                 summary=f"{route}: {e['model']} {e['version']}")(_route_handler(ingress, route, request_model))

    @app.get("/v1/models", response_model=schemas.ModelsResponse)
    async def models() -> dict[str, Any]:
        """Each route's model (as one replica describes it) and every replica's loaded version."""
        loaded, unavailable = [], {}
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - outside a replica
            app_name = None
        for route, e in ingress.endpoints.items():
            try:
                info = await ingress.call(route, "describe")
            except Unavailable as err:
                unavailable[route] = err.why
                continue
            if app_name and not e.get("inline"):
                info["replicas"] = replica_versions(app_name, route)
            loaded.append(info)
        return {"loaded": loaded, "unavailable": unavailable}

    @app.get("/v1/examples", include_in_schema=False)
    async def examples() -> dict[str, Any]:
        out = {}
        for route in ingress.endpoints:
            try:
                out[route] = await ingress.call(route, "examples")
            except Unavailable:
                continue
        return out

    @app.get("/playground", include_in_schema=False)
    async def playground() -> HTMLResponse:
        """One panel per route: pick a sample request (stored in the model version), send it, see the answer."""
        return HTMLResponse(PLAYGROUND)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{request.scope.get('root_path', '')}/playground")

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz() -> JSONResponse:
        """200 when every available route's model answers; 503 otherwise. Unavailable routes are listed."""
        routes, ok = {}, True
        for route, e in ingress.endpoints.items():
            if "version" not in e:
                routes[route] = "not deployed"
                continue
            try:
                await ingress.call(route, "check_health")
                routes[route] = "ok"
            except Exception as err:  # noqa: BLE001 - a health probe reports, it does not raise
                routes[route], ok = f"unhealthy: {type(err).__name__}", False
        return JSONResponse({"status": "ok" if ok else "degraded", "routes": routes},
                            status_code=200 if ok else 503)

    # HEAD too (load balancers probe with it), outside the OpenAPI contract (a body-less twin of GET)
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    return app


def _deployment_options(options: dict[str, Any], log_level: str = "INFO") -> dict[str, Any]:
    """Serve options from a route's (or the ingress's) settings; a fixed `num_replicas` wins over autoscaling.
    Serve's own access log is off: the ingress's Guard writes one line per request (with the model version)."""
    opts = {k: v for k, v in options.items() if k not in ("num_replicas", "autoscaling_config") and v is not None}
    opts["logging_config"] = {"enable_access_log": False, "log_level": log_level}
    n = options.get("num_replicas")
    if n not in (None, "auto"):
        opts["num_replicas"] = int(n)
    elif options.get("autoscaling_config"):
        opts["autoscaling_config"] = dict(options["autoscaling_config"])
    return opts


def build_app(args: dict[str, Any]) -> Application:
    """The app builder for `serve run/build/deploy serve.app:build_app`.

    `args` is either `{"app": <serve.settings.app_args(...)>}` (what `jobs.deploy` and a written serve config
    pass) or Hydra overrides of `conf/deploy.yaml` as strings (`serve build serve.app:build_app experiment=tiny`).
    """
    if "app" in args:
        a = dict(args["app"])
    else:
        from ecomray.config import compose

        a = app_args(compose("deploy", [f"{k}={v}" for k, v in args.items()]))
    serve_cfg = a.get("serve") or {}
    log_level = str(serve_cfg.get("log_level") or "INFO").upper()
    key = a.get("api_key") or api_key({})
    check_bind(a.get("host", "127.0.0.1"), key)
    handles: dict[str, Any] = {}
    for route, e in (a.get("endpoints") or {}).items():
        if "version" not in e:
            logger.warning("[%s] not deployed: %s", route, e.get("unavailable"))
            continue
        registry._safe(a["registry"], e["model"], e["version"])        # never a name outside the registry root
        if e.get("inline"):
            continue
        # The version is an init argument and the user_config: a replica that starts late (autoscaling, a restart)
        # loads exactly the version the app was deployed with. Changing only user_config (a serve config's
        # `version`, or batching) is a light update: live replicas reconfigure() and swap in place.
        dep = ModelDeployment.options(name=f"model_{route.replace('/', '_')}",
                                      user_config={"version": e["version"], "ref": e.get("ref"),
                                                   "batching": (e["options"] or {}).get("batching") or {}},
                                      **_deployment_options(e.get("deployment") or {}, log_level))
        handles[route] = dep.bind(a["registry"], e["model"], e["version"], route, e["options"])
        logger.info("[%s] serving %s %s", route, e["model"], e["version"])
    ingress_cfg = serve_cfg.get("ingress") or {}
    settings = {"host": a.get("host", "127.0.0.1"), "api_key": a.get("api_key"), "registry": a["registry"],
                "endpoints": a.get("endpoints") or {}, "retries": int(ingress_cfg.get("retries", 1)),
                "max_body_bytes": int(serve_cfg.get("max_body_bytes", 1 << 20)),
                "body_timeout_s": float(serve_cfg.get("body_timeout_s", 10.0)),
                "log_requests": bool(serve_cfg.get("log_requests", True)),
                "metrics": bool(serve_cfg.get("metrics", True)),
                "docs_without_key": bool(serve_cfg.get("docs_without_key", True))}
    ingress_opts = {k: v for k, v in {**(serve_cfg.get("common") or {}), **ingress_cfg}.items()
                    if k in DEPLOYMENT_KEYS}
    return Ingress.options(**_deployment_options(ingress_opts, log_level)).bind(handles, settings)

