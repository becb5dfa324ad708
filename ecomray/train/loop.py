"""The one training loop, for every task family: plain PyTorch plus the Ray Train calls.

Runs inside each Ray Train worker (or in-process with `scaling.num_workers: 0`). Each epoch it reports
`train/loss`, `val/<metric>`, `samples_per_s`, `elapsed_s` and a checkpoint holding the model, the optimizer, the
epoch and the early-stopping state, so a restarted worker group resumes where it was. Data order and every
random draw are functions of (seed, epoch, rank) (the RNGs are re-seeded each epoch), so a resumed run ends with
the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import random
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from ecomray.runtime import Progress, UserError, is_uri
from ecomray.tasks import load_task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _better(value: float, best: float | None, mode: str) -> bool:
    """A NaN or infinite figure is never better than a finite one (a diverged ranking model scored ndcg inf and
    was kept as the best); the first epoch is kept whatever it scored, and any finite figure beats a non-finite
    best."""
    if best is None:
        return True
    if not np.isfinite(value):
        return False
    if not np.isfinite(best):
        return True
    return value > best if mode == "max" else value < best


def _diverged(loss: float, best: float | None, epoch: int, world: int) -> str | None:
    """Why training cannot usefully go on: a training loss that is not finite on any worker (the weights are NaN or
    infinite; the same answer on every worker). Raised as a UserError when no earlier epoch can be kept."""
    if not _any_worker(not np.isfinite(loss), world):
        return None
    why = (f"epoch {epoch}: the training loss is {loss}{' (on a worker)' if world > 1 else ''}: the model "
           f"diverged (lower optim.lr, set train.grad_clip, or train.bf16=false)")
    if best is None:
        raise UserError(f"{why}; there is no earlier epoch to keep")
    return why


def built_model(task: Any, cfg: dict, data: Any) -> torch.nn.Module:
    """`task.build_model`, with a model config no model can be built from (`model.dim=0`) named as the config it is:
    the layer's own error (`embed_dim and num_heads must be greater than 0`) names neither the setting nor the model."""
    from hydra.errors import InstantiationException

    try:
        return task.build_model(cfg, data)
    except (InstantiationException, ValueError, AssertionError) as err:   # a bug in task code keeps its traceback
        inner = err
        while inner.__cause__ is not None or (inner.__context__ is not None and not inner.__suppress_context__):
            inner = inner.__cause__ or inner.__context__    # Hydra wraps the constructor's own error
        settings = ", ".join(f"model.{k}={v!r}" for k, v in (cfg.get("model") or {}).items()
                             if not k.startswith("_") and isinstance(v, (int, float, str, bool)))
        raise UserError(f"model {cfg.get('model', {}).get('_target_', '?')} cannot be built from this config "
                        f"({settings}): {type(inner).__name__}: {inner}") from None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied as they are."""
    for averaged, live in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(live, 1.0 - decay)
    for averaged, live in zip(ema.buffers(), model.buffers()):
        averaged.copy_(live)


def decay_on_plateau(optimizer: torch.optim.Optimizer, plateau: dict | None) -> None:
    """`train.lr_plateau: {factor, min_lr}`: after an epoch that did not improve the monitored metric, every
    learning rate is multiplied by `factor` (not below `min_lr`). The same on every DDP rank (the metric is), and
    resumed with the optimizer's state."""
    if not plateau:
        return
    for group in optimizer.param_groups:
        group["lr"] = max(group["lr"] * float(plateau.get("factor", 0.1)), float(plateau.get("min_lr", 0.0)))


BUDGET_CHECK_STEPS = 50   # steps between two looks at train.time_budget_s inside an epoch


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _min_over_workers(n: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _any_worker(flag: bool, world: int) -> bool:
    """True on every worker when it is true on any (workers' clocks differ; they must stop at the same epoch)."""
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _KeptDir:
    """In-process runs (num_workers=0) report the checkpoint folder itself rather than a copy: keep the latest
    folder alive until the next one has been reported, then remove the older one."""

    previous: str | None = None

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="ecomray-ckpt-")
        return self.path

    def __exit__(self, *exc: object) -> None:
        release_kept_checkpoint()
        _KeptDir.previous = self.path


