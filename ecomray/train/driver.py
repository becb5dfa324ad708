"""The training driver: build a TorchTrainer from config, fit, score the best model on val and test, register it.

`fit(cfg)` is what `jobs.train` runs and what a Tune trial runs: one driver for both. `evaluate_checkpoint` scores
(and registers) the best weights of a Train checkpoint: `fit` uses it, and so does the tune job for the sweep's winner.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable

import torch

from ecomray import registry
from ecomray.data import shards
from ecomray.inference import pin_init_from
from ecomray.runtime import (UserError, alive_nodes, bundles_that_fit, cannot_place, check_number, check_writable,
                             is_uri, user_error_in)
from ecomray.tasks import key_metrics, load_task
from ecomray.train.loop import (DATA_HASH, data_changed, raise_user_error, release_kept_checkpoint, train_loop,
                                user_error_marker)


def trainer(cfg: dict, callbacks: list | None = None, train_fn: Callable[[dict], None] | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    sc = dict(cfg["scaling"])
    backend = sc.pop("backend", None) or ("nccl" if sc.get("use_gpu") else "gloo")
    tcfg = cfg["train"]
    return TorchTrainer(
        train_fn or train_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(**sc),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(
            storage_path=cfg["paths"]["runs"], name=cfg["run_name"], callbacks=callbacks,
            # WARNING: Ray Train's INFO lines (a 300-character line per report) and its copy of every print stay in
            # its log files; the loop's own epoch lines (prints) still reach the console, once.
            logging_config=LoggingConfig(log_level="INFO" if cfg.get("verbose") else "WARNING"),
            # Ray Train turns a worker's print() into a log record and also prints it: every epoch line twice,
            # with its INFO records beside them. Without the patch a print is a plain print, once.
            worker_runtime_env=None if cfg.get("verbose") else {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                                         "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}},
            failure_config=FailureConfig(max_failures=int(tcfg.get("max_failures", 0))),
            # Ray keeps the `num_to_keep` best by the monitored metric, and always the latest (the one a restart
            # resumes from); every checkpoint also carries the best weights so far, which is what fit() registers.
            checkpoint_config=CheckpointConfig(num_to_keep=int(tcfg.get("checkpoints_to_keep", 2)),
                                               checkpoint_score_attribute=tcfg["monitor"],
                                               checkpoint_score_order=tcfg.get("mode", "max"))))


def worker_bundle(scaling: dict) -> dict[str, float]:
    """What one Train worker reserves, as Ray Train's ScalingConfig reads `resources_per_worker`: none given means
    {CPU: 1}, or {GPU: 1} with `use_gpu` (no CPU); a given dict as it is (zeros dropped), plus GPU: 1 with
    `use_gpu` when it names no GPU."""
    given = scaling.get("resources_per_worker")
    if given is None:
        per = {"GPU": 1.0} if scaling.get("use_gpu") else {"CPU": 1.0}
    else:
        per = {k: float(v or 0) for k, v in given.items()}
    if scaling.get("use_gpu"):
        per.setdefault("GPU", 1.0)
    return {k: v for k, v in per.items() if v > 0}


def check_placement(cfg: dict) -> None:
    """Ray Train waits without a word for workers that no node can hold (`scaling=gpu1` on a machine without a
    GPU). So look first: on a Ray this process started, an impossible request is an error; on a cluster it joined
    (RAY_ADDRESS, a `ray start` cluster) or inside a Tune trial, a warning, since an autoscaling cluster adds
    nodes."""
    import ray

    n = int(cfg["scaling"].get("num_workers", 1))
    bundle = worker_bundle(cfg["scaling"])
    nodes = alive_nodes()
    fit_now = bundles_that_fit(bundle, nodes)
    if fit_now >= n:
        return
    total = ray.cluster_resources()
    have = {k: total.get(k, 0.0) for k in bundle}
    why = (f"scaling: {n} Train worker(s) of {bundle} each, but the Ray cluster's {len(nodes)} node(s) can hold "
           f"{fit_now} (cluster total {have})")
    cannot_place("train", why, "choose a scaling that fits this machine (scaling=cpu1, scaling=cpu2, or "
                 "scaling.num_workers / scaling.resources_per_worker)", then=" and choose another scaling")


def check_train_config(cfg: dict) -> None:
    """The numbers a run cannot start from, named before Ray starts (they used to fail deep inside a worker: a
    ZeroDivisionError for batch_size=0, torch's 'Invalid learning rate' for a negative lr)."""
    t, optim, sc = cfg.get("train") or {}, cfg.get("optim") or {}, cfg.get("scaling") or {}
    check_number("train.epochs", t.get("epochs"), lambda v: v >= 1, ">= 1", integer=True)
    check_number("train.batch_size", t.get("batch_size"), lambda v: v >= 1, ">= 1", integer=True)
    if t.get("patience") is not None:
        check_number("train.patience", t["patience"], lambda v: v >= 1, ">= 1", integer=True)
    if t.get("time_budget_s") is not None:
        check_number("train.time_budget_s", t["time_budget_s"], lambda v: v > 0, "> 0 (or null: no limit)")
    if "lr" in optim:
        check_number("optim.lr", optim["lr"], lambda v: v > 0, "> 0")
    if optim.get("weight_decay") is not None:
        check_number("optim.weight_decay", optim["weight_decay"], lambda v: v >= 0, ">= 0")
    check_number("scaling.num_workers", sc.get("num_workers", 1), lambda v: v >= 0,
                 ">= 0 (0: in the driver process)", integer=True)
    # (each of these used to be a traceback from Ray or torch, or worse, a run that registered garbage: a negative
    # grad_clip turned every step uphill; ema_decay=1 kept the untrained weights as the ones scored and registered)
    if t.get("mode", "max") not in ("max", "min"):
        raise UserError(f"train.mode={t.get('mode')!r}: max or min (whether a larger train.monitor is better)")
    check_number("train.checkpoints_to_keep", t.get("checkpoints_to_keep", 2), lambda v: v >= 1, ">= 1", integer=True)
    check_number("train.max_failures", t.get("max_failures", 0), lambda v: v >= -1, ">= 0 (-1: retry for ever)",
                 integer=True)
    check_number("seed", cfg.get("seed", 0), lambda v: 0 <= v < 2**32, "in 0 .. 2**32-1", integer=True)
    if t.get("grad_clip") is not None:
        check_number("train.grad_clip", t["grad_clip"], lambda v: v > 0, "> 0 (a max gradient norm; null: none)")
    if t.get("ema_decay") is not None:
        check_number("train.ema_decay", t["ema_decay"], lambda v: 0 <= v < 1, "in [0, 1) (null or 0: no EMA)")
    plateau = t.get("lr_plateau")
    if plateau is not None:
        if not isinstance(plateau, dict):
            raise UserError(f"train.lr_plateau={plateau!r}: a mapping such as {{factor: 0.1, min_lr: 1.0e-6}}, or null")
        check_number("train.lr_plateau.factor", plateau.get("factor", 0.1), lambda v: 0 < v < 1, "in (0, 1)")
        check_number("train.lr_plateau.min_lr", plateau.get("min_lr", 0.0), lambda v: v >= 0, ">= 0")
    for key in ("registry_name", "run_name"):      # a name is one folder: `../x` wrote outside paths.runs
        value = cfg.get(key)
        if value is not None and (not isinstance(value, str) or not registry.valid_name(value)):
            raise UserError(f"{key}={value!r}: letters, digits, '_', '.' and '-' (one folder name, not a path)")


# What a resumed run must keep: the settings that decide what its checkpoint's weights and optimizer state mean.
# (Everything else may change: how long and where it runs, tracking, and the other jobs' sections of a pipeline.)
RESUME_KEEPS = ("seed", "registry_name", "task", "model", "optim", "dataset", "train")
RESUME_FREE = ("train.epochs", "train.time_budget_s", "train.patience", "train.max_failures", "train.fail_at_step",
               "train.checkpoints_to_keep", "train.progress_s", "dataset.path")
RUN_RECORD = "ecomray_run.json"   # in the run folder: the settings it started with; once registered, the version


def fit(cfg: dict, callbacks: list | None = None, register: bool = True, evaluate: bool = True,
        train_fn: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train, then evaluate the best epoch's model on val and test and (optionally) register it.

    A Tune trial passes `evaluate=False`: it only trains (its metrics reach Tune through the callbacks) and returns
    its checkpoint; the tune job scores and registers the winner alone, with `evaluate_checkpoint`. `train_fn` wraps
    the one training loop (the tune job's wrapper records the trial's placement group); default `train_loop`.

    A run named by the user (`run_name=<it>`) that runs on Ray Train workers is one job at a time (a second is
    refused: two jobs mixed their checkpoints in one folder), resumes only with the settings and data it started
    with, and once finished and registered is not registered again by a re-run with nothing left to train. An
    in-process run (`scaling=inproc`) keeps no checkpoint to resume: each run of it trains from the start."""
    from ecomray.runtime import one_at_a_time

    named = bool(cfg.get("run_name"))
    cfg = {**cfg, "run_name": cfg.get("run_name") or f"{registry.model_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"}
    check_train_config(cfg)        # numbers (and names) no run can start from, before anything is written
    runs = cfg["paths"]["runs"]
    in_process = int(cfg["scaling"].get("num_workers", 1)) == 0
    if not named and not is_uri(runs) and not in_process and not cfg.get("_tune_trial"):
        cfg["run_name"] = _claim(runs, cfg["run_name"])   # two runs started in one second: each its own folder
    if cfg.get("_tune_trial") or is_uri(runs) or not named or in_process:
        try:
            return _fit(cfg, callbacks, register, evaluate, train_fn)
        except BaseException:
            _remove_empty_run(cfg)      # (the folder _claim made, when the run failed before Ray Train filled it)
            raise
    check_writable(runs, "paths.runs")
    os.makedirs(os.path.join(runs, ".locks"), exist_ok=True)
    with one_at_a_time(os.path.join(runs, ".locks", f"{cfg['run_name']}.lock"), f"train run {cfg['run_name']}",
                       busy="wait for it to finish, or choose another run_name"):
        folder = os.path.join(runs, cfg["run_name"])
        record_path = os.path.join(folder, RUN_RECORD)
        record = _read_record(record_path)
        # a run to resume: one with a checkpoint (an attempt killed before its first one left only its settings)
        resuming = bool(record) and os.path.isdir(folder) and any(
            name.startswith("checkpoint_") for name in os.listdir(folder))
        if resuming:
            cfg = _check_resume(cfg, record)
            done = _finished(cfg, record) if register and evaluate else None
            if done is not None:
                return done
        out = _fit(cfg, callbacks, register, evaluate, train_fn, record_path=None if resuming else record_path)
        if out.get("version"):
            history = out.get("history") or [{}]
            t = cfg["train"]
            _write_record(record_path, {**_read_record(record_path), "registered": {
                "name": out["name"], "version": out["version"], "epochs_run": len(history),
                "stopped": bool(history[-1].get("stopped_early")), "epochs": t.get("epochs"),
                "patience": t.get("patience"), "time_budget_s": t.get("time_budget_s")}})
        return out


def _claim(runs: str, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ...: the first whose folder this process creates (mkdir is atomic: two runs
    started in the same second used to share one folder). An empty folder left by a failed start is removed."""
    check_writable(runs, "paths.runs")
    for n in range(1, 1000):
        candidate = name if n == 1 else f"{name}-{n}"
        try:
            os.mkdir(os.path.join(runs, candidate))
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"paths.runs={runs}: no free run folder named {name}[-N]; pass run_name=<a new name>")


def _read_record(path: str) -> dict[str, Any]:
    import json

    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _write_record(path: str, record: dict[str, Any]) -> None:
    import json

    from ecomray.runtime import write_atomic

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2, default=str))


