"""The model registry: immutable, atomically written versions under `<paths.registry>/<name>/<version>/`.

A version folder holds `model.pt` (a state dict; load with weights_only=True), the resolved `config.yaml`,
`metrics.json`, `meta.json` (everything needed to rebuild and serve the model: `model_kwargs`, vocabularies,
feature statistics, example requests), `lineage.json` (data manifest hash, git commit, package versions, seed,
the dataset's licence note and research-only flag) and `version.json` (the registry format, the task and its key
metrics, the size and sha256 of `model.pt`, checked when the weights are loaded). Versions are written to a temporary folder and renamed into place, so concurrent writers (Tune trials)
never see or make half a version. `aliases.json` maps alias -> version (e.g. best, prod);
`aliases_history.jsonl` records every move (`rollback`).

Format 2 (this one) made versions self-contained; a format-1 version (no `version.json`) fails to load with one
line naming the command that upgrades it in place: `python -m jobs.registry migrate <model>`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata as pkg_metadata
from typing import Any, Iterator

import torch
import yaml

from ecomray.runtime import UserError, write_atomic

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FORMAT = 2


def valid_name(name: str) -> bool:
    """A model, version or run name: one folder name (letters, digits, '_', '.', '-'), never a path."""
    return bool(_NAME.match(name)) and ".." not in name


def _safe(root: str, *parts: str) -> str:
    """Join under root, refusing names that could escape it (.., /, absolute paths)."""
    for p in parts:
        if not _NAME.match(p) or ".." in p:
            raise UserError(f"invalid registry name or version {p!r}: use letters, digits, '_', '-', '.'")
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([path, os.path.realpath(root)]) != os.path.realpath(root):
        raise UserError(f"registry path {path} is outside the registry root {root}")
    return path


def model_name(cfg: dict) -> str:
    """The registry name a training config registers under: `registry_name`, else `<task>_<dataset>`."""
    return cfg.get("registry_name") or f"{cfg['task']['name']}_{cfg['dataset']['name']}"


def versions(root: str, name: str) -> list[str]:
    folder = _safe(root, name)
    if not os.path.isdir(folder):
        return []
    # by number: "v10000" comes after "v9999" (as text it would sort before it)
    return sorted((v for v in os.listdir(folder) if re.fullmatch(r"v\d{4,}", v)), key=lambda v: int(v[1:]))


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


def version_info(cfg: dict, key_metrics: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The `version.json` of a version trained with `cfg`."""
    task = cfg.get("task") or {}
    return {"format": FORMAT, "task": task.get("name"), "module": task.get("module"),
            "key_metrics": list(key_metrics)}