def release_kept_checkpoint() -> None:
    """Remove the folder of an in-process run's last checkpoint, once the driver has read what it needs from it."""
    if _KeptDir.previous and os.path.isdir(_KeptDir.previous):
        shutil.rmtree(_KeptDir.previous, ignore_errors=True)
    _KeptDir.previous = None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


DATA_HASH = "_data_hash"   # the manifest hash `fit` read in the driver, carried to the workers in the config


def data_changed(cfg: dict, world: int = 1, device: Any = None) -> str | None:
    """The dataset's manifest hash now, when it is not the one `fit` read (`DATA_HASH`): the dataset was prepared
    again (`overwrite=true`) after the driver checked it, perhaps while the workers read their shards. With several
    workers they agree (any rank that saw a change counts for all), so that all of them stop, or none."""
    expected = cfg.get(DATA_HASH)
    if not expected:
        return None
    from ecomray.data import shards

    now = shards.load_manifest(shards.dataset_dir(cfg)).get("hash")
    changed = now not in (None, expected)
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([int(changed)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        changed = bool(flag.item())
    return str(now) if changed else None


REPORT_METRIC = "_report_metric"   # a metric the caller reads from every report (a sweep's `sweep.metric`)


def user_error_marker(cfg: dict) -> str | None:
    """Where a worker leaves the UserError that ended its attempt (`<paths.runs>/<run_name>.user_error`).

    Ray Train retries every worker error (`train.max_failures`, forever with -1): a retried config error would read
    the data and train an epoch again only to fail the same way. A retry that finds this file returns at once
    without reporting, and `fit` raises its message (`raise_user_error`). `fit` removes it before and after a run.
    None on object-store run folders (they retry in full)."""
    runs = cfg["paths"]["runs"]
    return None if is_uri(runs) else os.path.join(runs, cfg["run_name"] + ".user_error")


def raise_user_error(cfg: dict) -> None:
    """The UserError an attempt of this run left (`user_error_marker`), raised; nothing when there is none."""
    marker = user_error_marker(cfg)
    try:
        with open(marker, encoding="utf-8") as fh:   # (written whole: a temporary file renamed into place)
            text = fh.read()
    except (TypeError, OSError):
        return
    raise UserError(text)


def clock_start(history: list[dict], now: float) -> float:
    """When a run's clock started, for `elapsed_s` and `train.time_budget_s`: now for a new run; for a resumed one,
    `elapsed_s` of its last checkpointed epoch before now. The budget is the run's, not the attempt's: a failure
    mid-run used to start it over, so a resumed run trained longer than an unbroken one."""
    return now - (float(history[-1].get("elapsed_s", 0.0)) if history else 0.0)


def train_loop(cfg: dict) -> None:
    """The loop (`_train_loop`), with a config or data error (UserError) raised once per run, not per attempt."""
    marker = user_error_marker(cfg)
    if marker and os.path.exists(marker):
        return        # an earlier attempt's error: every worker of this one stops, `fit` raises it
    try:
        _train_loop(cfg)
    except UserError as err:
        if marker:
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(marker), exist_ok=True)
                tmp = f"{marker}.{os.getpid()}.tmp"     # each worker its own, renamed whole: a reader never sees half
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(str(err))
                os.replace(tmp, marker)
        raise


# What Tune adds to every result itself (training_iteration, time_total_s, ...): a sweep may select on them.
TUNE_RESULT_KEYS = frozenset({"training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore",
                              "iterations_since_restore", "timestamp", "timesteps_total", "episodes_total"})


def check_reported(metrics: dict, name: str | None, setting: str) -> None:
    """`name` (the setting `setting` chose: train.monitor, sweep.metric) must be one of the epoch's metrics (or, for
    a sweep, one Tune adds itself). A typo used to end the first epoch with a KeyError (train) or with Tune's
    advice to turn its metric check off (tune)."""
    if name and name not in metrics and not (setting == "sweep.metric" and name in TUNE_RESULT_KEYS):
        raise UserError(f"{setting}={name!r} is not a metric this run reports; it reports "
                        f"{', '.join(sorted(metrics))}: set {setting} to one of them")


def _train_loop(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    import logging

    if not cfg.get("verbose"):
        # Ray Train sets `ray.train` to DEBUG when it configures a worker's logging (after this runs) and its INFO
        # records ("Reporting training result N: ..." per epoch) reach the console; a level on `ray.train.v2`
        # survives that and holds for every logger below it
        for name in ("ray.train", "ray.train.v2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg = cfg["train"]
    seed = int(cfg.get("seed", 0))
    monitor, mode = tcfg["monitor"], tcfg.get("mode", "max")
    seed_everything(seed)
    task = load_task(cfg)
    data = task.build_data(cfg, rank, world)
    device = ray.train.torch.get_device() if world > 1 or torch.cuda.is_available() else torch.device("cpu")
    if data_changed(cfg, world, device):
        # Not an exception: Ray Train retries every worker error (up to train.max_failures, forever with -1), and
        # each retry would read the data again to stop again. `fit` sees the run end without a checkpoint and says why.
        if rank == 0:
            print("[train] the dataset was prepared again as this run started: stopping before the first step", flush=True)
        return
    model = built_model(task, cfg, data)
    model = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
    optimizer = instantiate(cfg["optim"])(params=model.parameters())
    amp = bool(tcfg.get("bf16", False)) and device.type == "cuda"
    # train.ema_decay: evaluate, keep and register an exponential moving average of the weights (updated after
    # every step) instead of the raw weights; the raw ones keep training. Same on every DDP rank (synced grads).
    ema_decay = float(tcfg.get("ema_decay") or 0.0)
    ema = copy.deepcopy(_unwrap(model)).requires_grad_(False).eval() if ema_decay else None

    start_epoch, best, best_state, bad_epochs, history = 0, None, None, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False, map_location="cpu")
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, bad_epochs, history = state["epoch"] + 1, state["best"], state["bad_epochs"], state["history"]
        best_state = state["best_model"]
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if state.get("rng") and rank == 0:
            _set_rng_state(state["rng"])  # (each epoch re-seeds from (seed, epoch, rank) anyway; see below)
        if rank == 0:
            print(f"[train] resumed from epoch {state['epoch']} (best {monitor}={best})", flush=True)

    from ecomray.train.tracking import Tracker

    tracker = Tracker(cfg) if rank == 0 else None          # TensorBoard (and MLflow when configured)
    fail_marker = os.path.join(cfg["paths"]["runs"], cfg["run_name"] + ".failed_once")
    t0, step = clock_start(history, time.time()), 0
    for epoch in range(start_epoch, int(tcfg["epochs"])):
        model.train()
        # Re-seed per (epoch, rank): dropout and sampling depend only on where we are, so a resumed run replays
        # exactly what an uninterrupted one does, on every rank.
        seed_everything(seed * 1_000_003 + epoch * 1_009 + rank)
        t_epoch, seen, loss_sum, n_batches = time.time(), 0, 0.0, 0
        batch_seed, batch_size = seed * 1000 + rank, int(tcfg["batch_size"])
        batches = task.train_batches(data, epoch, batch_seed, batch_size)
        if hasattr(task, "num_batches"):     # batches are made as they are used: an epoch never sits in memory
            n_local = int(task.num_batches(data, epoch, batch_seed, batch_size))
        else:
            batches = list(batches)
            n_local = len(batches)
        # DDP needs the same number of steps on every worker (their shards differ in size): take the minimum.
        n_steps = _min_over_workers(n_local) if world > 1 else n_local
        if n_steps == 0 and _any_worker(n_local > 0, world):
            # a worker without data (fewer shards than workers) made every worker take no step: nothing learnt
            raise UserError(f"epoch {epoch}: a training worker has no batch while another has {n_local}: the "
                            f"data is split over the {world} workers unevenly (fewer shards than workers?); "
                            f"prepare with more shards (prepare.shards) or train with fewer workers")
        budget = tcfg.get("time_budget_s")
        progress = Progress(f"[train] epoch {epoch}", n_steps, every_s=float(tcfg.get("progress_s") or 60),
                            enabled=rank == 0)
        for i, batch in enumerate(itertools.islice(batches, n_steps)):
            # a long epoch (one pass over a pretraining corpus) must not overrun the budget: look every
            # BUDGET_CHECK_STEPS steps (the same steps on every worker) and end the epoch early when it is spent
            if budget and i and i % BUDGET_CHECK_STEPS == 0 and \
                    _any_worker(time.time() - t0 >= float(budget), world):
                print(f"[train] time budget train.time_budget_s={budget} spent at step {i:,} of {n_steps:,} "
                      f"of epoch {epoch}", flush=True)
                break
            step += 1
            fail_at = tcfg.get("fail_at_step")
            if fail_at and step == int(fail_at) and not os.path.exists(fail_marker):
                open(fail_marker, "w").close()
                raise RuntimeError(f"debug: train.fail_at_step={fail_at} (raised once to test fault tolerance)")
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = task.loss_step(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
            optimizer.step()
            if ema is not None:
                update_ema(ema, _unwrap(model), ema_decay)
            loss_sum += float(loss.detach())
            n_batches += 1
            seen += len(next(iter(batch.values())))
            progress.update()
        train_s = time.time() - t_epoch
        # Before scoring: NaN weights made a ranking model look perfect, and a classifier's AUC raise
        diverged = _diverged(loss_sum / max(n_batches, 1), best, epoch, world)
        if diverged is not None:
            if rank == 0:
                print(f"[train] early stop: {diverged}; the best epoch so far is kept", flush=True)
            break
        scored = ema if ema is not None else _unwrap(model)           # the weights that are evaluated and kept
        metrics = {f"val/{k}": v for k, v in task.evaluate(scored, data, "val").items()}
        metrics.update({"epoch": epoch, "train/loss": loss_sum / max(n_batches, 1),
                        "samples_per_s": seen * world / max(train_s, 1e-9), "elapsed_s": time.time() - t0})
        check_reported(metrics, monitor, "train.monitor")
        improved = _better(metrics[monitor], best, mode)
        if improved:
            best, bad_epochs = metrics[monitor], 0
            best_state = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
        else:
            bad_epochs += 1
            decay_on_plateau(optimizer, tcfg.get("lr_plateau"))
        stop = tcfg.get("patience") is not None and bad_epochs >= int(tcfg["patience"])   # null: no early stop
        out_of_time = bool(budget) and _any_worker(time.time() - t0 >= float(budget), world)
        stop = stop or out_of_time
        metrics.update({"best/" + monitor: best, "stopped_early": float(stop)})
        check_reported(metrics, cfg.get(REPORT_METRIC), "sweep.metric")
        history.append({k: v for k, v in metrics.items()})
        if tracker is not None:
            tracker.log(metrics, epoch)
        if rank == 0:
            print(f"[train] epoch {epoch:3d}  loss {metrics['train/loss']:.4f}  {monitor} {metrics[monitor]:.4f}"
                  f"  best {best:.4f}  {metrics['samples_per_s']:,.0f} samples/s  {metrics['elapsed_s']:.1f}s", flush=True)
        in_process = int(cfg["scaling"].get("num_workers", 1)) == 0  # in-process reports keep the folder itself
        with (_KeptDir() if in_process else tempfile.TemporaryDirectory()) as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "best": best, "bad_epochs": bad_epochs, "history": history, "best_model": best_state,
                            "ema": ema.state_dict() if ema is not None else None, "rng": _rng_state()}, os.path.join(d, "state.pt"))
                with open(os.path.join(d, "meta.json"), "w") as fh:
                    json.dump(task.metadata(data), fh)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        if stop:
            if rank == 0:
                why = (f"time budget train.time_budget_s={budget} spent" if out_of_time
                       else f"no {monitor} improvement for {bad_epochs} epochs")
                print(f"[train] early stop: {why}", flush=True)
            break
    if tracker is not None:
        tracker.close()
