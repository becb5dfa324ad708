"""Training plane: metrics, loss masking, configs, the loop in-process, registry, evaluate, fault tolerance."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ecomray import registry
from ecomray.data.prepare import run as prepare
from ecomray.metrics import rank_of_target, ranking_sums
from ecomray.models.sasrec import SASRec
from ecomray.runtime import UserError, to_plain
from ecomray.tasks import next_item
from ecomray.train.driver import fit

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_cfg(name: str, tmp: Path, *overrides: str) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return to_plain(compose(name, overrides=[f"paths.root={tmp}", *overrides]))


def test_ranking_metrics_against_hand_computed_values() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # target 2 (0.5): one higher -> rank 1
                           [0.1, 0.2, 0.3, 0.4],    # target 0: three higher -> rank 3
                           [0.0, 1.0, 0.0, 0.0]])   # target 1: rank 0
    rank = rank_of_target(scores, torch.tensor([2, 0, 1]))
    assert rank.tolist() == [1, 3, 0]
    s = ranking_sums(rank, ks=(1, 2, 5))
    assert s["hr@1"] == 1 and s["hr@2"] == 2 and s["hr@5"] == 3
    assert s["ndcg@2"] == pytest.approx(1 / np.log2(3) + 1.0)
    assert s["ndcg@5"] == pytest.approx(1 / np.log2(3) + 1 / np.log2(5) + 1.0)


def test_history_exclusion_and_sampled_ranking() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    hist = [np.array([1, 2])]            # 1-based ids: items 0 and 1 (the two best) are in the history
    target = np.array([4])               # 1-based -> column 3, two strictly higher after exclusion
    assert next_item.rank_targets(scores, hist, target, exclude_history=False).tolist() == [3]
    assert next_item.rank_targets(scores, hist, target, exclude_history=True).tolist() == [1]
    r1 = next_item.rank_targets(scores, hist, target, True, sampled=3, seed=7)
    assert r1.tolist() == next_item.rank_targets(scores, hist, target, True, sampled=3, seed=7).tolist()


def test_loss_ignores_padding_positions() -> None:
    torch.manual_seed(0)
    model = SASRec(num_items=20, max_len=6, dim=8, dropout=0.0).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6]])
    target = torch.tensor([[0, 0, 4, 5, 6, 7]])
    base = next_item.loss_step(model, {"seq": seq, "target": target})
    # what sits in padded positions of the input (masked out) must not change the loss
    noisy = next_item.loss_step(model, {"seq": torch.tensor([[0, 0, 3, 4, 5, 6]]), "target": target})
    assert torch.allclose(base, noisy)
    # the loss equals the mean CE over the four real positions only
    h = model(seq)[0, 2:]
    manual = torch.nn.functional.cross_entropy(h @ model.item_weights().T, target[0, 2:] - 1)
    assert torch.allclose(base, manual)
    # causal: the hidden state at t does not depend on items after t
    later = model(torch.tensor([[0, 0, 3, 4, 5, 9]]))
    assert torch.allclose(model(seq)[0, :5], later[0, :5], atol=1e-6)
    sampled = next_item.loss_step(model, {"seq": seq, "target": target, "negatives": torch.tensor([1, 2, 4])})
    assert torch.isfinite(sampled)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_builds_its_model(experiment: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train", tmp_path, f"experiment={experiment}")
    assert cfg["paths"]["registry"].startswith(str(tmp_path))
    model = instantiate(cfg["model"], num_items=50) if cfg["task"]["name"] == "next_item" else None
    if model is not None:
        assert model(torch.zeros(2, cfg["model"]["max_len"], dtype=torch.long)).shape[:2] == (2, cfg["model"]["max_len"])
    compose_cfg("pipeline", tmp_path, f"experiment={experiment}")
    compose_cfg("evaluate", tmp_path, f"experiment={experiment}")


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = compose_cfg("train", tmp, "experiment=tiny", "scaling=inproc", "train.epochs=8")
    prepare(cfg)
    return cfg, fit(cfg)


def test_tiny_in_process_trains_registers_and_beats_popularity(tiny_trained) -> None:
    from ecomray.evaluation import evaluate_version

    cfg, out = tiny_trained
    m = out["metrics"]
    for key in ("val/ndcg@10", "val/hr@10", "test/ndcg@10", "test/hr@20", "test/ndcg@5"):
        assert 0.0 <= m[key] <= 1.0
    folder = Path(cfg["paths"]["registry"]) / out["name"] / out["version"]
    assert sorted(os.listdir(folder)) == ["config.yaml", "lineage.json", "meta.json", "metrics.json", "model.pt"]
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["data_manifest_hash"] and lineage["seed"] == 42 and lineage["research_only"] is False
    torch.load(folder / "model.pt", weights_only=True)
    report = evaluate_version({**cfg, "evaluate": {"split": "test", "baselines": True}})
    rows = report["metrics"]
    assert rows["model"]["ndcg@10"] == pytest.approx(m["test/ndcg@10"], rel=1e-6)  # re-scoring reproduces it
    assert rows["model"]["ndcg@10"] > 1.5 * rows["popularity"]["ndcg@10"]
    assert rows["oracle"]["ndcg@10"] > rows["popularity"]["ndcg@10"]


def test_predict_matches_offline_scores(tiny_trained) -> None:
    cfg, out = tiny_trained
    found = registry.load(cfg["paths"]["registry"], out["name"], out["version"])
    model = instantiate(found["config"]["model"], num_items=found["meta"]["num_items"])
    model.load_state_dict(found["state_dict"])
    items = found["meta"]["item_ids"]
    top = next_item.predict(model, found["meta"], [[items[3], items[7], "not-an-item"]], k=5)
    assert len(top[0]) == 5 and items[3] not in [i for i, _ in top[0]]
    scores = [s for _, s in top[0]]
    assert scores == sorted(scores, reverse=True)


def test_registry_is_atomic_and_refuses_escapes(tmp_path: Path) -> None:
    root = str(tmp_path / "reg")
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(registry.register(
        root, "m", {"w": torch.ones(1)}, {"seed": 1}, {}, {}, {}))) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == [f"v{k:04d}" for k in range(1, 7)]
    assert not [p for p in os.listdir(tmp_path / "reg" / "m") if p.startswith(".tmp")]
    registry.set_alias(root, "m", "best", "v0003")
    assert registry.resolve(root, "m") == "v0003"
    registry.set_alias(root, "m", "prod", "v0002")
    assert registry.resolve(root, "m") == "v0002" and registry.resolve(root, "m", "latest") == "v0006"
    for bad in ("../x", "/etc", "a/../../b"):
        with pytest.raises(UserError):
            registry.load(root, bad)
    with pytest.raises(UserError):
        registry.load(root, "m", "../../m")


def test_fault_tolerance_resume_matches_uninterrupted_run(tmp_path: Path, ray_session) -> None:
    """Two Ray Train workers (DDP, gloo). One run raises once mid-epoch 2; it must resume from the last
    checkpoint and end with the same metrics as the run that never failed."""
    base = ["experiment=tiny", "scaling=cpu2", "train.epochs=3", "train.patience=10", "dataset.synthetic.users=800"]
    cfg = compose_cfg("train", tmp_path, *base)
    prepare(cfg)
    clean = fit({**cfg, "run_name": "clean"}, register=False)
    failed = fit({**compose_cfg("train", tmp_path, *base, "train.fail_at_step=5", "train.max_failures=1"),
                  "run_name": "failed"}, register=False)
    assert (tmp_path / "train" / "failed.failed_once").exists()   # it really failed once
    for key, value in clean["metrics"].items():
        if key.startswith(("val/", "test/")):
            assert failed["metrics"][key] == pytest.approx(value, rel=1e-4), key
    assert [h["train/loss"] for h in failed["history"]] == pytest.approx([h["train/loss"] for h in clean["history"]], rel=1e-4)
