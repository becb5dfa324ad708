"""The one model deployment: any family's registry version behind one route.

`ModelServer` loads an exact registry version in `__init__` (the shared loader `ecomray.inference.load_model`),
batches requests (`serve/batcher.py`: a batch is formed when the model is free, and runs off the event loop), and
calls the family's own `serve_batch` (ecomray/tasks/__init__.py), which calls the same `predict` offline evaluation
and batch prediction use. It knows no family: the route, the schemas and the batching come from the task module and
the config.

It is a plain class: `ModelDeployment` runs it as its own Serve deployment (the default topology: ingress ->
handle -> model replicas), and the ingress can also hold one in-process (`inline: true` for a light CPU family:
one hop less, no independent scaling).

Every result is a plain dict, never an exception across Ray: `{"status": 200, "body": {...}}` or
`{"status": 422 | 500 | 503, "detail": ...}`. One request that fails (a bad value the model can't take, or a bug
the family's code hits on it) fails alone: the batch is retried request by request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ray import serve

from ecomray import registry
from ecomray.inference import LoadedModel, load_model
from ecomray.runtime import UserError
from ecomray.tasks import RequestError, supports, SERVING
from serve.batcher import Batcher

logger = logging.getLogger("ray.serve")
BOARD = "ecomray-serving"      # Ray KV prefix: <BOARD>/<app>/<route>/<replica> -> {"version", "ts"}


def error(status: int, detail: Any) -> dict[str, Any]:
    return {"status": status, "detail": detail}


class ModelServer:
    """One route's model: load, batch, predict, hot-swap, describe."""

    def __init__(self, registry_root: str, name: str, version: str, route: str,
                 options: dict[str, Any] | None = None) -> None:
        self.root, self.name, self.route = registry_root, name, route
        self.options = dict(options or {})
        self.ref: str | None = self.options.get("ref")
        self.failed: dict[str, str] | None = None       # the last hot swap that did not happen, and why
        self.loaded: LoadedModel | None = None
        self.contract: str | None = None                 # the request schema the ingress was built with
        try:
            self.loaded = self._load(version)
        except UserError as err:
            if self._board_key() is None:                # inline, or not in a replica: the deploy's own error
                raise
            # A replica that starts after a hot swap (autoscaling, a restart) is built with the version the app was
            # deployed with, which `registry gc` may have deleted since no replica serves it. Serve calls
            # reconfigure(user_config) before the replica takes traffic: it loads the version being served.
            self.failed = {"ref": str(version)[:200], "error": self._reason(err)}
            logger.warning("[%s] %s %s did not load (%s); waiting for the app's current version", route, name,
                           version, self.failed["error"])
        if self.loaded is not None:
            self.contract = self._contract(self.loaded)
        batching = _batching_settings(self.options.get("batching") or {})
        # One batch queue per instance; a batch is formed when the model is free (serve/batcher.py).
        self._batch = Batcher(self._run, int(batching.get("max_batch_size", 16)),
                              float(batching.get("batch_wait_timeout_s", 0.0)),
                              bool(batching.get("in_thread", True)), name=f"model-{route}", on_batch=self._observe)
        self._metrics: Any = None
        self._report()

    # -- which replica serves which version (GET /v1/models) -----------------------------------------------------
    def _board_key(self) -> str | None:
        try:
            ctx = serve.get_replica_context()
        except Exception:  # noqa: BLE001 - not in a replica (inline in the ingress, or a unit test)
            return None
        return f"{BOARD}/{ctx.app_name}/{self.route}/{ctx.replica_id.unique_id}"

    def _report(self) -> None:
        """Note this replica's version in Ray's KV store (under the app and route), where the ingress lists every
        replica's version. Refreshed on every health check, dropped when the replica stops."""
        key = self._board_key()
        if key is None or self.loaded is None:
            return
        self._lease(self.loaded.version)
        from ray.experimental.internal_kv import _internal_kv_put

        try:
            _internal_kv_put(key, json.dumps({"version": self.loaded.version, "ts": time.time()}))
        except Exception:  # noqa: BLE001 - informative only
            logger.warning("[%s] could not report the loaded version", self.route)

    def _lease(self, version: str, loading: bool = False) -> None:
        """`jobs.registry gc` never deletes a version a replica serves, or is loading. `loading`: a version that gc
        has deleted is the load's error (UserError); otherwise (a health check's refresh of the version in memory)
        a lease that fails is only logged, and one that would wait for a running gc is left to the next check."""
        key = self._board_key()
        if key is None:
            return
        try:
            registry.lease(self.root, self.name, version, key.rsplit("/", 1)[-1], wait=loading)
        except UserError:
            if loading:
                raise
            logger.warning("[%s] could not lease %s %s in the registry", self.route, self.name, version)
        except OSError:
            logger.warning("[%s] could not lease %s %s in the registry", self.route, self.name, version)

    def __del__(self) -> None:
        if hasattr(self, "_batch"):
            self._batch.close()
        key = self._board_key() if hasattr(self, "route") else None
        if key:
            try:
                from ray.experimental.internal_kv import _internal_kv_del

                _internal_kv_del(key)
                if self.loaded is not None:
                    registry.release(self.root, self.name, self.loaded.version, key.rsplit("/", 1)[-1])
            except Exception:  # noqa: BLE001 - shutting down
                pass

    # -- loading and hot swap ------------------------------------------------------------------------------------
    def _load(self, version: str) -> LoadedModel:
        t0 = time.perf_counter()
        try:
            self._lease(version, loading=True)   # before reading it: gc must not delete it halfway through the load
            loaded = load_model(self.root, self.name, version)   # registry._safe: names never leave the registry root
            if not supports(loaded.task, SERVING):
                raise UserError(f"{self.name} {loaded.version}: task {loaded.task.__name__} does not serve "
                                f"(it defines no {', '.join(n for n in SERVING if not hasattr(loaded.task, n))})")
            if hasattr(loaded.task, "prepare_serving"):
                loaded.task.prepare_serving(loaded.model, loaded.meta)
        except BaseException:     # not loaded: give the lease back (unless this version is the one serving)
            if self.loaded is None or self.loaded.version != version:
                self._unlease(version)
            raise
        logger.info("[%s] loaded %s %s in %.2fs", self.route, loaded.name, loaded.version, time.perf_counter() - t0)
        return loaded

    def _reason(self, err: BaseException) -> str:
        """An error as `failed_swap` shows it: without the server's folders (`GET /v1/models` is public)."""
        from serve.settings import _without_folders

        return f"{type(err).__name__}: {_without_folders(str(err), self.root)[:300]}"

    def _contract(self, loaded: LoadedModel) -> str:
        """The route's request schema for a version (its fields and their types; descriptions and examples left
        out): what the ingress validates bodies against, built once, from the version the app was deployed with."""
        request_model, _ = loaded.task.api(loaded.meta, self.options.get("limits") or {})
        return json.dumps(_bare_schema(request_model.model_json_schema()), sort_keys=True)

    def _observe(self, size: int, seconds: float) -> None:
        """Prometheus (inside a replica): `ecomray_batch_size` and `ecomray_batch_ms` per route."""
        if self._metrics is False:
            return
        try:
            if self._metrics is None:
                from ray.serve import metrics

                self._metrics = (
                    metrics.Histogram("ecomray_batch_size", "requests per model batch",
                                      boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("route",)),
                    metrics.Histogram("ecomray_batch_ms", "time the model took for one batch (ms)",
                                      boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
                                      tag_keys=("route",)))
            self._metrics[0].observe(size, tags={"route": self.route})
            self._metrics[1].observe(seconds * 1e3, tags={"route": self.route})
        except Exception:  # noqa: BLE001 - outside a replica there is no metrics agent
            self._metrics = False

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config: {version: v0003, ref: <what it was resolved from>, batching: {...}}` (a `ref` alone is
        resolved here). The new version is loaded beside the one serving, then the reference is swapped: requests in
        flight finish on the old model, none is dropped. A version that does not load (missing, outside the
        registry, broken files) is not swapped in: the old one keeps serving and `describe()` reports the failure."""
        user_config = user_config or {}
        refused = None      # a batching refusal stays reported, also when the same config (re)sets the version
        try:    # checked whole before any of it applies; a typo must not fail the replica (Serve would stop it)
            self._batch.configure(**_batching_settings(user_config.get("batching") or {}))
        except (TypeError, ValueError) as err:
            self.failed = refused = {"ref": "batching", "error": f"{type(err).__name__}: {str(err)[:300]}"}
            logger.error("[%s] batching %r refused, batching unchanged: %s", self.route, user_config.get("batching"),
                         err)
        if not ({"version", "ref"} & set(user_config)):
            return
        ref = user_config.get("ref")
        wanted = user_config.get("version") or ref
        current = self.loaded
        try:
            version = registry.resolve(self.root, self.name, wanted)
            if current is not None and version == current.version:
                self.ref, self.failed = ref, refused
                return
            fresh = await asyncio.get_running_loop().run_in_executor(None, self._load, version)
            contract = self._contract(fresh)
            if self.contract is not None and contract != self.contract:
                # the ingress validates bodies against the deployed version's schema: the swapped-in model would
                # get rows without its fields (a 500 on every request, /healthz still ok)
                self._unlease(fresh.version)
                raise UserError(f"{self.name} {fresh.version} takes other request fields than the deployed "
                                f"version (its request schema differs): roll it out with `python -m jobs.deploy "
                                f"... deploy.rollout=true`, which rebuilds the ingress, not with a hot swap")
        except Exception as err:  # noqa: BLE001 - a bad swap must never take the route down
            self.failed = {"ref": str(wanted)[:200], "error": self._reason(err)}
            logger.error("[%s] hot swap to %r failed, still serving %s %s: %s", self.route, wanted, self.name,
                         current.version if current else "nothing", self.failed["error"])
            return
        self.loaded, self.ref, self.failed = fresh, ref, refused   # one reference assignment: the swap
        self.contract = self.contract or contract
        self._report()
        if current is not None:
            self._unlease(current.version)

    def _unlease(self, version: str) -> None:
        key = self._board_key()
        if key is not None:
            try:
                registry.release(self.root, self.name, version, key.rsplit("/", 1)[-1])
            except (OSError, UserError):
                logger.warning("[%s] could not release %s %s in the registry", self.route, self.name, version)

    def check_health(self) -> None:
        if self.loaded is None or self.loaded.model is None:
            raise RuntimeError(f"{self.route}: no model loaded")
        self._report()

    def describe(self) -> dict[str, Any]:
        loaded = self.loaded
        info: dict[str, Any] = {"route": self.route, "name": self.name, "ref": self.ref, "failed_swap": self.failed,
                                "batching": self.batch_stats()}
        try:
            info["replica"] = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (inline in tests)
            info["replica"] = None
        if loaded is None:
            return {**info, "version": "none"}
        try:
            aliases = sorted(a for a, v in registry.aliases(self.root, self.name).items() if v == loaded.version)
        except Exception:  # noqa: BLE001 - aliases are informative only
            aliases = []
        return {**info, **loaded.describe(), "aliases": aliases}

    def batch_stats(self) -> dict[str, Any]:
        """This replica's batching settings and what its batches have been since it started."""
        return {**self._batch.settings(), **self._batch.stats.snapshot()}

    def examples(self) -> list[dict[str, Any]]:
        """Valid request bodies stored in the version at registration (docs, playground, deploy.once)."""
        return list((self.loaded.meta.get("examples") if self.loaded else None) or [])

    # -- requests ------------------------------------------------------------------------------------------------
    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        """One validated request body -> `{"status": 200, "body": answer}` or an error dict."""
        loaded = self.loaded                 # this request runs on one version, even across a swap
        if loaded is None:
            return error(503, f"{self.route}: no model loaded")
        return await self._batch((loaded, body))

    def _run(self, items: list[tuple[LoadedModel, dict[str, Any]]]) -> list[dict[str, Any]]:
        """A batch: one `serve_batch` call per loaded version in it; if that call raises, each request is retried
        alone, so only the request that breaks the family's code fails."""
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for n, (loaded, _) in enumerate(items):
            groups.setdefault(id(loaded), []).append(n)
        for members in groups.values():
            loaded = items[members[0]][0]
            try:
                results = self._serve(loaded, [items[n][1] for n in members])
            except Exception:  # noqa: BLE001 - isolate below
                results = []
                for n in members:
                    try:
                        results.extend(self._serve(loaded, [items[n][1]]))
                    except Exception as err:  # noqa: BLE001 - this request alone
                        logger.exception("[%s] %s %s failed on one request", self.route, loaded.name, loaded.version)
                        results.append(err)
            ref = {"name": loaded.name, "version": loaded.version}
            for n, r in zip(members, results):
                try:
                    out[n] = self._shape(r, ref)
                except Exception:  # noqa: BLE001 - a result that is not a mapping fails its own request only
                    logger.exception("[%s] %s %s gave a result that is not a mapping", self.route, loaded.name,
                                     loaded.version)
                    out[n] = error(500, "internal error; the server log has the details")
        return out

    def _serve(self, loaded: LoadedModel, bodies: list[dict[str, Any]]) -> list[Any]:
        results = loaded.task.serve_batch(loaded.model, loaded.meta, bodies, self.options)
        if len(results) != len(bodies):
            raise RuntimeError(f"{loaded.task.__name__}.serve_batch returned {len(results)} results for "
                               f"{len(bodies)} requests")
        return results

    @staticmethod
    def _shape(result: Any, ref: dict[str, str]) -> dict[str, Any]:
        if isinstance(result, RequestError):
            return error(422, [result.detail()])
        if isinstance(result, BaseException):
            return error(500, "internal error; the server log has the details")
        return {"status": 200, "body": {**result, "model": ref}}


