"""python -m jobs.batch_predict experiment=<name> [batch_predict.split=test]: score a whole prepared dataset offline.

next_item: top-K items for every user's history (the sequences built by the task's own code), one row per user
(`user_id`, `items`, `scores`). propensity: a purchase probability per row of the prepared shards (Ray Data
`read_parquet`), beside the id columns and the label. Both run Ray Data `map_batches(batch_format="pyarrow")`
over actors that load the registry version once (`ecomray.inference.load_model`) and call the task's `predict`,
the same function the Serve deployment calls, so a campaign built offline matches what the endpoint answers.
Writes Parquet and a `predictions.json` summary to `<paths.root>/predictions/<registry name>/`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from ecomray import registry
from ecomray.inference import load_model
from ecomray.runtime import UserError, to_plain, user_errors

MARKER = "predictions.json"


class Scorer:
    """A Ray Data actor: the registry version is loaded once, then every batch goes through `task.predict`."""

    def __init__(self, root: str, name: str, version: str, kind: str, k: int, exclude: bool,
                 keep: list[str]) -> None:
        self.loaded = load_model(root, name, version)
        self.kind, self.k, self.exclude, self.keep = kind, k, exclude, keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        lm = self.loaded
        if self.kind == "next_item":
            top = lm.task.predict(lm.model, lm.meta, batch["history"].to_pylist(), k=self.k,
                                  exclude_history=self.exclude)
            return pa.table({"user_id": batch["user_id"],
                             "items": pa.array([[i for i, _ in t] for t in top], pa.list_(pa.string())),
                             "scores": pa.array([[s for _, s in t] for t in top], pa.list_(pa.float32())),
                             "model_version": pa.array([lm.version] * batch.num_rows, pa.string())})
        probs = lm.task.predict(lm.model, lm.meta, batch)
        cols = {c: batch[c] for c in self.keep if c in batch.column_names}
        cols["probability"] = pa.array(probs, pa.float32())
        cols["model_version"] = pa.array([lm.version] * batch.num_rows, pa.string())
        return pa.table(cols)


def histories(vcfg: dict, split: str) -> pa.Table:
    """(user_id, history) per user with the task's own sequence code; `test`/`val` hold out the last 1/2 items
    (users with >= 3 items, as in evaluation), `all` keeps the whole sequence (what a campaign scores)."""
    from ecomray.data.prepare import load_manifest
    from ecomray.tasks.next_item import dataset_dir, read_sequences

    folder = dataset_dir(vcfg)
    files = [s["file"] for s in load_manifest(folder)["shards"]]
    df = read_sequences(folder, vcfg["task"], files)
    import polars as pl

    if split in ("val", "test"):
        cut = {"val": 2, "test": 1}[split]
        df = df.filter(pl.col("items").list.len() >= 3).with_columns(pl.col("items").list.head(pl.col("items").list.len() - cut))
    elif split != "all":
        raise UserError(f"batch_predict.split={split!r}: next_item takes all, val or test")
    return df.rename({"items": "history"}).to_arrow()


def run(cfg: DictConfig | dict) -> dict[str, Any]:
    import ray

    from ecomray.data.prepare import load_manifest
    from ecomray.runtime import init_ray
    from ecomray.train.driver import registry_name

    plain = to_plain(cfg)
    bp = plain["batch_predict"]
    root = plain["paths"]["registry"]
    name, ref = registry.parse_ref(bp.get("model") or registry_name(plain))
    version = registry.resolve(root, name, bp.get("version") or ref)
    loaded = load_model(root, name, version)
    vcfg = {**loaded.config, "paths": plain["paths"]}      # the version's own task and dataset, today's locations
    kind = vcfg["task"]["name"]
    split = str(bp.get("split", "all"))
    out = os.path.abspath(bp.get("out") or os.path.join(plain["paths"]["root"], "predictions", name))
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
        raise UserError(f"{out} exists and is not a predictions folder: choose batch_predict.out")
    t0 = time.time()
    init_ray(num_cpus=plain.get("ray", {}).get("num_cpus"))
    folder = os.path.join(plain["paths"]["data"], vcfg["dataset"]["name"])
    keep: list[str] = []
    if kind == "next_item":
        ds = ray.data.from_arrow(histories(vcfg, split))
    elif kind == "propensity":
        manifest = load_manifest(folder)
        ds = ray.data.read_parquet([os.path.join(folder, s["file"]) for s in manifest["shards"]])
        if split != "all":
            if split not in ("train", "val", "test"):
                raise UserError(f"batch_predict.split={split!r}: propensity takes all, train, val or test")
            ds = ds.filter(expr=f"split == '{split}'")
        keep = [*list(bp.get("keep_columns") or []), loaded.meta.get("label") or ""]
    else:
        raise UserError(f"batch_predict does not know task {kind!r} (next_item, propensity)")
    scored = ds.map_batches(Scorer, batch_format="pyarrow", batch_size=int(bp.get("batch_size", 512)),
                            fn_constructor_kwargs={"root": root, "name": name, "version": version, "kind": kind,
                                                   "k": int(bp.get("k", 10)),
                                                   "exclude": bool(bp.get("exclude_history", True)), "keep": keep},
                            compute=ray.data.ActorPoolStrategy(size=int(bp.get("actors", 1))),
                            num_cpus=float(bp.get("num_cpus_per_actor", 1)))
    work = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    scored.write_parquet(work)
    rows = sum(pq.ParquetFile(os.path.join(work, f)).metadata.num_rows
               for f in os.listdir(work) if f.endswith(".parquet"))
    summary = {"model": name, "version": version, "task": kind, "split": split, "rows": rows,
               "k": int(bp.get("k", 10)) if kind == "next_item" else None, "seconds": round(time.time() - t0, 2),
               "dataset": vcfg["dataset"]["name"]}
    with open(os.path.join(work, MARKER), "w") as fh:
        json.dump(summary, fh, indent=2)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.rename(work, out)
    print(f"[batch_predict] {name} {version} ({kind}, split {split}): {rows} rows -> {out} "
          f"in {summary['seconds']}s", flush=True)
    return {**summary, "out": out}


@hydra.main(version_base="1.3", config_path="../conf", config_name="batch_predict")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
