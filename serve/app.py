"""The ecomray Serve application: a FastAPI ingress composed with one deployment per model family.

    serve build serve.app:build_app experiment=tiny -o serve_config.yaml    # Hydra overrides as builder args
    serve deploy serve_config.yaml -a http://HEAD:8265
    python -m jobs.deploy experiment=tiny                                    # the same app, locally

Routes (OpenAPI at /docs): POST /v1/recommend, POST /v1/score/propensity, POST /v1/sentiment, GET /v1/models,
GET /healthz. A family whose model is not configured or not in the registry is not deployed: its route answers 503.
"""


import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ecomray import registry
from ecomray.runtime import UserError
from serve import schemas
from serve.families import FAMILY_CLASSES
from serve.middleware import MODEL_HEADER, Guard, GuardSettings
from serve.settings import FAMILIES, api_key, app_args, check_bind

logger = logging.getLogger("ray.serve")

GUARD = GuardSettings()
app = FastAPI(title="ecomray", version="1",
              description="Recommendations, purchase propensity and sentiment from the ecomray model registry.")
app.add_middleware(Guard, settings=GUARD)

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


@app.exception_handler(RequestValidationError)
async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
    # FastAPI's default, minus the echoed input (a huge bad body would be sent back whole).
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in err.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


@app.exception_handler(Exception)
async def _unhandled(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)


class _Unavailable(Exception):
    def __init__(self, family: str, why: str) -> None:
        super().__init__(why)
        self.family, self.why = family, why


@app.exception_handler(_Unavailable)
async def _unavailable(_: Request, err: _Unavailable) -> JSONResponse:
    return JSONResponse({"detail": f"{err.family} is not available: {err.why}"}, status_code=503,
                        headers={"retry-after": "5"})


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    """Validates requests (pydantic), routes them to the family deployments' handles, shapes the responses."""

    def __init__(self, recommend: DeploymentHandle | None = None, propensity: DeploymentHandle | None = None,
                 sentiment: DeploymentHandle | None = None, settings: dict[str, Any] | None = None) -> None:
        s = dict(settings or {})
        self.handles = {"recommend": recommend, "propensity": propensity, "sentiment": sentiment}
        self.unavailable: dict[str, str] = dict(s.get("unavailable") or {})
        self.limits = dict(s.get("limits") or {})
        self.retries = int(s.get("retries", 1))
        host = str(s.get("host", "127.0.0.1"))
        key = s.get("api_key") or os.environ.get("ECOMRAY_API_KEY") or None
        check_bind(host, key)          # never serve a non-loopback address without a key
        GUARD.api_key = key
        GUARD.max_body_bytes = int(s.get("max_body_bytes", 1 << 20))
        GUARD.log_requests = bool(s.get("log_requests", True))

    async def _call(self, family: str, method: str, *args: Any) -> dict[str, Any]:
        handle = self.handles.get(family)
        if handle is None:
            raise _Unavailable(family, self.unavailable.get(family, "no model configured for this family"))
        for attempt in range(self.retries + 1):
            try:
                return await getattr(handle, method).remote(*args)
            except BackPressureError as err:   # the family's queue is full (max_queued_requests): shed load
                raise _Unavailable(family, "overloaded; retry shortly") from err
            except _RETRYABLE as err:
                if attempt == self.retries:
                    raise _Unavailable(family, f"replica failure ({type(err).__name__}); retry shortly") from err
                logger.warning("[%s] replica failure (%s); retrying once", family, type(err).__name__)
        raise AssertionError("unreachable")

    @staticmethod
    def _respond(out: dict[str, Any]) -> JSONResponse:
        if "error" in out:
            return JSONResponse({"detail": out["error"]["detail"]}, status_code=int(out["error"]["status"]))
        model = out.get("model") or {}
        return JSONResponse(out, headers={MODEL_HEADER.decode(): f"{model.get('name')}:{model.get('version')}"})

    def _limit(self, field: str, name: str, count: int, default: int) -> None:
        cap = int(self.limits.get(name, default))
        if count > cap:
            raise RequestValidationError([{"loc": ("body", field), "msg": f"at most {cap} allowed, got {count}",
                                           "type": "too_long"}])

    @app.post("/v1/recommend", response_model=schemas.RecommendResponse,
              responses={413: {"description": "body too large"}, 503: {"description": "family not deployed"}})
    async def recommend(self, req: schemas.RecommendRequest) -> JSONResponse:
        return self._respond(await self._call("recommend", "recommend", req.model_dump()))

    @app.post("/v1/score/propensity", response_model=schemas.PropensityResponse,
              responses={413: {"description": "body too large"}, 503: {"description": "family not deployed"}})
    async def propensity(self, req: schemas.PropensityRequest) -> JSONResponse:
        self._limit("rows", "max_rows", len(req.rows), 256)
        return self._respond(await self._call("propensity", "score", req.rows))

    @app.post("/v1/sentiment", response_model=schemas.SentimentResponse,
              responses={413: {"description": "body too large"}, 503: {"description": "family not deployed"}})
    async def sentiment(self, req: schemas.SentimentRequest) -> JSONResponse:
        self._limit("texts", "max_texts", len(req.texts), 64)
        cap = int(self.limits.get("max_chars", 5000))
        errors = [{"loc": ("body", "texts", n), "msg": f"at most {cap} characters", "type": "string_too_long"}
                  for n, t in enumerate(req.texts) if len(t) > cap]
        errors += [{"loc": ("body", "texts", n), "msg": "empty text", "type": "string_too_short"}
                   for n, t in enumerate(req.texts) if not t.strip()]
        if errors:
            raise RequestValidationError(errors[:20])
        return self._respond(await self._call("sentiment", "classify", req.texts))

    @app.get("/v1/models", response_model=schemas.ModelsResponse)
    async def models(self) -> dict[str, Any]:
        loaded, unavailable = [], dict(self.unavailable)
        for family in FAMILIES:
            if self.handles.get(family) is None:
                unavailable.setdefault(family, "no model configured for this family")
                continue
            try:
                loaded.append(await self._call(family, "describe"))
            except _Unavailable as err:
                unavailable[family] = err.why
        return {"loaded": loaded, "unavailable": unavailable}

    @app.get("/healthz", response_model=schemas.Health)
    async def healthz(self) -> JSONResponse:
        """200 when every deployed family answers; 503 otherwise. Families not deployed are listed, not failed."""
        families, ok = {}, True
        for family in FAMILIES:
            if self.handles.get(family) is None:
                families[family] = "not deployed"
                continue
            try:
                await self._call(family, "check_health")
                families[family] = "ok"
            except Exception as err:  # noqa: BLE001 - a health probe reports, it does not raise
                families[family], ok = f"unhealthy: {type(err).__name__}", False
        return JSONResponse({"status": "ok" if ok else "degraded", "families": families},
                            status_code=200 if ok else 503)


