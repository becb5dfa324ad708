"""The one reader of prepared datasets: where a shard set lives, its manifest, its shard files.

`jobs.prepare` writes `<paths.data>/<dataset.name>/` (`manifest.json`, `shards/part-*.parquet`,
`quarantine.parquet`); every reader (the task families, evaluation, batch prediction, the tune job) finds it here,
so the writer and the readers can never disagree about the folder.

    folder = dataset_dir(cfg)                 # the config's own dataset
    folder = dataset_dir(cfg, "shoppers")     # another prepared dataset under the same paths.data
    manifest = load_manifest(folder)
    files = shard_files(folder, manifest)     # absolute paths, in shard order
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ecomray.runtime import UserError, is_uri


def dataset_dir(cfg: dict, name: str | None = None) -> str:
    """`<paths.data>/<name>`; `name` defaults to the config's `dataset.name`. To put prepared data elsewhere, set
    `paths.data` (or `paths.root`): there is no second knob that only the writer would see."""
    name = name or cfg["dataset"]["name"]
    root = cfg["paths"]["data"]
    return f"{root.rstrip('/')}/{name}" if is_uri(root) else os.path.join(root, name)


def prepare_command(cfg: dict, name: str | None = None) -> str:
    """The exact command that prepares the dataset a job is missing."""
    import shlex

    own = name in (None, cfg["dataset"]["name"])
    name = name or cfg["dataset"]["name"]
    root = cfg["paths"].get("root")
    try:
        default = os.path.abspath("runs")
    except FileNotFoundError:       # the working folder is gone (a Ray job's, cleaned up): no default to compare
        default = None
    where = f" paths.root={shlex.quote(str(root))}" if root and root != default else ""
    path = cfg["dataset"].get("path") if own else None      # a user's files (dataset=events): where they are
    path = None if path == "???" else path
    choice = (cfg.get("choices") or {}).get("dataset") if own else None   # the config that names it otherwise
    which = f"dataset={choice} dataset.name={name}" if choice and choice != name else f"dataset={name}"
    return f"python -m jobs.prepare {which}{where}" + (f" dataset.path={shlex.quote(str(path))}" if path else "")


def _read_text(path: str) -> str | None:
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(inner) as fh:
            return fh.read().decode()
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return fh.read()


def has_manifest(folder: str) -> bool:
    return _read_text(os.path.join(folder, "manifest.json") if not is_uri(folder)
                      else f"{folder}/manifest.json") is not None


def load_manifest(folder: str, hint: str | None = None) -> dict[str, Any]:
    """A prepared dataset's manifest, with a clear error (and the command to run) when there is none."""
    text = _read_text(os.path.join(folder, "manifest.json") if not is_uri(folder) else f"{folder}/manifest.json")
    name = os.path.basename(folder.rstrip("/"))
    command = hint or f"python -m jobs.prepare dataset={name}"
    if text is None:
        raise UserError(f"no prepared dataset at {folder} (missing manifest.json): run `{command}` first")
    try:
        manifest = json.loads(text)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("no list of shards")
    except ValueError as err:
        raise UserError(f"{folder}/manifest.json is damaged ({str(err)[:120]}): prepare the dataset again, "
                        f"`{command} overwrite=true`") from None
    return manifest


def shard_files(folder: str, manifest: dict | None = None, hint: str | None = None) -> list[str]:
    """Absolute paths (or URIs) of a prepared dataset's shard files, in shard order. On a local disk, a listed
    shard that is missing or whose size is not the one prepare recorded is an error naming the files (a partial
    copy, a deleted file), before any reader meets a Parquet error."""
    manifest = manifest if manifest is not None else load_manifest(folder)
    if is_uri(folder):
        return [f"{folder.rstrip('/')}/{s['file']}" for s in manifest["shards"]]
    files, bad = [], []
    for s in manifest["shards"]:
        path = os.path.join(folder, s["file"])
        files.append(path)
        if not os.path.isfile(path):
            bad.append(f"{s['file']} (missing)")
        elif s.get("bytes") is not None and os.path.getsize(path) != s["bytes"]:
            bad.append(f"{s['file']} ({os.path.getsize(path):,} bytes, prepared {s['bytes']:,})")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        command = hint or f"python -m jobs.prepare dataset={os.path.basename(folder)}"
        raise UserError(f"{folder}: shard file(s) not as prepared: {shown}; prepare the dataset again, "
                        f"`{command} overwrite=true`")
    return files


