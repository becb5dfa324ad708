"""Model registry: atomic, immutable, numbered versions; aliases; refusing paths outside the root."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from ecomray import registry
from ecomray.runtime import UserError


def _register(root: str, value: float = 1.0) -> str:
    return registry.register(root, "m", {"w": torch.full((2,), value)}, {"seed": 1}, {"val/ndcg@10": value}, {"k": 1},
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
        assert sorted(os.listdir(found["path"])) == ["config.yaml", "lineage.json", "meta.json", "metrics.json", "model.pt"]
        assert found["metrics"]["val/ndcg@10"] == found["state_dict"]["w"][0].item()  # files of one writer, not mixed
        values.add(found["metrics"]["val/ndcg@10"])
    assert len(values) == 8


def test_aliases_and_refs(tmp_path: Path) -> None:
    root = str(tmp_path)
    for k in range(3):
        _register(root, float(k))
    assert registry.resolve(root, "m") == "v0003"                   # no alias: the newest
    registry.set_alias(root, "m", "best", "v0001")
    assert registry.resolve(root, "m") == "v0001" and registry.get_alias(root, "m", "best") == "v0001"
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
