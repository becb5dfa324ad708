"""Task families. A family is `conf/task/<name>.yaml` (with `module: ecomray.tasks.<name>`), a model file in
`ecomray/models/`, and a task module here exposing these module-level functions:

    build_data(cfg, rank, world_size) -> data      # this worker's part of the prepared shards, features fitted
    build_model(cfg, data) -> nn.Module            # sizes come from the data's metadata, never typed by hand
    train_batches(data, epoch, seed, batch_size) -> Iterator[dict[str, Tensor]]   # deterministic in (epoch, seed)
    loss_step(model, batch) -> Tensor
    evaluate(model, data, split) -> dict[str, float]   # names without prefix ("ndcg@10"); the loop adds "val/"
    metadata(data) -> dict                          # JSON feature metadata stored with the model in the registry
    predict(model, meta, inputs, **kw)              # used by `jobs.evaluate` and by serving

`cfg` is the whole resolved plain-dict config. The one training loop (`ecomray/train/loop.py`) only calls these.
Contracts the loop relies on:
- `build_data` on rank r of w reads its own part of the prepared shards (for example shard files r::w) and fits
  nothing on val/test; every rank must derive the same sizes (vocabularies) so the models match under DDP.
- `train_batches` must be a pure function of (data, epoch, seed, batch_size): a resumed run replays it exactly.
- `evaluate` returns sums already divided by the global count; under DDP it all-reduces across workers itself,
  so every worker must call it (it is a collective) and gets the same numbers.
Optional: `baselines(data) -> {name: scorer}` for families whose `evaluate(None, data, split, scorer=...)` can
score a baseline in the same harness (used by `jobs.evaluate`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ecomray.runtime import UserError


def load_task(cfg: dict) -> ModuleType:
    module = cfg["task"]["module"]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise UserError(f"task module {module!r} not found (task={cfg['task'].get('name')})") from None
