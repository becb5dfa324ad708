"""Task families: the protocol between one family and the generic planes (training, tuning, evaluation, the
registry, batch prediction and serving).

A family is three things and nothing else: `conf/task/<name>.yaml` (with `name:` and `module:`, the module path
of its task module; any importable module works, so a family can live outside this package), a model file (one
model per file, in `ecomray/models/` or anywhere importable through the model config's `_target_`), and a task
module exposing the names below. Generic code calls only these; it never names a family.

Training (the one loop, `ecomray/train/loop.py`):

    build_data(cfg, rank, world_size) -> data      # this worker's part of the prepared shards, features fitted
    build_model(cfg, data) -> nn.Module            # sizes come from the data, never typed by hand
    train_batches(data, epoch, seed, batch_size) -> Iterator[dict[str, Tensor]]   # pure in (epoch, seed)
    loss_step(model, batch) -> Tensor
    evaluate(model, data, split) -> dict[str, float]   # names without prefix ("ndcg@10"); the loop adds "val/"
    metadata(data) -> dict                         # JSON stored with the model in the registry (below)
    KEY_METRICS: tuple[str, ...]                   # the metrics worth a column, headline first ("ndcg@10", ...)

Contracts the loop relies on:
- `build_data` on rank r of w reads its own part of the prepared shards (`ecomray.data.shards`) and fits nothing
  on val/test; every rank derives the same sizes (vocabularies) so the models match under DDP.
- `train_batches` is a pure function of (data, epoch, seed, batch_size): a resumed run replays it exactly.
- A task may also define `num_batches(data, epoch, seed, batch_size) -> int`, the number `train_batches` yields;
  the loop then draws batches as it trains instead of building the whole epoch first (what a large dataset needs:
  an epoch of batches over 100M events can take gigabytes).
- `evaluate` returns sums already divided by the global count; under DDP it all-reduces across workers itself,
  so every worker must call it (it is a collective) and gets the same numbers.

The registry version (`metadata(data)`, written to `meta.json`) must make the version self-contained: nothing
after training reads the prepared data. Keys the generic code reads:

    model_kwargs: dict        # REQUIRED: the model's constructor arguments that are not in the model config
                              # (vocabulary sizes, feature cardinalities...): instantiate(config.model, **model_kwargs)
    examples: list[dict]      # a few valid request bodies for the family's route (docs, playground, deploy.once)

plus whatever the family's `predict` and `serve_batch` need (vocabularies, category maps, popular items,
feature statistics, tokenizers, thresholds).

Using a version (`ecomray.inference.load_model` builds the model; a family may define `load_model(found) ->
model` when its model is not `instantiate(config.model, **model_kwargs)` + a state dict):

    predict(model, meta, inputs, **options)        # the family's own prediction, used by everything below

Evaluation (`jobs.evaluate`), optional:

    EVAL_OPTIONS: tuple[str, ...]  # the task settings that change how a version is scored, not its data or
                                   # features; `evaluate.task` may override only these (without it: any setting)

    evaluation_table(model, meta, data, split, baselines: bool) -> {row name: metrics}
                              # the model (restored from `meta`, e.g. a threshold chosen on val) and any
                              # baselines / oracles in the same harness; default {"model": evaluate(...)}

Batch prediction (`jobs.batch_predict`):

    batch_inputs(cfg, split) -> pa.Table | ecomray.data.shards.ShardScan   # what to score, from prepared data
    batch_score(model, meta, batch: pa.Table, options: dict) -> pa.Table   # one output row per input row
    BATCH_OPTIONS: tuple[str, ...]                 # optional: the option names batch_score reads; any other
                                                   # name in batch_predict.options is refused (a typo)

Serving (`serve/`: one generic deployment, one route per entry of `deploy.endpoints`):

    ROUTE: str                                     # default route: POST /v1/<ROUTE>
    api(meta, limits) -> (Request, Response)       # pydantic models for a version (strict, built on
                                                   # ecomray.serving); they are the OpenAPI contract
    serve_batch(model, meta, requests: list[dict], options: dict) -> list[dict | RequestError]
                              # one call for a batch of validated requests (`Request.model_dump()`), one result
                              # per request; a request the model can't take gets a RequestError (422 naming the
                              # field), which fails only that request
    prepare_serving(model, meta) -> None           # optional: caches built once per loaded version

`cfg` is always the whole resolved plain-dict config. The task's serving settings (batching, limits) live in its
config under `task.serve`, and `conf/serve/*.yaml` may override them per route.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ecomray.runtime import UserError

REQUIRED = ("build_data", "build_model", "train_batches", "loss_step", "evaluate", "metadata", "predict")
SERVING = ("ROUTE", "api", "serve_batch")
BATCH = ("batch_inputs", "batch_score")


class RequestError(Exception):
    """A request the model can't take: answered 422 with `loc` (the field's location in the body) and `msg`."""

    def __init__(self, loc: list[Any], msg: str, type_: str = "value_error") -> None:
        super().__init__(msg)
        self.loc, self.msg, self.type = list(loc), msg, type_

    def detail(self) -> dict[str, Any]:
        return {"loc": self.loc, "msg": self.msg, "type": self.type}


def load_task(cfg: dict) -> ModuleType:
    """The task module named by `cfg["task"]["module"]`, checked against the training part of the protocol."""
    module = cfg["task"].get("module")
    if not module:
        raise UserError(f"task {cfg['task'].get('name')!r} has no `module` (conf/task/<name>.yaml: module: ...)")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            raise UserError(f"task module {module!r} not found (task={cfg['task'].get('name')})") from None
        raise
    missing = [n for n in REQUIRED if not hasattr(mod, n)]
    if missing:
        raise UserError(f"task module {module} lacks {missing} (see ecomray/tasks/__init__.py for the protocol)")
    return mod


def supports(task: ModuleType, part: tuple[str, ...]) -> bool:
    return all(hasattr(task, n) for n in part)


def key_metrics(task: ModuleType) -> tuple[str, ...]:
    """The task's headline metrics (KEY_METRICS), first one first."""
    return tuple(getattr(task, "KEY_METRICS", ()) or ())
