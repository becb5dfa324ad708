"""python -m jobs.batch_predict experiment=<name> [batch_predict.split=test]: score a whole prepared dataset offline.

The version's task says what to score (`batch_inputs`: prepared rows as they are, or a table it builds, such as
one history per user) and how (`batch_score`, over the same `predict` the endpoint calls). Ray Data runs
`map_batches(batch_format="pyarrow")` over actors that load the registry version once
(`ecomray.inference.load_model`), so a campaign built offline matches what the endpoint answers. Writes Parquet
and a `predictions.json` summary to `<paths.root>/predictions/<registry name>/`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from ecomray import registry
from ecomray.inference import load_model
from ecomray.runtime import (UserError, alive_nodes, bundles_that_fit, cannot_place, check_number, check_outside,
                             output_folder, to_plain, user_errors)
from ecomray.tasks import BATCH, supports

MARKER = "predictions.json"


class Scorer:
    """A Ray Data actor: the registry version is loaded once, then every batch goes through `task.batch_score`;
    the `keep` input columns and the model version are copied beside its output."""

    def __init__(self, root: str, name: str, version: str, options: dict, keep: list[str]) -> None:
        self.loaded = load_model(root, name, version)
        self.options, self.keep = options, keep
        if hasattr(self.loaded.task, "prepare_serving"):
            self.loaded.task.prepare_serving(self.loaded.model, self.loaded.meta)

    def __call__(self, batch: pa.Table) -> pa.Table:
        lm = self.loaded
        scored = lm.task.batch_score(lm.model, lm.meta, batch, self.options)
        if scored.num_rows != batch.num_rows:
            raise RuntimeError(f"{lm.task.__name__}.batch_score returned {scored.num_rows} rows for {batch.num_rows}")
        cols = {c: batch[c] for c in self.keep if c in batch.column_names and c not in scored.column_names}
        cols.update({c: scored[c] for c in scored.column_names})
        cols["model_version"] = pa.array([lm.version] * batch.num_rows, pa.string())
        return pa.table(cols)


def _try_first_rows(loaded: Any, inputs: Any, options: dict, given: dict, n: int = 8) -> None:
    """Score the first few rows in the driver, with the options, before Ray Data starts: options the family's
    `predict` refuses (`k: -1`, a misspelt key) are one error line here, not an actor's traceback per batch."""
    import pyarrow.compute as pc

    from ecomray.data import shards

    task = loaded.task
    known = getattr(task, "BATCH_OPTIONS", None)
    unknown = sorted(set(given) - set(known)) if known is not None else []
    if unknown:
        raise UserError(f"batch_predict.options: {task.__name__} takes no option(s) {unknown} "
                        f"(it reads {list(known) or 'none'})")
    sample = None
    if isinstance(inputs, shards.ShardScan):
        for f in inputs.files:                    # the first rows of the split, in the first file that has some
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                table = pa.Table.from_batches([batch])
                if inputs.split:
                    table = table.filter(pc.equal(table["split"], inputs.split))
                if table.num_rows:
                    sample = table
                    break
            if sample is not None:
                break
    else:
        sample = inputs
    if sample is None or sample.num_rows == 0:
        return
    if hasattr(task, "prepare_serving"):
        task.prepare_serving(loaded.model, loaded.meta)
    try:
        task.batch_score(loaded.model, loaded.meta, sample.slice(0, n), options)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"batch_predict.options={given}: {task.__name__} cannot score with {options}: "
                        f"{type(err).__name__}: {err}") from None


def _check_numbers(bp: dict) -> None:
    """Settings no run can start from fail here, before Ray starts (Ray Data said `Batch size can't be negative or 0`
    with a traceback, seconds in)."""
    check_number("batch_predict.batch_size", bp.get("batch_size", 512), lambda v: v >= 1, ">= 1", integer=True)
    check_number("batch_predict.actors", bp.get("actors", 1), lambda v: v >= 1, ">= 1", integer=True)
    check_number("batch_predict.num_cpus_per_actor", bp.get("num_cpus_per_actor", 1), lambda v: v > 0, "> 0")


def _check_actors(bp: dict, reads: bool) -> None:
    """Ray Data waits without a word for actors no node can hold, and for read tasks when the actors hold every CPU
    (`actors=2` on a 2-CPU machine made no progress at all). On a Ray this process started that is an error; on a
    cluster it joined, a warning (an autoscaler may add nodes)."""
    n, per = int(bp.get("actors", 1)), float(bp.get("num_cpus_per_actor", 1))
    nodes = alive_nodes()
    cpus = sum(float(node.get("CPU", 0.0)) for node in nodes)
    fit = bundles_that_fit({"CPU": per}, nodes)
    if fit >= n and (not reads or cpus - n * per >= 1):
        return
    why = (f"batch_predict.actors={n} x num_cpus_per_actor={per:g}" + (" plus a CPU to read the shards" if reads
                                                                        else "") + f", but the Ray cluster has {cpus:g} CPU(s)")
    room = max(cpus - (1 if reads else 0), 0)
    cannot_place("batch_predict", why, f"choose fewer actors or CPUs per actor (at most {room:g} CPU(s) for actors "
                 f"here)" if room > 0 else "start Ray with more CPUs (ray.num_cpus=2: Ray Data's reads and the actors "
                 "share them)")