def _resumable(cfg: dict) -> dict[str, Any]:
    """The settings a resume must keep (`RESUME_KEEPS` without `RESUME_FREE`), as JSON values. `model.init_from`
    is compared as written: the version it resolved to when the run started is kept on resume."""
    import copy
    import json

    out = copy.deepcopy({k: cfg.get(k) for k in RESUME_KEEPS})
    for key in RESUME_FREE:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return json.loads(json.dumps(out, default=str))


def _check_resume(cfg: dict, record: dict[str, Any]) -> dict[str, Any]:
    """`cfg` for resuming the run `record` describes: refused if it changes settings a resume must keep or its data
    was prepared again; the `model.init_from` version the run pinned when it started is kept."""
    from ecomray.data.shards import flat_diff

    then = _resumable(record.get("settings") or {})   # (a record from before a key became free is read alike)
    now = _resumable(cfg)
    if "init_from" not in ((record.get("settings") or {}).get("model") or {}):
        (now.get("model") or {}).pop("init_from", None)
        (then.get("model") or {}).pop("init_from", None)
    differ = flat_diff(now, then)
    if differ:
        shown = "; ".join(f"{k}: now {a!r}, the run has {b!r}" for k, a, b in differ[:4])
        raise UserError(f"run_name={cfg['run_name']} is a run with other settings ({shown}"
                        f"{'; ...' if len(differ) > 4 else ''}): resuming it would continue its weights and "
                        f"optimizer under new settings; choose another run_name for a new run")
    try:
        current = shards.load_manifest(shards.dataset_dir(cfg)).get("hash")
    except UserError:
        current = None      # not prepared: the run itself says so, with the command to run
    if record.get("data_manifest_hash") and current and current != record["data_manifest_hash"]:
        raise UserError(f"run_name={cfg['run_name']} trained on another preparation of {shards.dataset_dir(cfg)} "
                        f"(manifest hash {record['data_manifest_hash'][:12]}, now {current[:12]}): choose another "
                        f"run_name for a run on this data")
    if record.get("init_from"):
        cfg = {**cfg, "model": {**cfg["model"], "init_from": record["init_from"]}}
    return cfg