def register(root: str, name: str, state_dict: dict, cfg: dict, metrics: dict, meta: dict, lin: dict,
             extra: dict | None = None, info: dict | None = None) -> str:
    """Write a new version atomically; returns its id (v0001, v0002, ...). `meta` must hold `model_kwargs`."""
    if "model_kwargs" not in meta:
        raise ValueError(f"{name}: the task's metadata() has no `model_kwargs` (see ecomray/tasks/__init__.py)")
    folder = _safe(root, name)
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=folder)
    torch.save(state_dict, os.path.join(tmp, "model.pt"))
    with open(os.path.join(tmp, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    info = {**(info or version_info(cfg)), "weights": weights_checksum(tmp)}
    for fname, obj in (("metrics.json", metrics), ("meta.json", meta), ("lineage.json", {**lin, **(extra or {})}),
                       ("version.json", info)):
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
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(tmp):
                raise


def set_alias(root: str, name: str, alias: str, version: str) -> str | None:
    """Point `alias` at `version` and record the move in `aliases_history.jsonl` (what `rollback` walks back);
    returns where the alias pointed before, as read under the same lock (None: it is new)."""
    if not os.path.isdir(_safe(root, name)):
        raise UserError(f"no model {name!r} in registry {root} (models: {models(root)})")
    _safe(root, name, version)
    _check_alias(alias)

    before: dict[str, str | None] = {}

    def step(aliases: dict[str, str], history: list[dict]) -> tuple[str, str]:
        if version not in versions(root, name):  # under the lock: gc deletes under it too
            raise UserError(f"{name} has no version {version} (have {versions(root, name)})")
        before["previous"] = aliases.get(alias)
        return "set", version

    _update_alias(root, name, alias, step)
    return before.get("previous")


def _check_alias(alias: str) -> None:
    if not _NAME.match(alias) or alias in ("latest", "auto") or re.fullmatch(r"v\d{4,}", alias):
        raise UserError(f"invalid alias {alias!r}: letters, digits, '_', '-', '.'; not 'latest' or a version id")


def rollback(root: str, name: str, alias: str = "prod") -> tuple[str | None, str]:
    """Move `alias` back to the version it pointed to before its current one; returns (from, to).

    The alias's past is replayed from `aliases_history.jsonl` as a stack: a `set` pushes (unless it repeats the top), a
    `rollback` pops. So rolling back twice goes two versions back, not back and forth between the last two."""
    _check_alias(alias)
    moved: dict[str, str | None] = {}

    def step(aliases: dict[str, str], history: list[dict]) -> tuple[str, str]:
        stack = _alias_stack(history, alias)
        current = aliases.get(alias)
        if current is None or len(stack) < 2:
            raise UserError(f"{name}: alias {alias!r} has no earlier version to roll back to "
                            f"(history: {stack or 'none'}); set one with `promote`")
        if stack[-2] not in versions(root, name):   # deleted by hand (gc keeps every version a rollback can reach)
            raise UserError(f"{name}: alias {alias!r} would roll back to {stack[-2]}, which is no longer in the "
                            f"registry; point it at a version that exists with `promote`")
        moved["from"] = current
        return "rollback", stack[-2]

    to = _update_alias(root, name, alias, step)
    return moved["from"], to


def alias_history(root: str, name: str) -> list[dict[str, Any]]:
    """Every alias move of a model, oldest first: {"ts", "alias", "version", "previous", "action"}."""
    return _read_history(os.path.join(_safe(root, name), "aliases_history.jsonl"))


def _alias_stack(history: list[dict], alias: str) -> list[str]:
    stack: list[str] = []
    for h in history:
        if h["alias"] != alias:
            continue
        if h["action"] == "rollback":
            stack = stack[:-1]
        elif not stack or stack[-1] != h["version"]:
            stack.append(h["version"])
    return stack


@contextlib.contextmanager
def _alias_lock(folder: str, wait: bool = True):
    """The model's alias lock: alias moves, and gc's choice and deletion of versions, happen one at a time.
    `wait=False`: BlockingIOError when another process holds it."""
    if not os.path.isdir(folder):
        raise UserError(f"no model {os.path.basename(folder)!r} in registry {os.path.dirname(folder)}")
    with open(os.path.join(folder, ".aliases.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield


def _update_alias(root: str, name: str, alias: str, fn) -> str:
    """Read-modify-write `aliases.json` and its history under one lock; `fn(aliases, history) -> (action, version)`."""
    folder = _safe(root, name)
    path, hpath = os.path.join(folder, "aliases.json"), os.path.join(folder, "aliases_history.jsonl")
    with _alias_lock(folder):  # read-modify-write under a lock: concurrent alias moves all land
        aliases, history = _read_aliases(path), _read_history(hpath)
        action, version = fn(aliases, history)
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "alias": alias, "version": version,
                 "previous": aliases.get(alias), "action": action}
        aliases[alias] = version
        # history first: a crash between the two writes leaves a history entry for a move that did not land, which
        # replays as a harmless duplicate; the reverse order could lose the only record of where the alias was.
        write_atomic(hpath, "".join(json.dumps(h) + "\n" for h in [*history, entry]))
        write_atomic(path, json.dumps(aliases, indent=2))
    return version


def _read_history(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        try:
            return [json.loads(line) for line in fh if line.strip()]
        except ValueError as err:   # written atomically, so only a hand edit or a disk error gets here
            raise UserError(f"{path} is damaged ({err}): fix or remove the line (it is the alias moves' log)") from None


def aliases(root: str, name: str) -> dict[str, str]:
    return _read_aliases(os.path.join(_safe(root, name), "aliases.json"))


def models(root: str, with_leftovers: bool = False) -> list[str]:
    """Model names in the registry (folders holding at least one version; `with_leftovers`: also folders holding
    only what a killed first register left, for gc)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if _NAME.match(n) and os.path.isdir(os.path.join(root, n))
                  and (versions(root, n) or (with_leftovers and any(f.startswith(".tmp-")
                                                                    for f in os.listdir(os.path.join(root, n))))))


def get_alias(root: str, name: str, alias: str) -> str | None:
    return _read_aliases(os.path.join(_safe(root, name), "aliases.json")).get(alias)


def _read_aliases(path: str) -> dict[str, str]:
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        try:
            found = json.load(fh)
        except ValueError as err:
            found, err_text = None, str(err)
        else:
            err_text = "not an object of alias -> version"
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise UserError(f"{path} is damaged ({err_text}): restore it, e.g. from the last moves in "
                        f"aliases_history.jsonl beside it (`python -m jobs.registry history <model>`)")
    return found


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


def read_info(root: str, name: str, version: str) -> dict[str, Any]:
    """A version's `version.json`; format-1 versions (written before it existed) read as {"format": 1}."""
    folder = _safe(root, name, version)
    if not os.path.isdir(folder):
        raise UserError(f"registry {name} {version}: the version folder is gone ({folder}); "
                        f"versions: {versions(root, name)}")
    path = os.path.join(folder, "version.json")
    if not os.path.exists(path):
        return {"format": 1}
    try:
        with open(path) as fh:
            info = json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"registry {name} {version}: version.json is unreadable ({type(err).__name__}: "
                        f"{str(err)[:120]}); the version is damaged: serve or promote another version, or register "
                        f"this model again ({folder})") from None
    if not isinstance(info, dict) or isinstance(info.get("format", 1), bool) \
            or not isinstance(info.get("format", 1), int):
        raise UserError(f"registry {name} {version}: version.json is not a version record (a JSON object with an "
                        f"integer format); the version is damaged ({folder})")
    return info


def check_format(root: str, name: str, version: str) -> dict[str, Any]:
    info = read_info(root, name, version)
    if info.get("format", 1) > FORMAT:
        raise UserError(f"{name} {version} is in registry format {info['format']}, written by a newer ecomray (this "
                        f"one reads format {FORMAT}): use that ecomray, or another version")
    if info.get("format", 1) != FORMAT:
        raise UserError(f"{name} {version} is in registry format {info.get('format', 1)} (this ecomray reads format "
                        f"{FORMAT}): upgrade it with `python -m jobs.registry migrate {name}`")
    return info


def weights_checksum(path: str) -> dict[str, Any]:
    """{"file", "bytes", "sha256"} of a version folder's model.pt, kept in its version.json."""
    digest, size = hashlib.sha256(), 0
    with open(os.path.join(path, "model.pt"), "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"file": "model.pt", "bytes": size, "sha256": digest.hexdigest()}


def load(root: str, name: str, ref: str | None = None, state: bool = True,
         check_weights: bool = False) -> dict[str, Any]:
    """{"version", "path", "state_dict", "config", "metrics", "meta", "lineage", "info"} of a version
    (`state=False` skips the weights; `check_weights` still compares them with their registered checksum). A file that is missing, unreadable or (the weights) not what was registered
    is a UserError naming the version and the file, never a library traceback."""
    version = resolve(root, name, ref)
    path = _safe(root, name, version)
    info = check_format(root, name, version)
    out: dict[str, Any] = {"name": name, "version": version, "path": path, "info": info, "state_dict": None}

    def damaged(fname: str, why: str) -> UserError:
        return UserError(f"registry {name} {version}: {fname} {why}; the version is damaged: serve or promote "
                         f"another version, or register this model again ({path})")

    fname = "model.pt"
    try:
        if state or check_weights:
            expected = info.get("weights") or {}
            if expected.get("sha256"):  # versions registered before checksums have none to compare
                found = weights_checksum(path)
                if found["sha256"] != expected["sha256"]:
                    raise damaged("model.pt", f"does not match its registered checksum ({found['bytes']:,} bytes, "
                                              f"registered {expected.get('bytes', 0):,})")
        if state:
            try:
                out["state_dict"] = torch.load(os.path.join(path, "model.pt"), weights_only=True, map_location="cpu")
            except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
                raise damaged("model.pt", f"cannot be read ({str(err).splitlines()[0][:200]})") from None
        fname = "config.yaml"
        with open(os.path.join(path, fname)) as fh:
            out["config"] = yaml.safe_load(fh)
        for key in ("metrics", "meta", "lineage"):
            fname = f"{key}.json"
            with open(os.path.join(path, fname)) as fh:
                out[key] = json.load(fh)
    except FileNotFoundError as err:
        raise damaged(os.path.basename(str(err.filename)), "is missing") from None
    except (ValueError, yaml.YAMLError) as err:
        raise damaged(fname, f"cannot be parsed ({str(err).splitlines()[0][:200]})") from None
    return out


def rewrite_meta(root: str, name: str, version: str, meta: dict, info: dict) -> None:
    """The one in-place change a version may see: `jobs.registry migrate` upgrading its format (atomic writes)."""
    path = _safe(root, name, version)
    info = {**info, "weights": read_info(root, name, version).get("weights") or weights_checksum(path)}
    write_atomic(os.path.join(path, "meta.json"), json.dumps(meta, indent=2, default=str))
    write_atomic(os.path.join(path, "version.json"), json.dumps(info, indent=2))


# ---------------------------------------------------------------------------------------------- serving leases, gc
LEASE_S = 300.0          # a lease not refreshed for this long is gone (a replica refreshes it every health check)


def lease(root: str, name: str, version: str, holder: str, wait: bool = True) -> None:
    """Mark `version` as being served by `holder` (a replica): `gc` never deletes a leased version. A file in
    `<name>/.leases/`, refreshed on every health check, so it works on any shared registry storage.

    A new (or stale) lease is taken under the alias lock, after checking that the version is still there: gc
    chooses and deletes under that lock, so a version leased here is either one gc keeps or already gone (a
    UserError). Refreshing a fresh lease needs no lock: gc keeps that version anyway. `wait=False` (a health check
    refreshing the version it already holds in memory): while gc holds the lock, skip this refresh rather than
    stall the health check; the next one tries again."""
    path = os.path.join(_safe(root, name), ".leases", f"{version}.{re.sub(r'[^A-Za-z0-9_.-]', '_', holder)}")
    if not _older_than(path, LEASE_S / 2) and os.path.exists(path):
        os.utime(path, None)
        return
    where = _safe(root, name, version)
    if not os.path.isdir(where):
        raise UserError(f"{name} {version} is not in the registry {root} (deleted by gc, or never registered)")
    try:
        with _alias_lock(_safe(root, name), wait=wait):
            if not os.path.isdir(where):
                raise UserError(f"{name} {version} was deleted from the registry {root} (by gc) before it was leased")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a"):
                os.utime(path, None)
    except BlockingIOError:     # only with wait=False
        return


@contextlib.contextmanager
def holding(root: str, name: str, version: str, holder: str) -> Iterator[None]:
    """A lease on `version` for the length of a job that is not a replica (batch scoring: its actors load the
    version after the driver resolved it, and a gc in between deleted it mid-run), refreshed from a thread."""
    try:
        lease(root, name, version, holder)
        leased_here = True
    except OSError as err:     # a read-only registry: scoring still works, as it did, only unprotected
        print(f"WARNING: could not lease {name} {version} in {root} ({err.strerror or err}): a `registry gc` "
              f"meanwhile could delete it", file=sys.stderr, flush=True)
        leased_here = False
    if not leased_here:
        yield
        return
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LEASE_S / 3):
            try:
                lease(root, name, version, holder, wait=False)
            except (OSError, UserError):   # the next refresh tries again; the job's own load reports a real loss
                pass

    thread = threading.Thread(target=refresh, name=f"lease-{name}-{version}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        release(root, name, version, holder)


def release(root: str, name: str, version: str, holder: str) -> None:
    path = os.path.join(_safe(root, name), ".leases", f"{version}.{re.sub(r'[^A-Za-z0-9_.-]', '_', holder)}")
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def leased(root: str, name: str, max_age_s: float = LEASE_S) -> set[str]:
    """Versions with a fresh lease (served right now by some replica)."""
    folder = os.path.join(_safe(root, name), ".leases")
    if not os.path.isdir(folder):
        return set()
    now, fresh = time.time(), set()
    for f in os.listdir(folder):
        try:
            if now - os.path.getmtime(os.path.join(folder, f)) <= max_age_s:
                fresh.add(f.split(".", 1)[0])
        except FileNotFoundError:  # released meanwhile
            pass
    return fresh


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.path.getmtime(path) > seconds
    except FileNotFoundError:   # renamed into place or removed meanwhile
        return False


def gc(root: str, name: str, keep_last: int = 5, dry_run: bool = False, keep_rollback: int = 3) -> dict[str, list[str]]:
    """Delete the versions of `name` that no alias points at, that are not among the `keep_rollback` versions each
    alias rolls back to next, that no replica serves (leases) and that are not among the newest `keep_last`; and
    half-written `.tmp-*` folders older than an hour. The newest version always stays, even with `keep_last=0`:
    `register` numbers the next one after it, so a number once used (in aliases_history.jsonl, in a predictions
    folder's summary) never names another model. Runs under the alias lock, so no alias moves onto a version
    while it is being deleted. Returns {"deleted", "kept", "tmp"}."""
    import shutil

    folder = _safe(root, name)
    if not os.path.isdir(folder):
        return {"deleted": [], "kept": [], "tmp": []}
    with _alias_lock(folder):
        have = versions(root, name)
        history = _read_history(os.path.join(folder, "aliases_history.jsonl"))
        reachable = {v for a in {h["alias"] for h in history}
                     for v in _alias_stack(history, a)[-(keep_rollback + 1):]}   # where it is, and its next steps back
        protected = (set(aliases(root, name).values()) | reachable | leased(root, name)
                     | set(have[-max(keep_last, 1):]))
        doomed = [v for v in have if v not in protected]
        stale_tmp = [t for t in os.listdir(folder) if t.startswith(".tmp-") and _older_than(os.path.join(folder, t), 3600)]
        if not dry_run:
            for v in doomed:
                shutil.rmtree(_safe(root, name, v))
            for t in stale_tmp:
                shutil.rmtree(os.path.join(folder, t), ignore_errors=True)
    return {"deleted": doomed, "kept": [v for v in have if v in protected], "tmp": stale_tmp}