def _batching_settings(batching: Any) -> dict[str, Any]:
    """`batching` checked whole and typed (ValueError naming the key): max_batch_size an integer >= 1,
    batch_wait_timeout_s a number >= 0, in_thread a boolean (the text "false" was true)."""
    if not isinstance(batching, dict):
        raise ValueError(f"batching must be a mapping, got {batching!r}")
    unknown = set(batching) - {"max_batch_size", "batch_wait_timeout_s", "in_thread"}
    if unknown:
        raise ValueError(f"batching has unknown key(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    if "max_batch_size" in batching:
        v = batching["max_batch_size"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"batching.max_batch_size must be an integer >= 1, got {v!r}")
        out["max_batch_size"] = v
    if "batch_wait_timeout_s" in batching:
        v = batching["batch_wait_timeout_s"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"batching.batch_wait_timeout_s must be a number >= 0, got {v!r}")
        out["batch_wait_timeout_s"] = float(v)
    if "in_thread" in batching:
        if not isinstance(batching["in_thread"], bool):
            raise ValueError(f"batching.in_thread must be true or false, got {batching['in_thread']!r}")
        out["in_thread"] = batching["in_thread"]
    return out


def _bare_schema(schema: Any, names: bool = False) -> Any:
    """A JSON schema without what does not change which bodies it accepts (titles, descriptions, examples,
    defaults: the ingress fills them in). `names`: a mapping of field or definition names (`properties`,
    `$defs`), whose keys are kept whatever they are called (a field named `title` is a field)."""
    if isinstance(schema, dict):
        return {k: _bare_schema(v, k in ("properties", "$defs", "definitions") and not names)
                for k, v in schema.items()
                if names or k not in ("title", "description", "examples", "example", "default")}
    if isinstance(schema, list):
        return [_bare_schema(v) for v in schema]
    return schema


def replica_versions(app: str, route: str) -> list[dict[str, Any]]:
    """Every live replica of a route and the version it serves: the replicas' own reports in the KV board, kept
    only for replicas Serve still runs (its named replica actors); the reports of dead replicas are removed."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list

    prefix = f"SERVE_REPLICA::{app}#model_{route.replace('/', '_')}#"
    live = {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}
    out, now = [], time.time()
    board = f"{BOARD}/{app}/{route}/"
    for key in _internal_kv_list(board):
        replica = key.decode()[len(board):]
        if "/" in replica:       # a nested route's report (route `a`, key of route `a/b`): not ours
            continue
        raw = _internal_kv_get(key)
        if replica not in live or raw is None:
            _internal_kv_del(key)
            continue
        entry = json.loads(raw)
        out.append({"replica": replica, "version": entry["version"], "seen_s_ago": round(now - float(entry["ts"]), 1)})
    return sorted(out, key=lambda e: e["replica"])


ModelDeployment = serve.deployment(name="model")(ModelServer)
