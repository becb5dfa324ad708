"""One Serve deployment per model family. Each is thin: load a registry version in `__init__` (the shared loader
`ecomray.inference.load_model`), call the task's own `predict` (the function offline evaluation and
`jobs.batch_predict` use) under `@serve.batch`, report health, and hot-swap versions through `reconfigure`.

Methods return plain dicts. A request the model can't take comes back as {"error": {"status", "detail"}} rather
than an exception, so the ingress answers 422 with the field and nothing crosses Ray as a failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

from ray import serve

from ecomray import registry
from ecomray.inference import LoadedModel, load_model

logger = logging.getLogger("ray.serve")


def _bad(loc: list[Any], msg: str, status: int = 422) -> dict[str, Any]:
    return {"error": {"status": status, "detail": [{"loc": loc, "msg": msg, "type": "value_error"}]}}


class _Family:
    """Loading, health, hot swap and batching knobs shared by the family deployments."""

    family = ""

    def __init__(self, registry_root: str, name: str, ref: str | None, options: dict[str, Any] | None = None) -> None:
        self.root, self.name, self.ref = registry_root, name, ref
        self.options = dict(options or {})
        self.loaded: LoadedModel | None = None
        self.loaded = self._load(ref)
        self._apply_batching(self.options.get("batching") or {})

    # -- loading and hot swap ------------------------------------------------------------------------------------
    def _load(self, ref: str | None) -> LoadedModel:
        t0 = time.perf_counter()
        loaded = load_model(self.root, self.name, ref)   # registry._safe: names never leave the registry root
        if not hasattr(loaded.task, "predict"):
            raise TypeError(f"task {loaded.task.__name__} has no predict()")
        self._prepare(loaded)
        logger.info("[%s] loaded %s %s (ref %s) in %.2fs", self.family, loaded.name, loaded.version, ref,
                    time.perf_counter() - t0)
        return loaded

    def _prepare(self, loaded: LoadedModel) -> None:
        """Per-family caches derived from a freshly loaded version (built before it is swapped in)."""

    def _apply_batching(self, batching: dict[str, Any]) -> None:
        if "max_batch_size" in batching:
            self._predict_batch.set_max_batch_size(int(batching["max_batch_size"]))
        if "batch_wait_timeout_s" in batching:
            self._predict_batch.set_batch_wait_timeout_s(float(batching["batch_wait_timeout_s"]))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config: {ref: <version|alias>, batching: {max_batch_size, batch_wait_timeout_s}}`.

        A new version is loaded beside the one serving, then the reference is swapped: requests in flight finish
        on the old model, the next batch runs on the new one, none is dropped. A bad ref raises (Serve reports the
        update as failed) and the old version keeps serving.
        """
        user_config = user_config or {}
        self._apply_batching(user_config.get("batching") or {})
        if "ref" not in user_config:
            return
        ref = user_config.get("ref") or None
        current = self.loaded
        if current is not None and registry.resolve(self.root, self.name, ref) == current.version:
            self.ref = ref
            return
        fresh = await asyncio.get_running_loop().run_in_executor(None, self._load, ref)
        self.loaded, self.ref = fresh, ref            # one reference assignment: the swap

    def check_health(self) -> None:
        if self.loaded is None or self.loaded.model is None:
            raise RuntimeError(f"{self.family}: no model loaded")

    def describe(self) -> dict[str, Any]:
        loaded = self.loaded
        if loaded is None:
            return {"family": self.family, "name": self.name, "version": "none", "ref": self.ref}
        try:
            aliases = sorted(a for a, v in registry.aliases(self.root, self.name).items() if v == loaded.version)
        except Exception:  # noqa: BLE001 - aliases are informative only
            aliases = []
        info = loaded.describe()
        info["metrics"] = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None)
                           for k, v in info.get("metrics", {}).items()}          # JSON has no NaN
        return {"family": self.family, **info, "ref": self.ref, "aliases": aliases}

    def model_ref(self, loaded: LoadedModel) -> dict[str, str]:
        return {"name": loaded.name, "version": loaded.version}

    async def _predict_batch(self, items: list[Any]) -> list[Any]:
        """Each family defines this as its `@serve.batch` method (Recommender, Propensity, Sentiment below)."""
        raise NotImplementedError(f"{type(self).__name__} must define _predict_batch")