def _finished(cfg: dict, record: dict[str, Any]) -> dict[str, Any] | None:
    """The registered result of a run that has nothing left to train (its epochs done, or stopped early or by its
    time budget under the same patience and budget), else None. A re-run used to resume at the end, train nothing
    and register the same weights as a new version."""
    done, t = record.get("registered"), cfg["train"]
    if not done:
        return None

    def more(key: str) -> bool:       # null: no limit, more than any number; a key an older record lacks: as now
        old, new = done.get(key, t.get(key)), t.get(key)
        return old is not None and (new is None or new > old)

    if done.get("stopped"):
        if more("patience") or more("time_budget_s"):
            return None          # it stopped early or on its budget: more patience or time continues it
    elif int(done.get("epochs_run", 0)) < int(t["epochs"]):
        return None              # it ran its epochs: more epochs continue it
    try:
        found = registry.load(cfg["paths"]["registry"], done["name"], done["version"], state=False)
    except UserError:
        return None        # the version is gone (gc): score and register the run's best weights again
    if found["config"].get("run_name") != cfg["run_name"]:
        return None        # another registry, or the number now names another run's model
    print(f"[train] run {cfg['run_name']} has finished ({done['epochs_run']} epoch(s)) and is registered as "
          f"{done['name']} {done['version']}: nothing to train ("
          + ("it stopped early or on its time budget: raise train.patience or train.time_budget_s to continue it"
             if done.get("stopped") else "raise train.epochs to continue it") + ", or choose another run_name)",
          flush=True)
    return {"metrics": found["metrics"], "history": [], "run_name": cfg["run_name"], "name": done["name"],
            "version": done["version"], "already_registered": True}