class _ProgressOnly(logging.Filter):
    """Ray Data's console records at WARNING and above, and its "Total Progress: rows done/total" line (every 10 s
    when stdout is not a terminal, e.g. under `ray job submit`; a terminal gets its progress bars instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or (record.filename == "logging_progress.py"
                                                     and record.getMessage().startswith("Total Progress"))


def _quiet_ray_data() -> None:
    """Ray Data's console down to warnings and its progress line (everything stays in its log files): a 3,000-row
    scoring printed 15 lines of execution plans, resource tables and per-operator blocks around our one line. Also
    its "no available CPUs ... will hang" warning, which it prints after a write has finished, while the scoring
    actors still hold their CPUs (`_check_actors` has already refused settings that could not run)."""
    import ray.data  # noqa: F401  (its import configures the "ray.data" logger's handlers: first, then filter them)
    from ray.util.debug import log_once

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.addFilter(_ProgressOnly())
    log_once("cpu_warning")         # (Ray Data's own key for that warning: marked as already said)


def run(cfg: DictConfig | dict) -> dict[str, Any]:
    plain = to_plain(cfg)
    bp = plain["batch_predict"]
    _check_numbers(bp)
    root = plain["paths"]["registry"]
    name, ref = registry.parse_ref(bp.get("model") or registry.model_name(plain))
    version = registry.resolve(root, name, bp.get("version") or ref)
    # held until the job ends: `registry gc` never deletes the version between this resolve and the actors' loads
    with registry.holding(root, name, version, f"batch_predict-{socket.gethostname()}-{os.getpid()}"):
        return _run(plain, bp, root, name, version)


def _run(plain: dict, bp: dict, root: str, name: str, version: str) -> dict[str, Any]:
    loaded = load_model(root, name, version)
    if not supports(loaded.task, BATCH):
        raise UserError(f"{name} {version}: task {loaded.task.__name__} has no batch_inputs/batch_score")
    vcfg = {**loaded.config, "paths": plain["paths"]}      # the version's own task and dataset, today's locations
    split = str(bp.get("split", "all"))
    if not isinstance(bp.get("options") or {}, dict):
        raise UserError(f"batch_predict.options={bp['options']!r}: write a mapping, e.g. 'batch_predict.options={{k: 20}}'")
    options = {**(vcfg["task"].get("predict") or {}), **(bp.get("options") or {})}
    out = os.path.abspath(bp.get("out") or os.path.join(plain["paths"]["root"], "predictions", name))
    check_outside(out, root, "batch_predict.out", "the registry")
    with output_folder(out, "batch_predict.out", MARKER, "a predictions folder",
                       lambda m: print(f"[batch_predict] {m}", flush=True),
                       owns=lambda f: f == MARKER or f.endswith(".parquet")) as work:
        summary = _score(plain, bp, loaded, vcfg, root, name, version, split, options, work)
    print(f"[batch_predict] {name} {version} ({summary['task']}, split {split}): {summary['rows']} rows -> {out} "
          f"in {summary['seconds']}s", flush=True)
    return {**summary, "out": out}


def _score(plain: dict, bp: dict, loaded: Any, vcfg: dict, root: str, name: str, version: str, split: str,
           options: dict, work: str) -> dict[str, Any]:
    """Score with Ray Data into the folder `work` (with the summary in it, last); returns the summary."""
    import ray

    from ecomray.data import shards
    from ecomray.runtime import init_ray

    shards.require(vcfg, check_options=False)   # new rows, scored with the version's own features
    t0 = time.time()
    try:
        inputs = loaded.task.batch_inputs(vcfg, split)
    except ValueError as err:
        raise UserError(f"batch_predict.split={split!r}: {err}") from None
    _try_first_rows(loaded, inputs, options, bp.get("options") or {})
    init_ray(num_cpus=plain.get("ray", {}).get("num_cpus"), verbose=bool(plain.get("verbose")),
             dashboard=plain.get("ray", {}).get("include_dashboard"))
    _check_actors(bp, reads=isinstance(inputs, shards.ShardScan))
    if not plain.get("verbose"):
        _quiet_ray_data()
    if isinstance(inputs, shards.ShardScan):
        ds = ray.data.read_parquet(inputs.files)
        if inputs.split:
            from ray.data.expressions import col

            ds = ds.filter(expr=col("split") == inputs.split)
    else:
        ds = ray.data.from_arrow(inputs)
    scored = ds.map_batches(Scorer, batch_format="pyarrow", batch_size=int(bp.get("batch_size", 512)),
                            fn_constructor_kwargs={"root": root, "name": name, "version": version,
                                                   "options": options, "keep": list(bp.get("keep_columns") or [])},
                            compute=ray.data.ActorPoolStrategy(size=int(bp.get("actors", 1))),
                            num_cpus=float(bp.get("num_cpus_per_actor", 1)))
    scored.write_parquet(work)
    os.makedirs(work, exist_ok=True)       # Ray Data writes no folder for no rows
    rows = sum(pq.ParquetFile(os.path.join(work, f)).metadata.num_rows
               for f in os.listdir(work) if f.endswith(".parquet"))
    if rows == 0:
        raise UserError(f"{vcfg['dataset']['name']}: no rows to score in split {split!r}; choose another "
                        f"batch_predict.split")
    summary = {"model": name, "version": version, "task": vcfg["task"]["name"], "split": split, "rows": rows,
               "options": options, "seconds": round(time.time() - t0, 2), "dataset": vcfg["dataset"]["name"]}
    with open(os.path.join(work, MARKER), "w") as fh:      # last: a folder with the marker is complete
        json.dump(summary, fh, indent=2)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="batch_predict")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