@serve.deployment(name="recommend")
class Recommender(_Family):
    """Next-item recommendations: history -> top-k through `ecomray.tasks.next_item.predict`."""

    family = "recommend"

    def _prepare(self, loaded: LoadedModel) -> None:
        import torch

        if torch.cuda.is_available():          # a replica given a GPU (conf/serve/cluster.yaml) scores on it
            loaded.model.to("cuda")
        loaded.meta["_index"] = {item: n for n, item in enumerate(loaded.meta["item_ids"])}
        loaded.meta["_categories"], loaded.meta["_categories_why"] = _item_categories(
            self.options.get("data"), loaded.config)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _predict_batch(self, items: list[tuple[LoadedModel, list[str], int, bool]]) -> list[list[tuple[str, float]]]:
        """items: (loaded model, known history, k, exclude_history). One `predict` call per (model, exclude) group
        of the batch, with the group's largest k; each request keeps its own top k."""
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[int, bool], list[int]] = {}
        for n, (loaded, _, _, exclude) in enumerate(items):
            groups.setdefault((id(loaded), exclude), []).append(n)
        for (_, exclude), rows in groups.items():
            loaded = items[rows[0]][0]
            k = max(items[r][2] for r in rows)
            ranked = loaded.task.predict(loaded.model, loaded.meta, [items[r][1] for r in rows], k=k,
                                         exclude_history=exclude)
            for r, top in zip(rows, ranked):
                out[r] = top[:items[r][2]]
        return out

    async def recommend(self, req: dict[str, Any]) -> dict[str, Any]:
        loaded = self.loaded                               # this request runs on one version, even across a swap
        if loaded is None:
            return _bad([], f"{self.family} model is not loaded", 503)
        warnings: list[str] = []
        history = list(req.get("history") or [])
        k, exclude = int(req.get("k", 10)), bool(req.get("exclude_history", True))
        max_history = int(self.options.get("max_history", 200))
        if len(history) > max_history:
            warnings.append(f"history has {len(history)} items; only the most recent {max_history} are used")
            history = history[-max_history:]
        index = loaded.meta["_index"]
        unknown = [i for i in history if i not in index]
        known = [i for i in history if i in index]
        if unknown:
            shown = ", ".join(repr(i[:40]) for i in unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            warnings.append(f"{len(unknown)} unknown item id(s) dropped from the history: {shown}")
        categories = _wanted_categories(req.get("filters"))
        if categories is not None and loaded.meta["_categories"] is None:
            return _bad(["body", "filters", "category"],
                        f"category filters are not available for {loaded.name} {loaded.version}: "
                        f"{loaded.meta['_categories_why']}")
        fallback = not known
        if fallback:
            warnings.append("no known item in the history: most popular items (cold-start fallback)")
            seen = set(history) if exclude else set()
            pool = [i for i in loaded.meta.get("popular") or [] if i not in seen]
            if categories is not None:
                cat = loaded.meta["_categories"]
                pool = [i for i in pool if cat.get(i) in categories]
            items = [{"item_id": i, "score": None} for i in pool[:k]]
        else:
            # A category filter ranks the whole catalogue, then keeps the first k of the wanted categories.
            want = len(loaded.meta["item_ids"]) if categories is not None else k
            ranked = await self._predict_batch((loaded, known, want, exclude))
            if categories is not None:
                cat = loaded.meta["_categories"]
                ranked = [(i, s) for i, s in ranked if cat.get(i) in categories][:k]
            items = [{"item_id": i, "score": (s if math.isfinite(s) else None)} for i, s in ranked]
        if len(items) < k:
            warnings.append(f"only {len(items)} item(s) match; asked for {k}")
        return {"user_id": req.get("user_id"), "items": items, "model": self.model_ref(loaded), "fallback": fallback,
                "warnings": warnings}


def _wanted_categories(filters: dict[str, Any] | None) -> set[str] | None:
    cat = (filters or {}).get("category")
    if cat is None:
        return None
    return {cat} if isinstance(cat, str) else set(cat)


def _item_categories(data_root: str | None, config: dict) -> tuple[dict[str, str] | None, str]:
    """item id -> category from the version's prepared shards (the `category` column), read once at load.

    The registry's meta has no category map, so this reads the shard set the model was trained on from today's
    data folder; it returns (None, why) when that is not available, and category filters then answer 422.
    """
    try:
        import polars as pl

        from ecomray.data.prepare import load_manifest

        name = config["dataset"]["name"]
        folder = os.path.join(data_root or config["paths"]["data"], name)
        manifest = load_manifest(folder)
        files = [os.path.join(folder, s["file"]) for s in manifest["shards"]]
        lf = pl.scan_parquet(files)
        if "category" not in lf.collect_schema().names():
            return None, f"dataset {name!r} has no category column"
        df = (lf.select("item_id", "category").drop_nulls().group_by("item_id").agg(pl.col("category").mode().min())
              .collect())
        return dict(zip(df["item_id"].to_list(), df["category"].cast(pl.Utf8).to_list())), ""
    except Exception as err:  # noqa: BLE001 - an optional feature: say why it is off
        return None, f"the prepared dataset could not be read ({type(err).__name__}: {err})"


@serve.deployment(name="propensity")
class Propensity(_Family):
    """Purchase probabilities for session rows through `ecomray.tasks.propensity.predict` (same feature code)."""

    family = "propensity"

    def _prepare(self, loaded: LoadedModel) -> None:
        stats = loaded.meta["stats"]
        loaded.meta["_numeric"], loaded.meta["_categorical"] = list(stats["numeric"]), list(stats["categorical"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _predict_batch(self, items: list[tuple[LoadedModel, list[dict[str, Any]]]]) -> list[list[float]]:
        import pyarrow as pa

        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for n, (loaded, _) in enumerate(items):
            groups.setdefault(id(loaded), []).append(n)
        for rows in groups.values():
            loaded = items[rows[0]][0]
            allrows = [r for n in rows for r in items[n][1]]
            table = pa.Table.from_pydict(_columns(allrows, loaded.meta))
            p = loaded.task.predict(loaded.model, loaded.meta, table)
            lo = 0
            for n in rows:
                hi = lo + len(items[n][1])
                out[n] = [float(x) if math.isfinite(x) else None for x in p[lo:hi]]
                lo = hi
        return out

    async def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        loaded = self.loaded
        if loaded is None:
            return _bad([], f"{self.family} model is not loaded", 503)
        error = _check_rows(rows, loaded.meta)
        if error:
            return error
        probs = await self._predict_batch((loaded, rows))
        return {"probabilities": probs, "model": self.model_ref(loaded)}


def _check_rows(rows: list[dict[str, Any]], meta: dict) -> dict[str, Any] | None:
    """Every feature the model needs, numerics as finite numbers, categoricals as text/number/bool."""
    errors = []
    for n, row in enumerate(rows):
        for f in meta["_numeric"]:
            v = row.get(f, ...)
            if v is ...:
                errors.append({"loc": ["body", "rows", n, f], "msg": "field required", "type": "missing"})
            elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                errors.append({"loc": ["body", "rows", n, f], "msg": "must be a finite number or null",
                               "type": "float_type"})
        for f in meta["_categorical"]:
            v = row.get(f, ...)
            if v is ...:
                errors.append({"loc": ["body", "rows", n, f], "msg": "field required", "type": "missing"})
        if len(errors) >= 20:
            break
    return {"error": {"status": 422, "detail": errors[:20]}} if errors else None


def _columns(rows: list[dict[str, Any]], meta: dict) -> dict[str, list[Any]]:
    """Arrow-ready columns with the training table's conventions: numerics as float, categoricals as text, with
    booleans spelled as Arrow casts them ("true"/"false"), so a value maps to the same vocabulary slot."""
    cols: dict[str, list[Any]] = {f: [None if r[f] is None else float(r[f]) for r in rows] for f in meta["_numeric"]}
    for f in meta["_categorical"]:
        cols[f] = [None if r[f] is None else ("true" if r[f] is True else "false" if r[f] is False else
                                              str(int(r[f])) if isinstance(r[f], float) and r[f].is_integer()
                                              else str(r[f])) for r in rows]
    return cols


@serve.deployment(name="sentiment")
class Sentiment(_Family):
    """Text sentiment through `ecomray.tasks.sentiment.predict(model, meta, texts) -> [{label, probs}]`."""

    family = "sentiment"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _predict_batch(self, items: list[tuple[LoadedModel, list[str]]]) -> list[list[dict[str, Any]]]:
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for n, (loaded, _) in enumerate(items):
            groups.setdefault(id(loaded), []).append(n)
        for rows in groups.values():
            loaded = items[rows[0]][0]
            texts = [t for n in rows for t in items[n][1]]
            results = loaded.task.predict(loaded.model, loaded.meta, texts)
            lo = 0
            for n in rows:
                hi = lo + len(items[n][1])
                out[n] = [{"label": str(r["label"]), "probs": {str(k): float(v) for k, v in r["probs"].items()}}
                          for r in results[lo:hi]]
                lo = hi
        return out

    async def classify(self, texts: list[str]) -> dict[str, Any]:
        loaded = self.loaded
        if loaded is None:
            return _bad([], f"{self.family} model is not loaded", 503)
        blank = [n for n, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if blank:       # the task refuses empty texts; one would fail the whole batch
            return {"error": {"status": 422, "detail": [{"loc": ["body", "texts", n], "msg": "empty text",
                                                         "type": "string_too_short"} for n in blank[:20]]}}
        warnings = []
        max_chars = loaded.meta.get("max_chars")
        if max_chars and any(len(t) > int(max_chars) for t in texts):
            warnings.append(f"texts over the model's {max_chars} characters were truncated")
        results = await self._predict_batch((loaded, list(texts)))
        return {"results": results, "model": self.model_ref(loaded), "warnings": warnings}


FAMILY_CLASSES = {"recommend": Recommender, "propensity": Propensity, "sentiment": Sentiment}
