"""Next-item family and the training plane in-process: sequences, loss masking, configs, tiny train -> registry ->
evaluate -> predict, and the baselines in the same harness."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ecomray import registry
from ecomray.data.prepare import run as prepare
from ecomray.models.sasrec import SASRec
from ecomray.config import compose
from ecomray.runtime import UserError
from ecomray.tasks import load_task, next_item
from ecomray.tasks.next_item_baselines import item_knn
from ecomray.train.driver import check_train_config, fit
from tests.conftest import write_fake_events_shards

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_cfg(name: str, tmp: Path, *overrides: str) -> dict:
    """A job's config as the jobs compose it (with the config groups chosen, as `choices`), under `tmp`."""
    return compose(name, [f"paths.root={tmp}", *overrides])


FUNNEL = [("u1", "a", "view"), ("u1", "a", "click"), ("u1", "b", "view"), ("u1", "a", "purchase"),
          ("u1", "c", "view"), ("u1", "d", "cart"), ("u1", "e", "view"),
          ("u2", "b", "view"), ("u2", "c", "purchase"), ("u2", "d", "purchase"), ("u2", "e", "purchase")]


def _fake_cfg(tmp: Path, **task: object) -> dict:
    cfg = compose_cfg("train", tmp, "dataset.name=fake")
    cfg["task"].update(task)
    write_fake_events_shards(tmp / "data" / "fake", FUNNEL)
    return cfg


def test_sequences_dedupe_first_interaction_and_leave_one_out(tmp_path: Path) -> None:
    data = next_item.build_data(_fake_cfg(tmp_path, dedupe="first_interaction"), 0, 1)
    assert data.item_ids == ["a", "b", "c", "d", "e"]
    seqs = {u: [data.item_ids[k - 1] for k in s] for u, s in zip(data.users, data.seqs)}
    assert seqs == {"u1": ["a", "b", "c", "d", "e"], "u2": ["b", "c", "d", "e"]}
    _, hist, target = next_item.eval_rows(data, "test")
    assert [data.item_ids[t - 1] for t in target] == ["e", "e"]
    _, hist, target = next_item.eval_rows(data, "val")
    assert [data.item_ids[t - 1] for t in target] == ["d", "d"] and [len(h) for h in hist] == [3, 2]
    # training windows never contain a val or test item
    batch = next(next_item.train_batches(data, 0, 0, 8))
    assert set(batch["target"][batch["target"] > 0].tolist()) <= {2, 3}   # b, c


def test_sequences_keep_repeats_and_filter_events(tmp_path: Path) -> None:
    data = next_item.build_data(_fake_cfg(tmp_path, dedupe="none", sequence_events=["purchase"]), 0, 1)
    seqs = {u: [data.item_ids[k - 1] for k in s] for u, s in zip(data.users, data.seqs)}
    assert seqs == {"u1": ["a"], "u2": ["c", "d", "e"]} and data.item_ids == ["a", "c", "d", "e"]
    # workers read disjoint shard files, with one catalogue
    parts = [next_item.build_data(_fake_cfg(tmp_path, dedupe="none"), r, 2) for r in range(2)]
    assert sorted(parts[0].users + parts[1].users) == ["u1", "u2"]
    assert parts[0].item_ids == parts[1].item_ids