def require(cfg: dict, name: str | None = None, check_options: bool = True) -> dict[str, Any]:
    """The manifest of the dataset a job needs, checked in the driver before Ray starts.

    A missing built-in synthetic shop is prepared on the spot (it needs no download); any other missing dataset
    is one error line with the exact `jobs.prepare` command."""
    folder = dataset_dir(cfg, name)
    if has_manifest(folder):
        try:
            manifest = load_manifest(folder)
        except UserError:   # a damaged one: the same error with the command for this run (built only when needed)
            return load_manifest(folder, hint=prepare_command(cfg, name))
        if check_options and name in (None, cfg["dataset"]["name"]):
            _check_options(cfg, manifest, folder)
        return manifest
    dataset = cfg["dataset"]
    if (name in (None, dataset["name"])) and dataset.get("adapter") == "synthetic" and cfg.get("prepare"):
        from ecomray.data.prepare import run as prepare

        print(f"[data] {dataset['name']} is not prepared yet: preparing the built-in synthetic shop first", flush=True)
        return prepare(cfg, if_missing=True)  # a run started meanwhile (Tune trials) may have done it
    return load_manifest(folder, hint=prepare_command(cfg, name))


def _check_options(cfg: dict, manifest: dict, folder: str) -> None:
    """The config's dataset settings that decide the rows (`dataset_options`) are those it was prepared with: a run
    with `dataset.synthetic.users=1000` trained on a 300-user shop prepared earlier, recorded 1000 in the registry,
    and said nothing. (Manifests written before they recorded the settings are not compared.)"""
    from ecomray.data.prepare import NOT_DATA_OPTIONS

    then = manifest.get("dataset_options")
    if then is None:
        return
    # `path` is left out: jobs spell it relative to paths.datasets or absolute (the sources say which files it was);
    # so is the synthetic shop's chunk_users (its rows do not depend on it)
    def settings(d: dict) -> Any:
        d = {k: v for k, v in d.items() if k not in NOT_DATA_OPTIONS | {"path"}}
        if isinstance(d.get("synthetic"), dict):
            d["synthetic"] = {k: v for k, v in d["synthetic"].items() if k != "chunk_users"}
        return json.loads(json.dumps(d, default=str))

    now, then = settings(cfg["dataset"]), settings(then)
    differ = sorted(flat_diff(now, then))
    if differ:
        shown = "; ".join(f"dataset.{k}: now {a!r}, prepared with {b!r}" for k, a, b in differ[:4])
        raise UserError(f"{folder} was prepared with other dataset settings than this run's ({shown}"
                        f"{'; ...' if len(differ) > 4 else ''}): prepare it again with this run's settings "
                        f"(`python -m jobs.prepare` with this run's experiment= and dataset overrides, plus "
                        f"overwrite=true), or run with the settings it was prepared with")


def flat_diff(now: Any, then: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(now, dict) and isinstance(then, dict):
        return [d for k in sorted(set(now) | set(then), key=str)
                for d in flat_diff(now.get(k), then.get(k), f"{prefix}{k}" if not prefix else f"{prefix}.{k}")]
    return [] if now == then else [(prefix, now, then)]


def read_frame(cfg: dict, name: str | None = None, columns: list[str] | None = None):
    """A whole (small) prepared dataset as one Polars frame in source order (`_file`, `_row`): labelled tables."""
    import polars as pl

    folder = dataset_dir(cfg, name)
    hint = prepare_command(cfg, name)
    files = shard_files(folder, load_manifest(folder, hint=hint), hint)
    return pl.read_parquet(files, columns=columns).sort("_file", "_row")


@dataclass
class ShardScan:
    """What batch prediction reads when a family scores prepared rows as they are: shard files, optionally only
    the rows of one split. (A family that must build its inputs first returns a pyarrow Table instead.)"""

    files: list[str]
    split: str | None = None


def scan(cfg: dict, split: str | None = None) -> ShardScan:
    """The config's prepared dataset as a ShardScan; `split` None or "all" keeps every row."""
    folder = dataset_dir(cfg)
    hint = prepare_command(cfg)
    files = shard_files(folder, load_manifest(folder, hint=hint), hint)
    if split not in (None, "all", "train", "val", "test"):
        raise UserError(f"split {split!r}: use all, train, val or test")
    return ShardScan(files, None if split in (None, "all") else split)
