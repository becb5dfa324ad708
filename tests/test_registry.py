"""Model registry: atomic, immutable, numbered versions; aliases; refusing paths outside the root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ecomray import registry
from ecomray.runtime import UserError


def _register(root: str, value: float = 1.0) -> str:
    return registry.register(root, "m", {"w": torch.full((2,), value)}, {"seed": 1}, {"val/ndcg@10": value},
                             {"k": 1, "model_kwargs": {}},
                             {"data_manifest_hash": "abc"})


def test_concurrent_writers_get_distinct_complete_versions(tmp_path: Path) -> None:
    root = str(tmp_path / "reg")
    got: list[str] = []
    threads = [threading.Thread(target=lambda k=k: got.append(_register(root, float(k)))) for k in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == [f"v{k:04d}" for k in range(1, 9)]
    assert registry.versions(root, "m") == sorted(got)
    assert not [p for p in os.listdir(tmp_path / "reg" / "m") if p.startswith(".tmp")]
    values = set()
    for v in got:
        found = registry.load(root, "m", v)
        assert sorted(os.listdir(found["path"])) == ["config.yaml", "lineage.json", "meta.json", "metrics.json", "model.pt",
                                                     "version.json"]
        assert found["metrics"]["val/ndcg@10"] == found["state_dict"]["w"][0].item()  # files of one writer, not mixed
        values.add(found["metrics"]["val/ndcg@10"])
    assert len(values) == 8


def test_aliases_and_refs(tmp_path: Path) -> None:
    root = str(tmp_path)
    for k in range(3):
        _register(root, float(k))
    assert registry.resolve(root, "m") == "v0003"                   # no alias: the newest
    assert registry.set_alias(root, "m", "best", "v0001") is None          # where it pointed before: nowhere
    assert registry.resolve(root, "m") == "v0001" and registry.get_alias(root, "m", "best") == "v0001"
    assert registry.set_alias(root, "m", "best", "v0001") == "v0001"       # (read under the alias lock)
    import shutil

    from jobs.registry import list_models

    registry.set_alias(root, "m", "canary", "v0003")
    shutil.rmtree(Path(root) / "m" / "v0003")                               # deleted by hand: the alias dangles
    assert [(r["version"], r["aliases"], r["metrics"][:16]) for r in list_models(root, "m")
            if r["version"] == "v0003"] == [("v0003", ["canary"], "(version missing")]
    _register(root, 3.0)                                                     # (v0003 again: the test's own folder)
    registry.set_alias(root, "m", "prod", "v0002")
    assert registry.resolve(root, "m") == "v0002"                   # prod before best
    assert registry.resolve(root, "m", "latest") == "v0003" and registry.resolve(root, "m", "best") == "v0001"
    assert registry.parse_ref("m:prod") == ("m", "prod") and registry.parse_ref("m") == ("m", None)
    with pytest.raises(UserError):
        registry.set_alias(root, "m", "prod", "v0009")               # no such version
    with pytest.raises(UserError):
        registry.set_alias(root, "m", "latest", "v0001")             # reserved
    with pytest.raises(UserError):
        registry.resolve(root, "m", "staging")
    with pytest.raises(UserError):
        registry.resolve(root, "nothing")


def test_names_and_versions_cannot_escape_the_root(tmp_path: Path) -> None:
    root = str(tmp_path / "reg")
    _register(root)
    for bad in ("../x", "/etc", "a/../../b", ".."):
        with pytest.raises(UserError):
            registry.load(root, bad)
    with pytest.raises(UserError):
        registry.load(root, "m", "../../m")
    os.symlink(tmp_path, tmp_path / "reg" / "link")                  # a link pointing out of the root
    with pytest.raises(UserError):
        registry.versions(root, "link")


def test_alias_history_and_rollback_walk_back(tmp_path: Path) -> None:
    root = str(tmp_path)
    for k in range(4):
        _register(root, float(k))
    with pytest.raises(UserError):
        registry.rollback(root, "m")                                 # prod never set
    for v in ("v0001", "v0002", "v0002", "v0004"):                   # setting the same version twice is one step
        registry.set_alias(root, "m", "prod", v)
    registry.set_alias(root, "m", "best", "v0003")                   # other aliases do not interfere
    assert registry.rollback(root, "m") == ("v0004", "v0002")
    assert registry.resolve(root, "m") == "v0002"
    assert registry.rollback(root, "m") == ("v0002", "v0001")        # twice: two steps back, not back and forth
    with pytest.raises(UserError):
        registry.rollback(root, "m")                                 # nothing before v0001
    assert registry.get_alias(root, "m", "prod") == "v0001" and registry.get_alias(root, "m", "best") == "v0003"
    moves = registry.alias_history(root, "m")
    assert [(h["action"], h["alias"], h["version"]) for h in moves][-3:] == [
        ("set", "best", "v0003"), ("rollback", "prod", "v0002"), ("rollback", "prod", "v0001")]
    assert moves[-1]["previous"] == "v0002"
    registry.set_alias(root, "m", "prod", "v0003")                   # a new promotion after a rollback
    assert registry.rollback(root, "m") == ("v0003", "v0001")


def test_concurrent_alias_moves_all_land_in_the_history(tmp_path: Path) -> None:
    root = str(tmp_path)
    for k in range(3):
        _register(root, float(k))
    threads = [threading.Thread(target=registry.set_alias, args=(root, "m", f"a{k}", f"v000{k % 3 + 1}"))
               for k in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(registry.alias_history(root, "m")) == 12 and len(registry.aliases(root, "m")) == 12


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.registry", "--registry", str(root), *args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)


def test_registry_cli_list_promote_warns_on_research_only_and_rolls_back(tmp_path: Path, capsys, monkeypatch) -> None:
    from jobs.registry import main

    root = tmp_path / "registry"
    lin = {"data_manifest_hash": "abc", "dataset": "amazon_beauty", "research_only": True,
           "licence": "research use only"}
    for k, research in enumerate((False, True)):
        registry.register(str(root), "rec", {"w": torch.zeros(1)}, {"train": {"monitor": "val/ndcg@10"}},
                          {"val/ndcg@10": 0.1 + k / 10, "test/ndcg@10": 0.05 + k / 10}, {"model_kwargs": {}},
                          {**lin, "research_only": research}, extra={"sweep": {"name": "s", "trial_id": f"t{k}"}}
                          if k else None, info=registry.version_info({}, ["ndcg@10"]))
    reg = ["--registry", str(root)]
    assert main([*reg, "promote", "rec", "v0001", "--alias", "prod"])["warning"] is None
    out = capsys.readouterr()
    assert "WARNING" not in out.err and "prod -> v0001" in out.out
    assert main([*reg, "promote", "rec", "v0002", "--alias", "prod"])["warning"]
    out = capsys.readouterr()
    assert "research-only" in out.err and "research use only" in out.err
    rows = main([*reg, "list"])
    listed = capsys.readouterr().out
    assert [(r["version"], r["aliases"]) for r in rows] == [("v0001", []), ("v0002", ["prod"])]
    line2 = next(line for line in listed.splitlines() if "v0002" in line)
    assert "prod" in line2 and "val/ndcg@10 0.2000" in line2 and "test/ndcg@10 0.1500" in line2
    assert "s/t1" in line2 and "research only" in line2
    assert main([*reg, "rollback", "rec"])["version"] == "v0001"
    assert "v0002 -> v0001" in capsys.readouterr().out
    assert registry.resolve(str(root), "rec") == "v0001"             # what deploy would serve now
    with pytest.raises(UserError, match="no version or alias"):
        main([*reg, "promote", "rec", "v0009"])
    monkeypatch.setenv("ECOMRAY_HOME", str(tmp_path))               # no --registry: $ECOMRAY_HOME/registry
    assert [r["version"] for r in main(["list", "rec"])] == ["v0001", "v0002"]
    # as a command: a user error is one line and exit code 2
    again = _cli(root, "rollback", "rec")
    assert again.returncode == 2 and "no earlier version" in again.stderr and "Traceback" not in again.stderr
    # deploying a research-only version warns as promoting it does (it said nothing)
    from jobs.deploy import checked_app_args

    registry.register(str(root), "rec2", {"w": torch.zeros(1)}, {"task": {"module": "ecomray.tasks.next_item"}},
                      {}, {"model_kwargs": {}}, lin, info=registry.version_info({}, ["ndcg@10"]))
    capsys.readouterr()
    checked_app_args({"paths": {"registry": str(root)}, "serve": {"routes": {"recomend": {"num_replicas": 2}}},
                      "deploy": {"endpoints": {"recommend": {"model": "rec2"}}}})
    said = capsys.readouterr()
    assert "WARNING: /v1/recommend serves rec2 v0001, trained on research-only data" in said.err
    assert "serve.routes names ['recomend'], which this app does not serve" in said.out      # a typo, named


def test_format_1_versions_fail_with_the_migrate_command_then_migrate(tmp_path: Path) -> None:
    """A version written before registry format 2 (no version.json; next_item meta without model_kwargs) fails to
    load with one line naming the command; `jobs.registry migrate` upgrades it in place and it loads."""
    from jobs.registry import main

    root = str(tmp_path / "registry")
    cfg = {"task": {"name": "next_item", "module": "ecomray.tasks.next_item"}, "dataset": {"name": "gone"},
           "paths": {"data": str(tmp_path / "data")}}
    v = registry.register(root, "old", {"w": torch.zeros(1)}, cfg, {"val/ndcg@10": 0.1},
                          {"model_kwargs": {}, "num_items": 7, "popular": ["a", "b"]}, {})
    folder = Path(root) / "old" / v
    (folder / "version.json").unlink()
    meta = json.loads((folder / "meta.json").read_text())
    del meta["model_kwargs"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"registry format 1 .*python -m jobs.registry migrate old"):
        registry.load(root, "old")
    assert main(["--registry", root, "migrate"]) == [f"old:{v}"]
    found = registry.load(root, "old")
    assert found["meta"]["model_kwargs"] == {"num_items": 7} and found["info"]["format"] == registry.FORMAT
    assert found["meta"]["item_categories"] is None               # the shards it was trained on are gone
    assert main(["--registry", root, "migrate"]) == []            # nothing left to do


def test_a_damaged_version_is_one_clear_error(tmp_path: Path) -> None:
    """Weights changed or cut after registration (a partial copy, a disk error), or a metadata file that no longer
    parses: loading names the model, the version and the file, never a torch or JSON traceback."""
    root = str(tmp_path / "registry")
    v = _register(root)
    folder = Path(root) / "m" / v
    info = json.loads((folder / "version.json").read_text())
    assert info["weights"]["sha256"] and info["weights"]["bytes"] == (folder / "model.pt").stat().st_size
    assert registry.load(root, "m")["state_dict"]["w"].tolist() == [1.0, 1.0]
    assert registry.load(root, "m", state=False)["state_dict"] is None

    good = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(good[:100])
    with pytest.raises(UserError, match=rf"registry m {v}: model.pt does not match its registered checksum"):
        registry.load(root, "m")
    registry.load(root, "m", state=False)          # metadata alone still loads (GET /v1/models, registry list)
    del info["weights"]                            # a version registered before checksums: torch's error, reworded
    (folder / "version.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=rf"registry m {v}: model.pt cannot be read"):
        registry.load(root, "m")
    (folder / "model.pt").write_bytes(good)
    (folder / "meta.json").write_text("{broken")
    with pytest.raises(UserError, match=rf"registry m {v}: meta.json cannot be parsed"):
        registry.load(root, "m")
    (folder / "meta.json").unlink()
    with pytest.raises(UserError, match=rf"registry m {v}: meta.json is missing"):
        registry.load(root, "m")
    (Path(root) / "m" / "aliases.json").write_text("{")
    with pytest.raises(UserError, match=r"aliases.json is damaged"):
        registry.resolve(root, "m", "prod")


def test_gc_keeps_aliased_served_and_newest_versions(tmp_path: Path) -> None:
    from jobs.registry import main

    root = str(tmp_path / "registry")
    for k in range(6):
        _register(root, float(k))
    registry.set_alias(root, "m", "prod", "v0001")
    registry.lease(root, "m", "v0002", "replica-a")                 # served right now
    registry.lease(root, "m", "v0003", "replica-b")
    old = Path(root) / "m" / ".leases" / "v0003.replica-b"
    os.utime(old, (old.stat().st_atime - 3600, old.stat().st_mtime - 3600))   # a lease nobody refreshed
    runs = tmp_path / "train"
    (runs / "tiny.old-20260101-000000").mkdir(parents=True)
    (runs / "tiny").mkdir()
    dry = main(["--registry", root, "gc", "--keep", "2", "--dry-run"])
    assert dry["m"]["deleted"] == ["v0003", "v0004"] and registry.versions(root, "m") == [f"v000{k}" for k in range(1, 7)]
    out = main(["--registry", root, "gc", "--keep", "2", "--runs", str(runs)])
    assert out["m"]["deleted"] == ["v0003", "v0004"]
    assert registry.versions(root, "m") == ["v0001", "v0002", "v0005", "v0006"]
    assert sorted(p.name for p in runs.iterdir()) == ["tiny"]
    registry.release(root, "m", "v0002", "replica-a")
    assert main(["--registry", root, "gc", "--keep", "2"])["m"]["deleted"] == ["v0002"]


def test_gc_never_frees_a_version_number_and_refuses_paths_that_point_nowhere(tmp_path: Path, capsys) -> None:
    """`gc --keep 0` deleted every unaliased version, the newest too, and the next register took its number again:
    history lines and predictions that said v0003 then named another model. A typo'd --registry or --runs printed
    nothing (or "deleted 0") and exited 0."""
    from jobs.registry import main

    root = str(tmp_path / "registry")
    for k in range(4):
        _register(root, float(k))
    registry.set_alias(root, "m", "prod", "v0002")
    out = main(["--registry", root, "gc", "--keep", "0", "--keep-rollback", "0"])
    assert out["m"]["deleted"] == ["v0001", "v0003"] and registry.versions(root, "m") == ["v0002", "v0004"]
    assert _register(root) == "v0005"
    with pytest.raises(UserError, match=r"no registry at .*typo"):
        main(["--registry", str(tmp_path / "typo"), "gc"])
    with pytest.raises(UserError, match=r"gc --runs .*nope: no such folder"):
        main(["--registry", root, "gc", "--runs", str(tmp_path / "nope")])
    runs = tmp_path / "train"
    (runs / "tiny.old-20260101-000000").mkdir(parents=True)
    (runs / "my.old-notes").mkdir()                       # not a sweep a re-run set aside
    (runs / "x.old-1").write_text("a file")
    capsys.readouterr()
    main(["--registry", root, "gc", "--runs", str(runs)])
    assert "deleted 1 old sweep folder(s)" in capsys.readouterr().out
    assert sorted(p.name for p in runs.iterdir()) == ["my.old-notes", "x.old-1"]


def test_a_job_holding_a_version_keeps_it_from_gc_until_it_ends(tmp_path: Path) -> None:
    """Batch scoring resolves a version in the driver and its actors load it later: a gc in between deleted it and
    the run failed partway. The job now holds a lease for its whole length."""
    root = str(tmp_path / "registry")
    for k in range(3):
        _register(root, float(k))
    with registry.holding(root, "m", "v0001", "batch_predict-host-1"):
        assert registry.gc(root, "m", keep_last=0, keep_rollback=0)["deleted"] == ["v0002"]
        assert "v0001" in registry.versions(root, "m")
    assert registry.gc(root, "m", keep_last=0, keep_rollback=0)["deleted"] == ["v0001"]
    with pytest.raises(UserError, match="not in the registry"):
        with registry.holding(root, "m", "v0002", "batch_predict-host-1"):
            pass


def test_migrate_leaves_newer_formats_and_goes_on_past_a_damaged_version(tmp_path: Path, capsys) -> None:
    """`migrate` rewrote a format-3 version (a newer ecomray's) as format 2, and stopped with a FileNotFoundError
    traceback at a damaged format-1 version, leaving the versions after it unmigrated. A version.json that does
    not parse was a JSONDecodeError traceback from `promote`, `evaluate` and serving."""
    from jobs.registry import main

    root = str(tmp_path / "registry")
    cfg = {"task": {"name": "next_item", "module": "ecomray.tasks.next_item"}, "dataset": {"name": "gone"},
           "paths": {"data": str(tmp_path / "data")}}
    made = [registry.register(root, "old", {"w": torch.zeros(1)}, cfg, {"val/ndcg@10": 0.1},
                              {"model_kwargs": {}, "num_items": 7, "popular": ["a"]}, {}) for _ in range(3)]
    folder = {v: Path(root) / "old" / v for v in made}
    for v in made[:2]:
        (folder[v] / "version.json").unlink()               # format 1
    (folder[made[0]] / "config.yaml").unlink()              # ... and damaged
    info = json.loads((folder[made[2]] / "version.json").read_text())
    (folder[made[2]] / "version.json").write_text(json.dumps({**info, "format": registry.FORMAT + 1}))
    with pytest.raises(UserError, match=rf"1 version\(s\) could not be migrated \(old:{made[0]}\); 1 migrated"):
        main(["--registry", root, "migrate"])
    said = capsys.readouterr().out
    assert f"old {made[0]}: cannot migrate (FileNotFoundError" in said and f"old {made[1]}: migrated" in said
    assert f"old {made[2]}: registry format {registry.FORMAT + 1} is newer" in said
    assert json.loads((folder[made[2]] / "version.json").read_text())["format"] == registry.FORMAT + 1
    with pytest.raises(UserError, match=rf"old {made[2]} is in registry format {registry.FORMAT + 1}, written by a newer"):
        registry.load(root, "old", made[2])
    (folder[made[2]] / "version.json").write_text('{"format": 2,')
    with pytest.raises(UserError, match=rf"registry old {made[2]}: version.json is unreadable \(JSONDecodeError"):
        main(["--registry", root, "promote", "old", made[2]])
    (folder[made[2]] / "version.json").write_text("[]")
    with pytest.raises(UserError, match=r"version.json is not a version record"):
        registry.load(root, "old", made[2])
    rows = main(["--registry", root, "list"])
    assert [r["metrics"] for r in rows if r["version"] == made[2]] == [
        "(damaged: version.json unreadable; not a version ecomray wrote?)"]


def test_a_lease_waits_for_a_running_gc_and_refuses_what_it_deleted(tmp_path: Path) -> None:
    """A replica's first lease and gc's choice used to race: gc could pick a version, a replica lease and start
    loading it, and gc delete it mid-load. A new lease is taken under gc's lock and checks the version is there."""
    import shutil

    root = str(tmp_path)
    for k in range(2):
        _register(root, float(k))
    with pytest.raises(UserError, match="v0009 is not in the registry"):
        registry.lease(root, "m", "v0009", "replica-a")
    errors: list[Exception] = []

    def take() -> None:
        try:
            registry.lease(root, "m", "v0001", "replica-a")
        except UserError as err:
            errors.append(err)

    with registry._alias_lock(str(Path(root) / "m")):        # gc holds the lock, chose v0001, is deleting it
        t = threading.Thread(target=take)
        t.start()
        t.join(0.3)
        assert t.is_alive()                                  # the lease waits for gc
        shutil.rmtree(Path(root) / "m" / "v0001")
    t.join(5)
    assert "deleted from the registry" in str(errors[0]) and registry.leased(root, "m") == set()
    registry.lease(root, "m", "v0002", "replica-a")
    lease = Path(root) / "m" / ".leases" / "v0002.replica-a"
    os.utime(lease, (lease.stat().st_atime - 10, lease.stat().st_mtime - 10))
    with registry._alias_lock(str(Path(root) / "m")):        # a fresh lease is refreshed without waiting
        registry.lease(root, "m", "v0002", "replica-a")
    assert registry.leased(root, "m") == {"v0002"} and time.time() - lease.stat().st_mtime < 5
    os.utime(lease, (lease.stat().st_atime - 200, lease.stat().st_mtime - 200))
    with registry._alias_lock(str(Path(root) / "m")):        # a health check's refresh never waits for gc
        t = threading.Thread(target=registry.lease, args=(root, "m", "v0002", "replica-a"), kwargs={"wait": False})
        t.start()
        t.join(5)
        assert not t.is_alive() and time.time() - lease.stat().st_mtime > 150       # skipped, not waiting
    registry.lease(root, "m", "v0002", "replica-a", wait=False)                   # and done once gc is gone
    assert time.time() - lease.stat().st_mtime < 5


def test_gc_keeps_what_rollback_can_reach_and_rollback_names_a_missing_target(tmp_path: Path) -> None:
    """gc used to delete a version on an alias's history (so `rollback` moved prod onto a deleted version and
    loading it failed with a misleading format error)."""
    import shutil

    root = str(tmp_path)
    for k in range(8):
        _register(root, float(k))
    registry.set_alias(root, "m", "prod", "v0002")
    registry.set_alias(root, "m", "prod", "v0008")
    out = registry.gc(root, "m", keep_last=2)
    assert out["deleted"] == ["v0001", "v0003", "v0004", "v0005", "v0006"]   # v0002: prod's rollback target
    assert registry.rollback(root, "m") == ("v0008", "v0002")
    assert registry.load(root, "m")["version"] == "v0002"
    registry.set_alias(root, "m", "prod", "v0008")
    shutil.rmtree(Path(root) / "m" / "v0002")                               # deleted by hand
    with pytest.raises(UserError, match="v0002, which is no longer in the registry"):
        registry.rollback(root, "m")
    assert registry.get_alias(root, "m", "prod") == "v0008"                 # the refused rollback moved nothing
    with pytest.raises(UserError, match="v0002: the version folder is gone"):
        registry.read_info(root, "m", "v0002")


def test_versions_sort_by_number_past_v9999(tmp_path: Path) -> None:
    """As text, v10000 sorts before v9999: `latest` was v9999 and register spun forever renaming onto v10000."""
    root = str(tmp_path)
    _register(root)
    os.rename(Path(root) / "m" / "v0001", Path(root) / "m" / "v9999")
    assert _register(root) == "v10000" and _register(root) == "v10001"
    assert registry.versions(root, "m")[-1] == "v10001" and registry.resolve(root, "m", "latest") == "v10001"


def test_gc_removes_what_a_killed_first_register_left(tmp_path: Path) -> None:
    from jobs.registry import main

    root = tmp_path / "registry"
    left = root / "n" / ".tmp-abc"
    left.mkdir(parents=True)
    (left / "model.pt").write_bytes(b"partial")
    os.utime(left, (left.stat().st_atime - 7200, left.stat().st_mtime - 7200))
    assert registry.models(str(root)) == []                                # no versions: not a model to list
    out = main(["--registry", str(root), "gc"])
    assert out["n"]["tmp"] == [".tmp-abc"] and not left.exists()


def test_gc_keeps_only_the_last_rollback_steps_of_each_alias(tmp_path: Path) -> None:
    """Every sweep winner becomes `best`: protecting an alias's whole history would keep every version for ever."""
    root = str(tmp_path)
    for k in range(12):
        registry.set_alias(root, "m", "best", _register(root, float(k)))
    out = registry.gc(root, "m", keep_last=2, keep_rollback=3)
    assert registry.versions(root, "m") == ["v0009", "v0010", "v0011", "v0012"]   # best + 3 steps back
    assert out["deleted"] == [f"v{k:04d}" for k in range(1, 9)]
    assert registry.rollback(root, "m", "best") == ("v0012", "v0011")


def test_an_alias_on_a_model_that_does_not_exist_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no model 'nope' in registry"):
        registry.set_alias(str(tmp_path), "nope", "prod", "v0001")


def test_missing_model_and_unwritable_lock_folder_are_one_error(tmp_path: Path) -> None:
    """`registry rollback <missing model>` and a job whose output folder's parent is missing raised
    FileNotFoundError on the lock file: a traceback instead of a line naming the model or the folder."""
    from ecomray.runtime import one_at_a_time

    with pytest.raises(UserError, match=r"no model 'nope' in registry"):
        registry.rollback(str(tmp_path / "registry"), "nope")
    with pytest.raises(UserError, match=r"cannot lock .*/missing/\.out\.lock for the batch scoring: .*writable"):
        with one_at_a_time(str(tmp_path / "missing" / ".out.lock"), "batch scoring"):
            pass


def test_registry_cli_takes_registry_after_the_command_and_refuses_missing_models(tmp_path: Path, capsys) -> None:
    """`list --registry DIR` read DIR as a model name; `history <missing>` printed nothing and exited 0;
    `rollback --alias ../x` was not checked as an alias name."""
    from jobs.registry import main

    reg = str(tmp_path / "reg")
    assert main(["list", "--registry", reg]) == main(["--registry", reg, "list"]) == []
    assert f"(no models in {reg})" in capsys.readouterr().out
    for command in (["history", "nope"], ["gc", "nope"], ["gc", "nope", "--dry-run"], ["migrate", "nope"],
                    ["list", "nope"]):   # gc and migrate of a missing model used to exit 0, having done nothing
        with pytest.raises(UserError, match=r"no model 'nope' in registry .*\(models: \[\]\)"):
            main([*command, "--registry", reg])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"registry .*afile is a file"):
        main(["list", "--registry", str(tmp_path / "afile")])
    with pytest.raises(UserError, match=r"gc --runs .*afile is a file"):
        main(["gc", "--registry", reg, "--runs", str(tmp_path / "afile")])
    fake = Path(reg) / "m" / "v0001"      # a folder that is no version (a predictions folder written there)
    fake.mkdir(parents=True)
    (fake / "part-0.parquet").write_bytes(b"x")
    (row,) = main(["list", "--registry", reg])
    assert row["version"] == "v0001" and row["metrics"].startswith("(damaged: metrics.json unreadable")
    half = Path(reg) / "half"          # a model folder with only a half-written version: gc collects it
    (half / ".tmp-1").mkdir(parents=True)
    assert main(["gc", "half", "--registry", reg]) == {"half": {"deleted": [], "kept": [], "tmp": []}}
    with pytest.raises(UserError, match=r"invalid alias '\.\./x'"):
        registry.rollback(reg, "nope", alias="../x")