def _deployment_options(serve_cfg: dict[str, Any], part: str) -> dict[str, Any]:
    """Serve options of the ingress or a family from `conf/serve/*.yaml` (`common` merged under the part)."""
    merged: dict[str, Any] = {**(serve_cfg.get("common") or {}), **(serve_cfg.get(part) or {})}
    opts: dict[str, Any] = {}
    for key in ("ray_actor_options", "max_ongoing_requests", "max_queued_requests", "health_check_period_s",
                "health_check_timeout_s", "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s"):
        if merged.get(key) is not None:
            opts[key] = merged[key]
    if merged.get("num_replicas") not in (None, "auto"):
        opts["num_replicas"] = int(merged["num_replicas"])
    elif merged.get("autoscaling_config"):
        opts["autoscaling_config"] = dict(merged["autoscaling_config"])
    return opts


def build_app(args: dict[str, Any]) -> Application:
    """The app builder for `serve run/build/deploy serve.app:build_app`.

    `args` is either `{"app": <serve.settings.app_args(...)>}` (what `jobs.deploy` and a written serve config
    pass) or Hydra overrides of `conf/deploy.yaml` as strings (`serve build serve.app:build_app experiment=tiny`).
    """
    if "app" in args:
        a = dict(args["app"])
    else:
        from jobs.deploy import compose

        a = app_args(compose([f"{k}={v}" for k, v in args.items()]))
    serve_cfg = a.get("serve") or {}
    key = a.get("api_key") or api_key({})
    check_bind(a.get("host", "127.0.0.1"), key)
    bound: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for family in FAMILIES:
        m = (a.get("models") or {}).get(family)
        if not m:
            unavailable[family] = "no model configured for this family (deploy.models." + family + ".name)"
            continue
        try:
            version = registry.resolve(a["registry"], m["name"], m.get("ref"))   # refuses names outside the root
        except UserError as err:
            if "invalid registry name" in str(err) or "outside the registry root" in str(err):
                raise
            unavailable[family] = str(err)
            continue
        fam_cfg = {**(serve_cfg.get("common") or {}), **(serve_cfg.get(family) or {})}
        options = {k: v for k, v in fam_cfg.items() if k in ("batching", "max_history")}
        options["data"] = a.get("data")
        # The version loaded in __init__ is an init argument; the one served is `user_config.ref`. Changing only
        # the user_config (a new `ref` or batching) is a light update: live replicas reconfigure() and swap
        # versions in place. `init_ref` keeps the init arguments of a running deployment unchanged for that.
        init_ref = m["init_ref"] if "init_ref" in m else m.get("ref")
        dep = FAMILY_CLASSES[family].options(**_deployment_options(serve_cfg, family),
                                             user_config={"ref": m.get("ref"), "batching": options.get("batching") or {}})
        bound[family] = dep.bind(a["registry"], m["name"], init_ref, options)
        logger.info("[%s] serving %s %s", family, m["name"], version)
    ingress_cfg = serve_cfg.get("ingress") or {}
    settings = {"host": a.get("host", "127.0.0.1"), "api_key": a.get("api_key"), "unavailable": unavailable,
                "limits": dict(serve_cfg.get("limits") or {}), "retries": int(ingress_cfg.get("retries", 1)),
                "max_body_bytes": int(serve_cfg.get("max_body_bytes", 1 << 20)),
                "log_requests": bool(serve_cfg.get("log_requests", True))}
    return Ingress.options(**_deployment_options(serve_cfg, "ingress")).bind(**bound, settings=settings)