def _fit(cfg: dict, callbacks: list | None, register: bool, evaluate: bool,
         train_fn: Callable[[dict], None] | None, record_path: str | None = None) -> dict[str, Any]:
    from ecomray.runtime import init_ray

    settings = _resumable(cfg)    # as written: model.init_from before it is pinned
    cfg = pin_init_from(cfg)       # one starting version for the workers, the scoring and the registered config
    load_task(cfg)                 # a wrong module path fails here, in the driver, not in every worker
    manifest = shards.require(cfg)   # so does a dataset never prepared (with the command to run)
    data_hash = manifest.get("hash")
    split_rows = (manifest.get("split") or {}).get("rows") or {}
    extra = (cfg.get("task") or {}).get("extra_train")     # tasks that add other datasets' rows to the train split
    if not extra and (manifest.get("rows_out") == 0 or (split_rows and not split_rows.get("train"))):
        raise UserError(f"{shards.dataset_dir(cfg)} has no training rows (rows out {manifest.get('rows_out')}, "
                        f"split {split_rows}; a given split's values must be train, val or test): nothing to train on")
    check_writable(cfg["paths"]["runs"], "paths.runs")    # and folders it would write to only at the end
    if register and evaluate:
        check_writable(cfg["paths"]["registry"], "paths.registry")
    if int(cfg["scaling"].get("num_workers", 1)) > 0:
        init_ray(num_cpus=cfg.get("ray", {}).get("num_cpus"), verbose=bool(cfg.get("verbose")),
                 dashboard=cfg.get("ray", {}).get("include_dashboard"))  # no-op inside a Tune trial: Ray is already up
        check_placement(cfg)
    if record_path:        # a new named run: the settings and data it starts with, which a resume must keep
        _write_record(record_path, {"settings": settings, "init_from": (cfg.get("model") or {}).get("init_from"),
                                    "data_manifest_hash": data_hash})
    t0 = time.time()
    in_process = int(cfg["scaling"].get("num_workers", 1)) == 0
    marker = user_error_marker(cfg)   # a resumed run (a Tune trial) starts without its last attempt's error
    _remove(marker)
    try:
        try:   # the workers check that the data they read is the data checked here (`loop.DATA_HASH`)
            result = trainer({**cfg, DATA_HASH: data_hash}, callbacks, train_fn).fit()
        except Exception as err:  # noqa: BLE001 - a worker's UserError is the run's error, one clear line
            _remove_empty_run(cfg)
            raise user_error_in(err) or err
        if os.path.exists(marker or ""):  # an attempt's UserError; the retry stopped on it (`loop.train_loop`)
            _remove_empty_run(cfg)
            raise_user_error(cfg)
        if result.checkpoint is None:     # the workers stopped before the first step
            _remove_empty_run(cfg)
            now = data_changed({**cfg, DATA_HASH: data_hash})
            if now:
                raise UserError(f"{shards.dataset_dir(cfg)} was prepared again as this run started (manifest hash "
                                f"{str(data_hash)[:12]} -> {now[:12]}): nothing was trained; start the run again")
            raise RuntimeError(f"run {cfg['run_name']} ended without a checkpoint")
        if not evaluate:   # the caller reads the checkpoint later (a Tune trial's result)
            in_process = False
            return {"run_name": cfg["run_name"], "checkpoint": result.checkpoint.path, "train_seconds": time.time() - t0}
        return evaluate_checkpoint(cfg, result.checkpoint, register=register, train_seconds=time.time() - t0,
                                   data_hash=data_hash)
    finally:
        _remove(marker)
        if in_process:     # its checkpoints are temporary folders, not copies in the run folder
            release_kept_checkpoint()


