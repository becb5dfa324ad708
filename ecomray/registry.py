"""The model registry: immutable, atomically written versions under `<paths.registry>/<name>/<version>/`.

A version folder holds `model.pt` (a state dict; load with weights_only=True), the resolved `config.yaml`,
`metrics.json`, `meta.json` (feature metadata to rebuild and serve the model) and `lineage.json` (data manifest
hash, git commit, package versions, seed, the dataset's licence note and research-only flag). Versions are written
to a temporary folder and renamed into place, so concurrent writers (Tune trials) never see or make half a version.
`aliases.json` maps alias -> version (e.g. best, prod).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import tempfile
import time
from importlib import metadata as pkg_metadata
from typing import Any

import torch
import yaml

from ecomray.runtime import UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _safe(root: str, *parts: str) -> str:
    """Join under root, refusing names that could escape it (.., /, absolute paths)."""
    for p in parts:
        if not _NAME.match(p) or ".." in p:
            raise UserError(f"invalid registry name or version {p!r}: use letters, digits, '_', '-', '.'")
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([path, os.path.realpath(root)]) != os.path.realpath(root):
        raise UserError(f"registry path {path} is outside the registry root {root}")
    return path


def versions(root: str, name: str) -> list[str]:
    folder = _safe(root, name)
    if not os.path.isdir(folder):
        return []
    return sorted(v for v in os.listdir(folder) if re.fullmatch(r"v\d{4,}", v))


def lineage(cfg: dict, manifest: dict | None) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    pkgs = {}
    for p in ("ecomray", "torch", "ray", "polars", "pyarrow", "hydra-core", "numpy"):
        try:
            pkgs[p] = pkg_metadata.version(p)
        except pkg_metadata.PackageNotFoundError:
            pass
    m = manifest or {}
    return {"data_manifest_hash": m.get("hash"), "dataset": m.get("dataset"), "git_commit": commit,
            "packages": pkgs, "seed": cfg.get("seed"), "licence": m.get("licence"),
            "research_only": bool(m.get("research_only", False)), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def register(root: str, name: str, state_dict: dict, cfg: dict, metrics: dict, meta: dict, lin: dict,
             extra: dict | None = None) -> str:
    """Write a new version atomically; returns its id (v0001, v0002, ...)."""
    folder = _safe(root, name)
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=folder)
    torch.save(state_dict, os.path.join(tmp, "model.pt"))
    with open(os.path.join(tmp, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    for fname, obj in (("metrics.json", metrics), ("meta.json", meta), ("lineage.json", {**lin, **(extra or {})})):
        with open(os.path.join(tmp, fname), "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
    while True:  # claim the next free number; rename fails if another writer took it first
        existing = versions(root, name)
        version = f"v{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
        try:
            # A version folder is never empty, so rename onto one another writer just created fails (ENOTEMPTY /
            # EEXIST) instead of replacing it: the loser takes the next number.
            os.rename(tmp, os.path.join(folder, version))
            return version
        except OSError:
            if not os.path.isdir(tmp):
                raise
            continue


def set_alias(root: str, name: str, alias: str, version: str) -> None:
    folder = _safe(root, name)
    _safe(root, name, version)
    if version not in versions(root, name):
        raise UserError(f"{name} has no version {version} (have {versions(root, name)})")
    if not _NAME.match(alias) or alias in ("latest", "auto") or re.fullmatch(r"v\d{4,}", alias):
        raise UserError(f"invalid alias {alias!r}: letters, digits, '_', '-', '.'; not 'latest' or a version id")
    path = os.path.join(folder, "aliases.json")
    with open(os.path.join(folder, ".aliases.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # read-modify-write under a lock: concurrent set_alias calls all land
        aliases = _read_aliases(path)
        aliases[alias] = version
        tmp = path + f".tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(aliases, fh, indent=2)
        os.replace(tmp, path)  # readers see the old or the new file, never half of one


def get_alias(root: str, name: str, alias: str) -> str | None:
    return _read_aliases(os.path.join(_safe(root, name), "aliases.json")).get(alias)


def _read_aliases(path: str) -> dict[str, str]:
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def parse_ref(spec: str) -> tuple[str, str | None]:
    """"name", "name:v0003", "name:prod", "name:latest" -> (name, ref or None)."""
    name, _, ref = str(spec).partition(":")
    return name, (ref or None)


def resolve(root: str, name: str, ref: str | None = None) -> str:
    """A version id from a version, an alias, or None/'latest' (prod, else best, else the newest)."""
    have = versions(root, name)
    if not have:
        raise UserError(f"no versions of model {name!r} in registry {root}: train one first")
    aliases = _read_aliases(os.path.join(_safe(root, name), "aliases.json"))
    if ref in (None, "", "auto"):
        return aliases.get("prod") or aliases.get("best") or have[-1]
    if ref == "latest":
        return have[-1]
    if ref in aliases:
        return aliases[ref]
    if ref in have:
        return ref
    raise UserError(f"model {name!r} has no version or alias {ref!r} (versions {have}, aliases {sorted(aliases)})")


def load(root: str, name: str, ref: str | None = None) -> dict[str, Any]:
    """{"version", "path", "state_dict", "config", "metrics", "meta", "lineage"} of a version."""
    version = resolve(root, name, ref)
    path = _safe(root, name, version)
    out: dict[str, Any] = {"name": name, "version": version, "path": path,
                           "state_dict": torch.load(os.path.join(path, "model.pt"), weights_only=True, map_location="cpu")}
    with open(os.path.join(path, "config.yaml")) as fh:
        out["config"] = yaml.safe_load(fh)
    for key in ("metrics", "meta", "lineage"):
        with open(os.path.join(path, f"{key}.json")) as fh:
            out[key] = json.load(fh)
    return out