def test_flat_sequences_match_the_frame_reference_and_per_row_padding(tmp_path: Path) -> None:
    """build_data reads one shard at a time into a flat array: users, sequences and popularity are what
    `read_sequences` over all files gives, and train_batches' windows are `_left_pad` of each training part."""
    rng = np.random.default_rng(0)
    rows = [(f"u{u:02d}", f"i{rng.integers(0, 9)}", str(rng.choice(["view", "click", "purchase"])))
            for u in rng.permutation(30) for _ in range(int(rng.integers(1, 12)))]
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "model.max_len=4")
    cfg["task"].update(dedupe="first_interaction", num_negatives=3)
    write_fake_events_shards(tmp_path / "data" / "fake", rows, shards=3)
    data = next_item.build_data(cfg, 0, 1)
    ref = next_item.read_sequences(cfg["task"], data.files)
    index = {item: k + 1 for k, item in enumerate(data.item_ids)}
    assert data.users == ref["user_id"].to_list() == sorted(data.users) and len(data.users) == 30
    assert [s.tolist() for s in data.seqs] == [[index[i] for i in items] for items in ref["items"].to_list()]
    parts = [s[:-2] if len(s) >= 3 else s for s in data.seqs]
    pop = np.zeros(data.num_items)
    for p in parts:
        np.add.at(pop, p - 1, 1.0)
    assert np.array_equal(data.popularity, pop)
    train = [p for p in parts if len(p) >= 2]
    g = torch.Generator().manual_seed(5 * 100_003 + 2)
    order = torch.randperm(len(train), generator=g).tolist()
    assert next_item.num_batches(data, 2, 5, 8) == len(list(next_item.train_batches(data, 2, 5, 8))) == -(-len(train) // 8)
    for lo, batch in zip(range(0, len(order), 8), next_item.train_batches(data, 2, 5, 8), strict=True):
        picked = [train[k] for k in order[lo:lo + 8]]
        assert torch.equal(batch["seq"], next_item._left_pad([r[:-1] for r in picked], 4))
        assert torch.equal(batch["target"], next_item._left_pad([r[1:] for r in picked], 4))
        assert torch.equal(batch["negatives"], torch.randint(1, data.num_items + 1, (3,), generator=g))


def test_loss_counts_real_positions_only() -> None:
    torch.manual_seed(0)
    model = SASRec(num_items=20, max_len=6, dim=8, dropout=0.0).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6]])
    target = torch.tensor([[0, 0, 4, 5, 6, 7]])
    base = next_item.loss_step(model, {"seq": seq, "target": target})
    h = model(seq)[0, 2:]                                                  # the four real positions
    manual = torch.nn.functional.cross_entropy(h @ model.item_weights().T, target[0, 2:] - 1)
    assert torch.allclose(base, manual)
    smooth = torch.nn.functional.cross_entropy(h @ model.item_weights().T, target[0, 2:] - 1, label_smoothing=0.1)
    assert torch.allclose(next_item.loss_step(model, {"seq": seq, "target": target,
                                                      "label_smoothing": torch.tensor(0.1)}), smooth)
    assert not torch.allclose(smooth, manual)
    # a padded target position contributes nothing: the loss over 3 real targets is the mean over those 3
    target3 = torch.tensor([[0, 0, 0, 5, 6, 7]])
    manual3 = torch.nn.functional.cross_entropy(model(seq)[0, 3:] @ model.item_weights().T, target3[0, 3:] - 1)
    assert torch.allclose(next_item.loss_step(model, {"seq": seq, "target": target3}), manual3)
    # a longer left padding does not change the real positions' hidden states (padding keys are masked)
    longer = SASRec(num_items=20, max_len=8, dim=8, dropout=0.0).eval()
    longer.load_state_dict({**model.state_dict(), "pos_emb.weight": torch.cat(
        [torch.zeros(2, 8), model.state_dict()["pos_emb.weight"]])})
    assert torch.allclose(longer(torch.tensor([[0, 0, 0, 0, 3, 4, 5, 6]]))[0, 4:], h, atol=1e-5)
    # ... and a batch padded only to its longest row (what train_batches and evaluation build) gives the same
    # states as padding to max_len: positions count from the right
    trimmed = next_item._left_pad([np.array([3, 4, 5, 6]), np.array([7, 8])], 6)
    assert trimmed.shape == (2, 4)
    full = model(torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 7, 8]]))
    assert torch.allclose(model(trimmed), full[:, 2:], atol=1e-6)
    assert torch.allclose(model(trimmed)[:, -1], full[:, -1], atol=1e-6)
    # causal: position t does not see items after t
    later = model(torch.tensor([[0, 0, 3, 4, 5, 9]]))
    assert torch.allclose(model(seq)[0, :5], later[0, :5], atol=1e-6)
    # sampled softmax: positive in column 0, shared negatives, accidental hits masked
    neg = torch.tensor([1, 2, 5])
    w = model.item_weights()
    hs, ts = model(seq)[0, 2:], target[0, 2:]
    logits = torch.cat([(hs * w[ts - 1]).sum(-1, keepdim=True), hs @ w[neg - 1].T], 1)
    logits[:, 1:] = logits[:, 1:].masked_fill(neg[None] == ts[:, None], float("-inf"))
    expect = torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    got = next_item.loss_step(model, {"seq": seq, "target": target, "negatives": neg})
    assert torch.allclose(got, expect)
    # ... with label smoothing: finite although negative 5 is a target (an accidental hit), and spread over the
    # real candidates only: (1-e) nll + e * mean over the unmasked columns of -log_softmax
    logp = torch.log_softmax(logits, 1)
    valid = torch.isfinite(logits)
    smooth = -(logp.masked_fill(~valid, 0).sum(1) / valid.sum(1))
    expect_ls = (0.9 * -logp[:, 0] + 0.1 * smooth).mean()
    got_ls = next_item.loss_step(model, {"seq": seq, "target": target, "negatives": neg,
                                         "label_smoothing": torch.tensor(0.1)})
    assert torch.isfinite(got_ls) and torch.allclose(got_ls, expect_ls)
    no_hit = torch.tensor([1, 2, 3])          # no target among them: exactly PyTorch's label smoothing
    logits_nh = torch.cat([(hs * w[ts - 1]).sum(-1, keepdim=True), hs @ w[no_hit - 1].T], 1)
    assert torch.allclose(next_item.loss_step(model, {"seq": seq, "target": target, "negatives": no_hit,
                                                      "label_smoothing": torch.tensor(0.1)}),
                          torch.nn.functional.cross_entropy(logits_nh, torch.zeros(4, dtype=torch.long),
                                                            label_smoothing=0.1))


def test_ensemble_members_train_on_their_own_loss_and_rank_by_mean_log_softmax() -> None:
    from ecomray.models.sasrec_ensemble import SASRecEnsemble

    torch.manual_seed(0)
    ens = SASRecEnsemble(num_items=20, members=3, max_len=6, dim=8, dropout=0.0).eval()
    seq, target = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5]]), torch.tensor([[0, 0, 4, 5, 6, 7], [0, 2, 3, 4, 5, 6]])
    members = list(ens.members)
    assert ens(seq).shape == (3, 2, 6, 8) and ens.item_weights().shape == (3, 20, 8)
    assert not torch.allclose(members[0].item_weights(), members[1].item_weights())   # independent inits
    # the ensemble's loss is the sum of each member's own loss
    each = [next_item.loss_step(m, {"seq": seq, "target": target}) for m in members]
    assert torch.allclose(next_item.loss_step(ens, {"seq": seq, "target": target}), sum(each))
    # a member's gradient does not depend on the other members
    ens.zero_grad()
    next_item.loss_step(ens, {"seq": seq, "target": target}).backward()
    alone = SASRecEnsemble(num_items=20, members=1, max_len=6, dim=8, dropout=0.0).eval()
    alone.members[0].load_state_dict(members[1].state_dict())
    next_item.loss_step(alone, {"seq": seq, "target": target}).backward()
    assert torch.allclose(members[1].item_emb.weight.grad, alone.members[0].item_emb.weight.grad, atol=1e-6)
    # scores: the mean over members of the log-softmax over the catalogue
    hist = [np.array([3, 4, 5, 6]), np.array([7])]
    got = next_item.score_histories(ens, hist, 6)
    expect = torch.stack([torch.log_softmax(next_item.score_histories(m, hist, 6), 1) for m in members]).mean(0)
    assert got.shape == (2, 20) and torch.allclose(got, expect, atol=1e-5)