def _remove_empty_run(cfg: dict) -> None:
    """The folder of a run that failed before its first checkpoint holds nothing to resume or read (Ray's storage
    marker, an empty TensorBoard file): removed, so failed attempts do not pile up in paths.runs. A run with a
    checkpoint is kept (`run_name=<it>` resumes it); a Tune trial's folder is Tune's."""
    import shutil

    folder = os.path.join(cfg["paths"]["runs"], cfg["run_name"])
    if cfg.get("_tune_trial") or is_uri(folder) or not os.path.isdir(folder):
        return
    if not any(name.startswith("checkpoint_") for name in os.listdir(folder)):
        shutil.rmtree(folder, ignore_errors=True)


def _remove(path: str | None) -> None:
    if path:
        with contextlib.suppress(OSError):   # (in a `finally`: never in place of the run's own error)
            os.remove(path)


def evaluate_checkpoint(cfg: dict, checkpoint: Any, register: bool = True, train_seconds: float | None = None,
                        extra: dict | None = None, data_hash: str | None = None) -> dict[str, Any]:
    """Load the best weights from a Train checkpoint (a `ray.train.Checkpoint` or its path; its `state.pt` holds
    `best_model`), score them on val and test, and (optionally) register them with `extra` lineage.

    `data_hash`: the manifest hash of the data the weights trained on. If the dataset was prepared again since
    (`jobs.prepare ... overwrite=true` during a long run), its val and test rows may be ones the model trained on,
    and the lineage would name data the model never saw: an error, before anything is scored or registered.

    Shared by `fit` and by the tune job, which registers only the sweep's winner."""
    from ray.train import Checkpoint

    manifest = shards.load_manifest(shards.dataset_dir(cfg))
    if data_hash is not None and manifest.get("hash") not in (None, data_hash):
        raise UserError(f"{shards.dataset_dir(cfg)} was prepared again while this run trained (manifest hash "
                        f"{data_hash[:12]} -> {str(manifest.get('hash'))[:12]}): its val/test split may hold rows "
                        f"the model trained on, so it is neither scored nor registered; train again on the new data")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(str(checkpoint))
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), weights_only=False, map_location="cpu")
    task = load_task(cfg)
    data = task.build_data(cfg, 0, 1)
    model = task.build_model(cfg, data)
    model.load_state_dict(state["best_model"])
    metrics = {f"val/{k}": v for k, v in task.evaluate(model, data, "val").items()}
    metrics.update({f"test/{k}": v for k, v in task.evaluate(model, data, "test").items()})
    metrics.update({"epochs_run": len(state["history"]),
                    "best_epoch": max(range(len(state["history"])), key=lambda i: _score(state["history"][i], cfg))})
    if train_seconds is not None:
        metrics["train_seconds"] = train_seconds
    out: dict[str, Any] = {"metrics": metrics, "history": state["history"], "run_name": cfg.get("run_name")}
    keys = [k for k in key_metrics(task) if f"val/{k}" in metrics] or \
        [k.split("/", 1)[1] for k in metrics if k.startswith("val/")]       # (an objective without the key metrics)
    print("[train] best model: " + "  ".join(f"{s}/{k} {metrics[f'{s}/{k}']:.4f}" for s in ("val", "test")
                                           for k in keys[:3] if f"{s}/{k}" in metrics), flush=True)
    if register:
        name = registry.model_name(cfg)
        version = registry.register(cfg["paths"]["registry"], name, model.state_dict(), cfg, metrics,
                                    task.metadata(data), registry.lineage(cfg, manifest), extra=extra,
                                    info=registry.version_info(cfg, key_metrics(task)))
        print(f"[train] registered {name} {version} in {cfg['paths']['registry']}", flush=True)
        from ecomray.train.tracking import record_registration

        record_registration(cfg, name, version)
        out.update(name=name, version=version)
    return out


def _score(h: dict, cfg: dict) -> float:
    v = h[cfg["train"]["monitor"]]
    if not math.isfinite(v):         # a diverged epoch is never the best (the loop never keeps one)
        return -math.inf
    return v if cfg["train"].get("mode", "max") == "max" else -v
