"""Load a registry version as a ready-to-predict model: one loader for `jobs.evaluate`, `jobs.batch_predict` and
the Serve deployments, so offline scoring and the endpoint run the very same model and the same `predict`.

    loaded = load_model(registry_root, "next_item_synthetic", "prod")   # ref: version, alias, "latest" or None
    loaded.task.predict(loaded.model, loaded.meta, inputs, ...)

A task module may define `load_model(found: dict) -> model` for models that are not a plain state dict over
`instantiate(config["model"], **meta["model_kwargs"])` (for example a scikit-learn baseline stored as arrays);
otherwise the model is instantiated from the version's own `config.yaml` with the constructor arguments its task
stored in `meta.json` (`model_kwargs`, the protocol's documented key), never typed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ecomray import registry
from ecomray.tasks import load_task


# Model-config keys that steer training (where to start from), never constructor arguments.
TRAINING_ONLY_MODEL_KEYS = ("init_from", "pretrained_dir")


def constructor_config(model_cfg: dict) -> dict:
    """The `model` config group minus its training-only keys: what `instantiate` gets."""
    return {k: v for k, v in model_cfg.items() if k not in TRAINING_ONLY_MODEL_KEYS}


def init_version(cfg: dict) -> dict | None:
    """The registry version a run starts from (`model.init_from: <name>[:<version|alias>]`), loaded; None without one."""
    ref = cfg["model"].get("init_from")
    if not ref:
        return None
    name, version = registry.parse_ref(str(ref))
    return registry.load(cfg["paths"]["registry"], name, version)


def pin_init_from(cfg: dict) -> dict:
    """The config with `model.init_from` naming the version it resolves to now (`mlm_reviews` ->
    `mlm_reviews:v0003`). Workers, the end-of-run scoring, the registered config and a later `jobs.evaluate` then
    all start from the same version; unpinned, a pretraining run registered meanwhile changed the tokenizer they
    built the data with."""
    ref = (cfg.get("model") or {}).get("init_from")
    if not ref:
        return cfg
    name, version = registry.parse_ref(str(ref))
    pinned = f"{name}:{registry.resolve(cfg['paths']['registry'], name, version)}"
    if pinned != str(ref):
        print(f"[train] model.init_from={ref}: {pinned}", flush=True)
    return {**cfg, "model": {**cfg["model"], "init_from": pinned}}


@dataclass
class LoadedModel:
    name: str
    version: str
    model: Any
    task: ModuleType
    meta: dict
    config: dict
    metrics: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)
    path: str = ""
    info: dict = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What is loaded, for logs and `GET /v1/models`: the task's key metrics on val and test."""
        keys = self.info.get("key_metrics") or []
        metrics = {f"{s}/{k}": self.metrics[f"{s}/{k}"] for k in keys for s in ("val", "test")
                   if f"{s}/{k}" in self.metrics}
        return {"name": self.name, "version": self.version, "task": self.config.get("task", {}).get("name"),
                "metrics": metrics, "research_only": bool(self.lineage.get("research_only", False)),
                "licence": self.lineage.get("licence")}


def build_from_version(found: dict) -> Any:
    """The model of a loaded registry version (`registry.load(...)`), in eval mode."""
    task = load_task(found["config"])
    if hasattr(task, "load_model"):
        model = task.load_model(found)
    else:
        from hydra.utils import instantiate

        model = instantiate(constructor_config(found["config"]["model"]), **found["meta"]["model_kwargs"])
        model.load_state_dict(found["state_dict"])
    if hasattr(model, "eval"):
        model.eval()
    return model


def load_model(root: str, name: str, ref: str | None = None) -> LoadedModel:
    """Resolve `ref` (a version, an alias, "latest", or None: prod, else best, else newest) and load it."""
    found = registry.load(root, name, ref)
    return LoadedModel(name=name, version=found["version"], model=build_from_version(found),
                       task=load_task(found["config"]), meta=found["meta"], config=found["config"],
                       metrics=found["metrics"], lineage=found["lineage"], path=found["path"], info=found["info"])