def test_item_knn_scores_co_occurring_items(tmp_path: Path) -> None:
    data = next_item.build_data(_fake_cfg(tmp_path, dedupe="first_interaction"), 0, 1)
    parts = [q[:-2] if len(q) >= 3 else q for q in data.seqs]              # training parts: a b c, b c
    score = item_knn(parts, data.num_items, shrink=0.0)(data.seqs[:1], [0])[0]
    a, b, c = (data.item_ids.index(x) for x in "abc")
    assert score[a] > 0 and score[b] > 0 and score[data.item_ids.index("e")] == 0


@pytest.mark.parametrize("override,message", [
    ("train.epochs=0", r"train.epochs=0: must be an integer >= 1"),
    ("train.epochs=2.5", r"train.epochs=2.5: must be an integer >= 1"),
    ("train.batch_size=0", r"train.batch_size=0: must be an integer >= 1"),
    ("optim.lr=-1", r"optim.lr=-1: must be a number > 0"),
    ("optim.lr=nan", r"optim.lr=nan: must be a number > 0"),
    ("train.time_budget_s=0", r"train.time_budget_s=0: must be a number > 0"),
    ("scaling.num_workers=-2", r"scaling.num_workers=-2: must be an integer >= 0"),
    # each of these was a Ray or torch traceback, or a run that registered garbage
    ("train.mode=maxx", r"train.mode='maxx': max or min"),
    ("train.checkpoints_to_keep=0", r"train.checkpoints_to_keep=0: must be an integer >= 1"),
    ("seed=-1", r"seed=-1: must be an integer in 0 .. 2\*\*32-1"),
    ("train.grad_clip=-1", r"train.grad_clip=-1: must be a number > 0"),
    ("train.ema_decay=1.0", r"train.ema_decay=1.0: must be a number in \[0, 1\)"),
    ("train.lr_plateau={factor: 2.0}", r"train.lr_plateau.factor=2.0: must be a number in \(0, 1\)"),
    ("train.max_failures=-2", r"train.max_failures=-2: must be an integer >= 0 \(-1: retry for ever\)"),
    ("run_name=../escape", r"run_name='../escape': letters, digits"),
    ("+registry_name=a/b", r"registry_name='a/b': letters, digits"),
])
def test_numbers_no_run_can_start_from_are_named_before_ray(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        fit(compose_cfg("train", tmp_path, "experiment=tiny", override))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_builds_its_model(experiment: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train", tmp_path, f"experiment={experiment}")
    assert cfg["paths"]["registry"].startswith(str(tmp_path)) and cfg["train"]["monitor"].startswith("val/")
    assert load_task(cfg).__name__ == cfg["task"]["module"]
    check_train_config(cfg)                       # its numbers are ones a run can start from
    if cfg["task"]["name"] == "next_item":
        model = instantiate(cfg["model"], num_items=50)
        T = cfg["model"]["max_len"]
        out = model(torch.ones(2, T, dtype=torch.long))
        members = (cfg["model"]["members"],) if "members" in cfg["model"] else ()
        assert out.shape == (*members, 2, T, cfg["model"]["dim"])
    for root in ("pipeline", "evaluate"):
        compose_cfg(root, tmp_path, f"experiment={experiment}")


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = compose_cfg("train", tmp, "experiment=tiny", "scaling=inproc")
    prepare(cfg)
    return cfg, fit(cfg)


def test_tiny_trains_registers_and_evaluate_reproduces_it(tiny_trained, capsys: pytest.CaptureFixture) -> None:
    from ecomray.evaluation import evaluate_version

    cfg, out = tiny_trained
    m = out["metrics"]
    assert {"val/ndcg@10", "val/hr@10", "test/ndcg@10", "test/hr@20", "test/ndcg@5"} <= set(m)
    losses = [h["train/loss"] for h in out["history"]]
    assert losses[-1] < losses[0]
    folder = Path(cfg["paths"]["registry"]) / out["name"] / out["version"]
    assert out["name"] == "next_item_synthetic"
    assert sorted(os.listdir(folder)) == ["config.yaml", "lineage.json", "meta.json", "metrics.json", "model.pt",
                                          "version.json"]
    info = json.loads((folder / "version.json").read_text())
    assert info == {"format": 2, "task": "next_item", "module": "ecomray.tasks.next_item",
                    "key_metrics": list(next_item.KEY_METRICS),
                    "weights": {"file": "model.pt", "bytes": (folder / "model.pt").stat().st_size,
                                "sha256": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()}}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model_kwargs"] == {"num_items": meta["num_items"]} and meta["examples"]
    assert set(meta["item_categories"]) == set(meta["item_ids"])      # self-contained: serving reads no shards
    lineage = json.loads((folder / "lineage.json").read_text())
    assert len(lineage["data_manifest_hash"]) == 64 and lineage["seed"] == cfg["seed"]
    assert lineage["research_only"] is False and lineage["licence"] and "torch" in lineage["packages"]
    assert json.loads((folder / "metrics.json").read_text())["test/ndcg@10"] == m["test/ndcg@10"]
    report = evaluate_version({**cfg, "evaluate": {"model": f"{out['name']}:{out['version']}", "split": "test",
                                                   "task": {"eval_sampled": 100}}})
    rows = report["metrics"]
    assert rows["model"]["ndcg@10"] == pytest.approx(m["test/ndcg@10"], rel=1e-6)   # re-scoring reproduces it
    assert set(rows) == {"model", "popularity", "item_knn", "oracle"}
    assert rows["model"]["ndcg@10"] > 1.5 * rows["popularity"]["ndcg@10"]
    assert rows["oracle"]["ndcg@10"] > rows["popularity"]["ndcg@10"]
    assert rows["model"]["sampled_hr@10"] > rows["model"]["hr@10"]            # 100 negatives are easier than all
    table = capsys.readouterr().out                                          # ... and the table shows them
    assert "sampled_ndcg@10" in table and f"{rows['model']['sampled_ndcg@10']:.4f}" in table
    val = evaluate_version({**cfg, "evaluate": {"split": "val", "baselines": False}})
    assert val["metrics"]["model"]["ndcg@10"] == pytest.approx(m["val/ndcg@10"], rel=1e-6)
    with pytest.raises(UserError, match=r"evaluate.split='tset': use val or test"):
        evaluate_version({**cfg, "evaluate": {"split": "tset"}})
    # a typo in evaluate.task was ignored (the defaults' figures); a non-mapping was a TypeError
    with pytest.raises(UserError, match=r"evaluate.task: .* has no setting\(s\) \['eval_sampeld'\]"):
        evaluate_version({**cfg, "evaluate": {"task": {"eval_sampeld": 100}}})
    with pytest.raises(UserError, match=r"evaluate.task=5: write a mapping"):
        evaluate_version({**cfg, "evaluate": {"task": 5}})
    # a setting that builds the data (which events make a sequence) is not the version's scoring: refused
    with pytest.raises(UserError, match=r"evaluate.task: \['dedupe'\] change\(s\) how task next_item builds its data "
                                        r"or features.*takes \['baselines', 'eval_batch_size'"):
        evaluate_version({**cfg, "evaluate": {"task": {"dedupe": "none", "eval_sampled": 10}}})
    # a value that is not a file name (a '/', braces) names the report by a hash of the overrides instead
    odd = evaluate_version({**cfg, "evaluate": {"task": {"eval_sampled": 0, "exclude_history": True,
                                                         "baselines": {"item_knn": {"neighbours": 5}}}},
                            "paths": {**cfg["paths"]}})
    assert any(p.name.startswith(f"{out['name']}-{out['version']}-test-task-")
               for p in Path(cfg["paths"]["reports"]).iterdir()) and odd["metrics"]["model"]


def test_evaluate_refuses_another_preparation_unless_asked(tiny_trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """On another preparation of the dataset the task fits its features (a tokenizer, vocabularies) again: the
    figures are not the version's (a sentiment version scored 0.68 here and 0.96 in batch_predict), so evaluate
    refuses unless evaluate.other_data=true, which warns."""
    from ecomray.data import shards
    from ecomray.evaluation import evaluate_version

    cfg, out = tiny_trained
    real = shards.require
    monkeypatch.setattr(shards, "require", lambda c, **k: {**real(c, **k), "hash": "f" * 64})
    with pytest.raises(UserError, match=r"trained on another preparation .* now ffffffffffff.*evaluate.other_data=true"):
        evaluate_version({**cfg, "evaluate": {"baselines": False}})
    report = evaluate_version({**cfg, "evaluate": {"baselines": False, "other_data": True}})
    assert report["same_data_as_training"] is False
    # named apart from the version's own evaluation, which it used to replace
    assert (Path(cfg["paths"]["reports"]) / f"{out['name']}-{out['version']}-test-other_data.json").exists()
    # `other_data=no` counted as true: it scored the version on data it never saw
    with pytest.raises(UserError, match=r"evaluate.other_data='no': true or false"):
        evaluate_version({**cfg, "evaluate": {"other_data": "no"}})


@pytest.mark.parametrize("evaluate,message", [
    ({"baselines": "no"}, r"evaluate.baselines='no': true or false"),
    ({"splt": "val"}, r"evaluate: unknown setting\(s\) \['splt'\]"),
    ({"task": {"eval_sampled": -5}}, r"task.eval_sampled=-5: must be an integer in 0 \.\. "),   # was a perfect score
    ({"task": {"eval_sampled": 100000}}, r"task.eval_sampled=100000: must be an integer in 0 \.\. "),
    ({"task": {"eval_sampled": 2.5}}, r"task.eval_sampled=2.5"),
    ({"task": {"eval_batch_size": 0}}, r"task.eval_batch_size=0: must be an integer >= 1"),
    ({"task": {"exclude_history": "no"}}, r"task.exclude_history='no': true or false"),
    ({"task": {"baselines": {"item_knn": {"neighbourz": 5}}}}, r"task.baselines=.*unexpected keyword.*neighbourz"),
])
def test_evaluate_settings_are_typed(evaluate: dict, message: str, tiny_trained) -> None:
    """Each was a traceback, or worse, a table of figures that were not what was asked for."""
    from ecomray.evaluation import evaluate_version

    cfg, _ = tiny_trained
    with pytest.raises(UserError, match=message):
        evaluate_version({**cfg, "evaluate": evaluate})


def test_the_pipeline_checks_its_evaluate_settings_before_any_stage(tmp_path: Path) -> None:
    """`evaluate.split=tset` failed after prepare and train had run (and registered a version); an explicit
    `evaluate.model` was replaced by the version the train stage made, without a word; a stage listed twice ran
    twice."""
    from jobs.pipeline import run as pipeline

    for over, message in (("evaluate.split=tset", r"evaluate.split='tset'"),
                          ("evaluate.model=next_item_synthetic:v0001", r"evaluate.model names a version, but the "
                                                                       r"evaluate stage scores the version the train"),
                          ("pipeline.stages=[evaluate,evaluate]", r"a stage is listed twice")):
        with pytest.raises(UserError, match=message):
            pipeline(compose_cfg("pipeline", tmp_path, "pipeline.stages=[prepare,train,evaluate]", over)
                     if "stages" not in over else compose_cfg("pipeline", tmp_path, over))
    assert not (tmp_path / "data").exists() and not (tmp_path / "registry").exists()


def test_predict_serves_the_registered_model(tiny_trained) -> None:
    cfg, out = tiny_trained
    found = registry.load(cfg["paths"]["registry"], out["name"], "latest")
    model = instantiate(found["config"]["model"], num_items=found["meta"]["num_items"])
    model.load_state_dict(found["state_dict"])
    items = found["meta"]["item_ids"]
    top = next_item.predict(model, found["meta"], [[items[3], items[7], "not-an-item"], []], k=5)
    assert [len(t) for t in top] == [5, 5] and items[3] not in [i for i, _ in top[0]]
    scores = [s for _, s in top[0]]
    assert scores == sorted(scores, reverse=True)
    # the same ranking as the offline scorer
    offline = next_item.score_histories(model, [np.array([4, 8])], found["meta"]["max_len"])[0]
    offline[[3, 7]] = float("-inf")
    assert [items[int(i)] for i in torch.topk(offline, 5).indices] == [i for i, _ in top[0]]
    # a k past the rest of the catalogue: every other item, never the history (it came last, with score -inf)
    (every,) = next_item.predict(model, found["meta"], [[items[3], items[7], items[3]]], k=len(items) + 5)
    assert len(every) == len(items) - 2 and {items[3], items[7]}.isdisjoint(i for i, _ in every)
    assert all(np.isfinite(s) for _, s in every)
    assert len(next_item.predict(model, found["meta"], [[items[3]]], k=len(items), exclude_history=False)[0]) == len(items)


def test_time_budget_stops_after_the_epoch_that_spends_it(tmp_path: Path) -> None:
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=5", "train.patience=100", "train.time_budget_s=1e-6")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    out = fit(cfg, register=False)
    assert len(out["history"]) == 1 and out["history"][0]["stopped_early"] == 1.0
    out = fit({**cfg, "train": {**cfg["train"], "time_budget_s": None}, "run_name": "nobudget"}, register=False)
    assert len(out["history"]) == 5


def test_patience_null_trains_every_epoch(tmp_path: Path) -> None:
    """`train.patience=null` (no early stopping) crashed after the first epoch: int(None)."""
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=3", "train.patience=null")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    assert len(fit(cfg, register=False)["history"]) == 3


def test_weights_trained_on_data_prepared_again_meanwhile_are_not_registered(tmp_path: Path) -> None:
    """`jobs.prepare ... overwrite=true` during a long run: the new split's val/test rows may be training rows, and
    the lineage would name data the model never saw."""
    from ecomray.train.driver import evaluate_checkpoint

    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=1")
    manifest = write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    out = fit(cfg, register=False, evaluate=False)
    (tmp_path / "data" / "fake" / "manifest.json").write_text(json.dumps({**manifest, "hash": "f" * 64}))
    with pytest.raises(UserError, match="prepared again while this run trained"):
        evaluate_checkpoint(cfg, out["checkpoint"], register=True, data_hash=manifest["hash"])
    assert registry.versions(cfg["paths"]["registry"], registry.model_name(cfg)) == []
    assert evaluate_checkpoint(cfg, out["checkpoint"], register=False, data_hash="f" * 64)["metrics"]


def prepared_again_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> dict:
    """A tiny fake dataset whose manifest hash is not the one fit's driver reads: as if `jobs.prepare ...
    overwrite=true` ran between the driver's check and the workers' first read. Returns the train config."""
    from ecomray.data import shards

    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "model.max_len=6", "model.dim=8", "train.epochs=1",
                      *overrides)
    manifest = write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    (tmp_path / "data" / "fake" / "manifest.json").write_text(json.dumps({**manifest, "hash": "a" * 64}))
    real = shards.require
    monkeypatch.setattr(shards, "require", lambda *a, **k: {**real(*a, **k), "hash": "b" * 64})   # what the driver read
    return cfg


def test_data_prepared_again_before_the_workers_read_it_stops_the_run_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A re-prepare between the driver's manifest check and the workers' first read used to train the whole run on
    the new data, which the end-of-run check then refused. The workers check the hash as they read the data."""
    cfg = prepared_again_meanwhile(tmp_path, monkeypatch, "scaling=inproc")
    with pytest.raises(UserError, match=r"prepared again as this run started \(manifest hash bbbbbbbbbbbb -> aaaa"):
        fit(cfg, register=False)
    assert "[train] epoch" not in capsys.readouterr().out


@pytest.mark.parametrize("override,message", [("paths.registry=/proc/ecomray", "paths.registry: cannot write to"),
                                               ("paths.runs=/proc/ecomray", "paths.runs: cannot write to")])
def test_folders_written_at_the_end_are_checked_before_training(override: str, message: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """An unwritable registry used to fail with an OSError traceback after the whole run had trained."""
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=1", override)
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    with pytest.raises(UserError, match=message):
        fit(cfg)
    assert "[train] epoch" not in capsys.readouterr().out


def test_an_in_process_run_leaves_no_checkpoint_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs report their checkpoint folders themselves; the last one used to stay in /tmp for ever."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=2", "train.patience=100")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    out = fit(cfg, register=False)
    assert len(out["history"]) == 2
    assert not list((tmp_path / "tmp").glob("ecomray-ckpt-*"))


def test_time_budget_ends_a_long_epoch_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    from ecomray.train import loop

    monkeypatch.setattr(loop, "BUDGET_CHECK_STEPS", 1)          # look after every step (50 in real runs)
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=3", "train.patience=100", "train.batch_size=1", "train.time_budget_s=1e-6")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    out = fit(cfg, register=False)
    assert len(out["history"]) == 1 and out["history"][0]["stopped_early"] == 1.0
    assert "spent at step 1 of" in capsys.readouterr().out       # one step trained, then evaluated and stopped


def test_more_workers_than_shards_is_an_error_not_an_epoch_of_no_steps(tmp_path: Path) -> None:
    """Each worker reads whole shards: with more workers than shards one had no user, and the loop (the same number
    of steps on every worker: the fewest) trained nothing, without a word."""
    from ecomray.data import shards

    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    n = len(shards.shard_files(shards.dataset_dir(cfg)))
    with pytest.raises(UserError, match=rf"has {n} shard\(s\) for {n + 1} training workers: prepare it with "
                                        rf"prepare.shards={n + 1} or more"):
        next_item.build_data(cfg, 0, n + 1)
    next_item.build_data(cfg, n - 1, n)            # one shard each is fine


def test_a_non_finite_figure_never_beats_a_finite_one() -> None:
    from ecomray.train.loop import _better

    nan, inf = float("nan"), float("inf")
    assert _better(nan, None, "max")                                # the first epoch is kept, whatever it scored
    assert _better(0.1, nan, "max") and _better(0.1, inf, "min")    # and any finite figure replaces a non-finite best
    assert not _better(nan, 0.1, "max") and not _better(inf, 0.1, "max") and not _better(-inf, 0.1, "min")
    assert _better(0.2, 0.1, "max") and _better(0.1, 0.2, "min") and not _better(0.1, 0.1, "max")


@pytest.mark.parametrize("from_epoch", [1, 0])
def test_a_diverged_run_stops_and_keeps_its_best_finite_epoch(from_epoch: int, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """A NaN loss made the weights NaN: every target ranked -1 (HR 1, NDCG inf), that epoch was kept as the best
    and nothing could beat it. Now a non-finite loss stops the run before that epoch is scored, with the best
    earlier epoch kept, or, with none, is one error."""
    epochs = {"n": 0}
    real_loss, real_eval = next_item.loss_step, next_item.evaluate

    def loss_step(model, batch):
        loss = real_loss(model, batch)
        return loss * float("nan") if epochs["n"] >= from_epoch else loss

    def evaluate(model, data, split, *a, **k):
        out = real_eval(model, data, split, *a, **k)
        epochs["n"] += split == "val"
        return out

    monkeypatch.setattr(next_item, "loss_step", loss_step)
    monkeypatch.setattr(next_item, "evaluate", evaluate)
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=4", "train.patience=100")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    if from_epoch == 0:
        with pytest.raises(UserError, match=r"epoch 0: the training loss is nan: the model diverged .*no earlier "
                                            r"epoch to keep"):
            fit(cfg, register=False, evaluate=False)
        return
    out = fit(cfg, register=False)
    assert len(out["history"]) == 1                     # epoch 1 was neither scored nor reported
    assert "early stop: epoch 1: the training loss is nan" in capsys.readouterr().out
    best = out["history"][0]["val/ndcg@10"]
    assert math.isfinite(best) and out["history"][-1]["best/val/ndcg@10"] == best
    assert out["metrics"]["best_epoch"] == 0 and out["metrics"]["val/ndcg@10"] == pytest.approx(best)   # its weights


def test_ema_weights_are_the_ones_evaluated_and_checkpointed(tmp_path: Path) -> None:
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=2", "train.patience=100", "train.ema_decay=0.5", "optim.lr=0.05")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    out = fit(cfg, register=False, evaluate=False)
    state = torch.load(Path(out["checkpoint"]) / "state.pt", weights_only=False)
    assert state["ema"].keys() == state["model"].keys()
    assert not all(torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])   # an average, not a copy
    data = next_item.build_data(cfg, 0, 1)
    model = next_item.build_model(cfg, data)
    model.load_state_dict(state["ema"])
    assert next_item.evaluate(model, data, "val")["ndcg@10"] == pytest.approx(state["history"][-1]["val/ndcg@10"])


def test_lr_plateau_decays_after_an_epoch_without_improvement() -> None:
    from ecomray.train.loop import decay_on_plateau

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    decay_on_plateau(opt, None)
    assert opt.param_groups[0]["lr"] == 1e-3
    for want in (1e-4, 1e-5, 1e-6, 1e-6):                       # never below min_lr
        decay_on_plateau(opt, {"factor": 0.1, "min_lr": 1e-6})
        assert opt.param_groups[0]["lr"] == pytest.approx(want)


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from TensorBoard event files (records: u64 length, u32 crc, payload, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos + 12 <= len(raw):
            (n,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_runs_are_tracked_in_tensorboard_and_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every epoch's metrics reach the run's TensorBoard files (tags cleaned: val/ndcg@10 -> val/ndcg_10) and, with
    tracking.mlflow_uri, an MLflow run (a local file store here) tagged with the registry version it became."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")     # MLflow 3.x keeps its file store behind a flag
    store = (tmp_path / "mlruns").as_uri()
    cfg = compose_cfg("train", tmp_path, "dataset.name=fake", "scaling=inproc", "model.max_len=6", "model.dim=8",
                      "train.epochs=2", "train.patience=100", f"tracking.mlflow_uri={store}")
    write_fake_events_shards(tmp_path / "data" / "fake", FUNNEL)
    out = fit({**cfg, "run_name": "tracked"})
    tb = tmp_path / "train" / "tracked" / "tensorboard"
    scalars = _tensorboard_scalars(tb)
    assert "val/ndcg_10" in scalars, (sorted(scalars), sorted(p.name for p in tb.glob("*")) if tb.exists() else None)
    assert [step for step, _ in scalars["val/ndcg_10"]] == [0, 1] and "train/loss" in scalars
    assert scalars["val/ndcg_10"][1][1] == pytest.approx(out["history"][1]["val/ndcg@10"], rel=1e-5)
    mlflow.set_tracking_uri(store)
    (run,) = mlflow.search_runs(experiment_names=["ecomray"], output_format="list")
    assert run.info.run_name == "tracked" and run.data.tags["registry_version"] == f"{out['name']}:{out['version']}"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val.ndcg_10")
    assert [m.step for m in history] == [0, 1] and run.data.params["model.dim"] == "8"


def test_progress_lines_only_for_long_loops(capsys: pytest.CaptureFixture) -> None:
    from ecomray.runtime import Progress

    now = [0.0]
    p = Progress("[train] epoch 0", 4, every_s=10, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 6.0
        p.update()
    p.update()                                                        # the last step prints nothing
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[train] epoch 0: 2/4 steps (50%), 6.00 s each, ~12 s left"]
    quick = Progress("x", 100, every_s=60, clock=lambda: 0.0)
    for _ in range(100):
        quick.update()
    assert capsys.readouterr().out == ""


def test_a_scaling_no_node_can_hold_is_an_error_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train would wait forever, silently, for a GPU worker on a CPU machine: the driver looks first. On a
    cluster it joined (or in a Tune trial) it only warns, since an autoscaling cluster adds nodes."""
    import ray


    from ecomray.runtime import bundles_that_fit as workers_that_fit
    from ecomray.train.driver import check_placement, worker_bundle

    gpu1 = {"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 4, "GPU": 1}}
    assert worker_bundle(gpu1) == {"CPU": 4.0, "GPU": 1.0}
    assert worker_bundle({"num_workers": 2, "use_gpu": True}) == {"GPU": 1.0}          # as Ray Train reads it
    assert worker_bundle({"use_gpu": False}) == {"CPU": 1.0}
    assert worker_bundle({"use_gpu": True, "resources_per_worker": {"GPU": 1, "CPU": 0}}) == {"GPU": 1.0}
    laptop, gpu_node = {"CPU": 2.0, "memory": 1e9}, {"CPU": 16.0, "GPU": 2.0}
    assert workers_that_fit({"CPU": 1.0}, [laptop]) == 2
    assert workers_that_fit({"CPU": 4.0, "GPU": 1.0}, [laptop, gpu_node]) == 2   # GPUs, not CPUs, bound it
    assert workers_that_fit({"CPU": 2.0}, [{"CPU": 1.0}, {"CPU": 1.0}]) == 0     # a worker is one bundle on one node

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": laptop}, {"Alive": False, "Resources": gpu_node}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: laptop)
    from ecomray import runtime

    monkeypatch.setattr(runtime, "ray_started_here", lambda: True)                # a Ray this process started
    check_placement({"scaling": {"num_workers": 2, "use_gpu": False}})            # fits: nothing said
    with pytest.raises(UserError, match=r"1 Train worker\(s\) of \{'CPU': 4.0, 'GPU': 1.0\}.* can hold 0 "
                                        r"\(cluster total \{'CPU': 2.0, 'GPU': 0.0\}\).*scaling=cpu1"):
        check_placement({"scaling": gpu1})
    monkeypatch.setattr(runtime, "ray_started_here", lambda: False)               # a cluster, or a Tune trial
    check_placement({"scaling": gpu1})                                             # a warning only


def test_a_model_config_no_model_can_be_built_from_names_the_config() -> None:
    """`model.dim=0` failed in every worker with Hydra's InstantiationException around the layer's own message
    (`embed_dim and num_heads must be greater than 0`), naming neither the model nor the setting."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from ecomray.runtime import UserError
    from ecomray.train.loop import built_model

    cfg = {"model": {"_target_": "torch.nn.MultiheadAttention", "embed_dim": 0, "num_heads": 1}}
    task = SimpleNamespace(build_model=lambda cfg, data: instantiate(cfg["model"]))
    with pytest.raises(UserError, match=r"model torch.nn.MultiheadAttention cannot be built from this config "
                                        r"\(model.embed_dim=0, model.num_heads=1\): ValueError: embed_dim and num_heads"):
        built_model(task, cfg, None)
    ok = {"model": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 1}}
    assert isinstance(built_model(SimpleNamespace(build_model=lambda cfg, data: instantiate(cfg["model"])), ok, None),
                      torch.nn.Linear)


def test_the_pipeline_deploys_the_version_it_made(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With a `prod` alias set earlier, the pipeline's deploy stage served prod (prod, else best, else the newest),
    not what the run had just trained or tuned: its report paired one version's evaluation with another's answer."""
    from jobs.pipeline import _serve_this_run

    cfg = compose_cfg("pipeline", tmp_path)
    tuned = _serve_this_run(cfg, {"train": {"name": "next_item_synthetic", "version": "v0005"},
                                  "tune": {"name": "next_item_synthetic", "version": "v0006"}})
    assert tuned["endpoints"] == {"recommend": {"model": "next_item_synthetic:v0006"}}
    assert "deploying next_item_synthetic v0006, the version this run tuned" in capsys.readouterr().out
    trained = _serve_this_run(cfg, {"train": {"name": "next_item_synthetic", "version": "v0005"}})
    assert trained["endpoints"] == {"recommend": {"model": "next_item_synthetic:v0005"}}
    assert _serve_this_run(cfg, {})["endpoints"] is None                          # a deploy-only pipeline: as set
    chosen = {**cfg, "deploy": {**cfg["deploy"], "endpoints": {"recommend": {"model": "next_item_synthetic:v0001"}}}}
    assert _serve_this_run(chosen, {"tune": {"name": "x", "version": "v0009"}}) == chosen["deploy"]


def test_evaluate_says_which_overrides_the_version_replaces(capsys: pytest.CaptureFixture) -> None:
    """`task.eval_sampled=100` on the evaluate command line was dropped without a word (the version's saved task
    settings replace it): the job names it and the knob that applies."""
    from jobs.evaluate import ignored_overrides

    assert ignored_overrides(["task.eval_sampled=100", "+model.dim=8", "dataset=online_shopping", "dataset.name=x",
                              "evaluate.split=val", "dataset.synthetic.users=5"]) == [
        "task.eval_sampled=100", "+model.dim=8", "dataset.synthetic.users=5"]


def test_a_resumed_runs_clock_goes_on_from_its_last_epoch() -> None:
    """A restart set the clock to zero: `elapsed_s` started over and so did `train.time_budget_s`."""
    from ecomray.train.loop import clock_start

    assert clock_start([], 1000.0) == 1000.0
    assert clock_start([{"elapsed_s": 30.0}, {"elapsed_s": 61.5}], 1000.0) == 938.5


def test_run_folders_are_claimed_and_a_resume_reads_an_older_record_alike(tmp_path: Path) -> None:
    """Two unnamed runs started in one second took one folder (the name is the second); a run record written when
    other keys were compared (dataset.path, the pipeline's sections, model.init_from) refused every resume."""
    from ecomray.train.driver import _check_resume, _claim, _resumable

    assert [_claim(str(tmp_path), "m-20260101-000000") for _ in range(3)] == [
        "m-20260101-000000", "m-20260101-000000-2", "m-20260101-000000-3"]
    cfg = compose_cfg("train", tmp_path, "experiment=tiny", "run_name=r")
    older = {"settings": {**json.loads(json.dumps(cfg, default=str)), "pipeline": {"stages": ["train"]}}}
    older["settings"]["dataset"]["path"] = "elsewhere"
    older["settings"]["model"].pop("init_from", None)
    assert _check_resume(cfg, older)["run_name"] == "r"
    changed = {"settings": _resumable({**cfg, "seed": 7})}
    with pytest.raises(UserError, match=r"run_name=r is a run with other settings \(seed: now 42, the run has 7"):
        _check_resume(cfg, changed)


def test_a_finished_run_continues_only_with_more_epochs_patience_or_time(tmp_path: Path) -> None:
    """An early-stopped run was re-trained by any change of patience (a lower one too: one more epoch, a new
    version); a registered number was trusted though it named another run's model."""
    from ecomray import registry
    from ecomray.train.driver import _finished

    cfg = compose_cfg("train", tmp_path, "experiment=tiny", "run_name=r", "train.patience=2")
    root = cfg["paths"]["registry"]
    v = registry.register(root, "m", {"w": torch.zeros(1)}, cfg, {"val/ndcg@10": 0.1}, {"model_kwargs": {}}, {})
    record = {"registered": {"name": "m", "version": v, "epochs_run": 4, "stopped": True, "epochs": 15,
                             "patience": 2, "time_budget_s": None}}

    def with_train(**train: Any) -> dict:
        return {**cfg, "train": {**cfg["train"], **train}}

    assert _finished(cfg, record)["version"] == v                          # the same settings: finished
    assert _finished(with_train(patience=1), record)["version"] == v       # less patience: still finished
    assert _finished(with_train(patience=5), record) is None               # more patience: it continues
    assert _finished(with_train(patience=None), record) is None            # no early stop: it continues
    assert _finished(with_train(time_budget_s=60), record)["version"] == v  # (it had no budget: not more time)
    ran = {"registered": {**record["registered"], "stopped": False, "epochs_run": 15}}
    assert _finished(cfg, ran)["version"] == v and _finished(with_train(epochs=20), ran) is None
    assert _finished({**cfg, "run_name": "other"}, record) is None          # the number names another run's model
