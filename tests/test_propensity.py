"""Purchase propensity: pure feature functions, the DCN models, the task protocol on a synthetic table, and a tiny
run on the shoppers table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ecomray.features.tabular import cardinalities, fit_tabular, transform_tabular
from ecomray.models.tabular_dcn import TabularDCN
from tests.test_prepare import DATASETS
from tests.test_train_next_item import compose_cfg


def test_fit_and_transform_golden_values_and_oov() -> None:
    t = pa.table({"x": [1.0, 2.0, 3.0, 4.0], "d": [0.0, 0.0, np.e - 1, np.e - 1], "c": ["a", "b", "a", None]})
    stats = fit_tabular(t, {"numeric": ["x", "d"], "categorical": ["c"], "log": ["d"]})
    assert stats["numeric"]["x"]["mean"] == pytest.approx(2.5)
    assert stats["numeric"]["x"]["std"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert stats["numeric"]["d"]["mean"] == pytest.approx(0.5)  # log1p(e-1) = 1
    assert stats["categorical"]["c"] == ["a", "b"] and cardinalities(stats) == [3]
    out = transform_tabular(pa.table({"x": [2.5], "d": [0.0], "c": ["zzz"]}), stats)
    assert out["x"].to_pylist() == [0.0]
    assert out["c"].to_pylist() == [0]                      # unseen category -> OOV slot 0
    assert transform_tabular(t, stats)["c"].to_pylist() == [1, 2, 1, 0]
    # a null (serving takes null numerics) is the training mean in a log column too: it was scored as 0
    missing = transform_tabular(pa.table({"x": pa.array([None], pa.float64()), "d": pa.array([None], pa.float64()),
                                          "c": ["a"]}), stats)
    assert missing["x"].to_pylist() == [0.0] and missing["d"].to_pylist() == [0.0]
    assert transform_tabular(pa.table({"x": [2.5], "d": [0.0], "c": ["a"]}), stats)["d"].to_pylist() == [-1.0]


def test_dcn_forward_shape() -> None:
    model = TabularDCN(num_numeric=3, cardinalities=[4, 5], embed_dim=2, hidden=[8])
    from ecomray.models.dcn_ensemble import DCNEnsemble

    # the out-of-vocabulary row starts (and, untouched by training rows, stays) zero, not a random vector
    for m in (model, DCNEnsemble(num_numeric=3, cardinalities=[4, 5], members=2, embed_dim=2)):
        assert all(not e.weight[0].any() and e.weight[1:].abs().sum() > 0 for e in m.embeddings)
    out = model(torch.randn(6, 3), torch.randint(0, 4, (6, 2)))
    assert out.shape == (6,)


@pytest.mark.skipif(not Path(DATASETS).is_dir(), reason="public datasets not found")
def test_tiny_propensity_trains_and_predict_agrees(tmp_path: Path) -> None:
    from ecomray import registry
    from ecomray.data.prepare import run as prepare
    from ecomray.tasks import propensity
    from ecomray.train.driver import fit
    from hydra.utils import instantiate

    cfg = compose_cfg("train", tmp_path, "experiment=tiny_propensity", f"paths.datasets={DATASETS}")
    m = prepare(cfg)
    assert m["rows_in"] == 12_330 and m["rows_in"] == m["rows_out"] + m["rows_quarantined"]
    out = fit(cfg)
    assert out["metrics"]["test/auc"] > 0.85
    found = registry.load(cfg["paths"]["registry"], out["name"], out["version"])
    model = instantiate(found["config"]["model"], **found["meta"]["model_kwargs"])
    model.load_state_dict(found["state_dict"])
    rows = [{"Administrative": 2, "Administrative_Duration": 30.0, "Informational": 0, "Informational_Duration": 0.0,
             "ProductRelated": 20, "ProductRelated_Duration": 600.0, "BounceRates": 0.01, "ExitRates": 0.02,
             "PageValues": pv, "SpecialDay": 0.0, "Month": "Nov", "OperatingSystems": "2", "Browser": "2",
             "Region": "1", "TrafficType": "2", "VisitorType": "Returning_Visitor", "Weekend": False} for pv in (0.0, 60.0)]
    p_list = propensity.predict(model, found["meta"], rows)
    p_table = propensity.predict(model, found["meta"], pa.Table.from_pylist(rows))
    assert np.allclose(p_list, p_table) and p_list.shape == (2,)
    assert p_list[1] > p_list[0]   # a high page value raises the purchase probability


def _write_synthetic_shards(folder: Path, n: int = 3000, seed: int = 0) -> None:
    """A seeded, learnable table in prepare's layout: the label depends on `pv` (log-scale), `b` and category `c`."""
    import json

    import pyarrow.parquet as pq
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    pv = rng.exponential(20.0, n) * (rng.random(n) < 0.3)
    b = rng.random(n)
    c = rng.choice(["x", "y", "z"], n)
    logit = 1.5 * np.log1p(pv) - 3.0 * b + np.where(c == "z", 1.5, 0.0) - 2.0
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    idx = np.arange(n)
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=42)
    train, val = train_test_split(rest, test_size=0.125, stratify=y[rest], random_state=42)
    split = np.empty(n, dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    (folder / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"pv": pv, "b": b, "c": c, "y": y, "_file": ["syn.csv"] * n, "_row": idx,
                             "split": split.tolist()}), folder / "shards" / "part-00000.parquet")
    (folder / "manifest.json").write_text(json.dumps({"schema": {"label": "y"}, "shards": [
        {"file": "shards/part-00000.parquet", "rows": n}]}))


@pytest.mark.parametrize("target,extra", [("ecomray.models.dcn_ensemble.DCNEnsemble", {"members": 4}),
                                          ("ecomray.models.tabular_dcn.TabularDCN", {})])
def test_task_protocol_learns_synthetic_table(tmp_path: Path, target: str, extra: dict) -> None:
    from ecomray.tasks import propensity as task

    _write_synthetic_shards(tmp_path / "data" / "syn")
    cfg = {"paths": {"data": str(tmp_path / "data")}, "dataset": {"name": "syn"}, "seed": 0,
           "task": {"label": None, "numeric": ["pv", "b"], "log": ["pv"], "categorical": ["c"]},
           "model": {"_target_": target, "embed_dim": 4, "hidden": [16], **extra}}
    torch.manual_seed(0)
    data = task.build_data(cfg, 0, 1)
    assert [len(data.splits[s]["label"]) for s in ("train", "val", "test")] == [2100, 300, 600]
    model = task.build_model(cfg, data)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    before = task.evaluate(model, data, "val")
    for epoch in range(5):
        for batch in task.train_batches(data, epoch, seed=0, batch_size=128):
            loss = task.loss_step(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    val, test = task.evaluate(model, data, "val"), task.evaluate(model, data, "test")
    assert val["auc"] > 0.8 and test["auc"] > 0.8 and val["logloss"] < before["logloss"]
    assert test["threshold"] == val["threshold"]          # test F1 uses the threshold chosen on validation
    # batches are a function of (epoch, seed): same order twice, another order for another epoch
    first = [b["label"].sum().item() for b in task.train_batches(data, 1, 0, 128)]
    assert first == [b["label"].sum().item() for b in task.train_batches(data, 1, 0, 128)]
    assert [b["numeric"][0, 0].item() for b in task.train_batches(data, 1, 0, 128)] != \
        [b["numeric"][0, 0].item() for b in task.train_batches(data, 2, 0, 128)]
    rows = [{"pv": 0.0, "b": 0.9, "c": "x"}, {"pv": 50.0, "b": 0.1, "c": "z"}, {"pv": 5.0, "b": 0.5, "c": "new"}]
    meta = json.loads(json.dumps(task.metadata(data)))       # what the registry stores and serving reads back
    p_list, p_table = task.predict(model, meta, rows), task.predict(model, meta, pa.Table.from_pylist(rows))
    assert p_list.shape == (3,) and np.allclose(p_list, p_table) and p_list[1] > p_list[0]


def test_dcn_ensemble_members_are_independent() -> None:
    from ecomray.models.dcn_ensemble import DCNEnsemble

    torch.manual_seed(0)
    model = DCNEnsemble(num_numeric=3, cardinalities=[4, 5], members=3, embed_dim=2, hidden=[8]).eval()
    num, cat = torch.randn(6, 3), torch.randint(0, 4, (6, 2))
    out = model(num, cat)
    assert out.shape == (6, 3)                              # (B, K) member logits
    out[:, 1].sum().backward()                              # member 1's logit touches only member 1's weights
    grad = model.head.weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert model(num[:2], cat[:2]).allclose(out[:2], atol=1e-6)   # rows are scored independently of the batch


def test_quantile_transform_golden_values_clamps_and_handles_ties() -> None:
    t = pa.table({"a": [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, None, 10.0]})
    stats = fit_tabular(t, {"numeric": ["a"], "quantile": ["a"]})
    knots = stats["numeric"]["a"]["knots"]
    assert [v for v, _ in knots] == sorted({v for v, _ in knots})    # one knot per distinct value (the zeros tie)
    out = transform_tabular(pa.table({"a": [0.0, 10.0, -5.0, 100.0, None]}), stats)["a"].to_pylist()
    assert out[0] == pytest.approx(knots[0][1], abs=1e-6) and out[2] == out[0]   # below the range: clamped
    assert out[1] == pytest.approx(3.0902, abs=1e-3) and out[3] == out[1]        # max -> z(0.999), clamped above
    assert out[4] == 0.0                                                          # missing -> the mean score
    mid = transform_tabular(pa.table({"a": [2.0]}), stats)["a"].to_pylist()[0]
    assert knots[0][1] < mid < out[1]


def test_piecewise_linear_encoding_golden_values() -> None:
    from ecomray.features.tabular import numeric_columns, ple_encode

    t = pa.table({"a": [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0], "c": ["x"] * 8})
    stats = fit_tabular(t, {"numeric": ["a"], "ple": ["a"], "ple_bins": 4, "categorical": ["c"]})
    edges = stats["numeric"]["a"]["edges"]
    assert edges[0] == 0.0 and edges[-1] == 4.0 and edges == sorted(set(edges))   # the mass of zeros: one edge
    assert numeric_columns(stats) == [f"a#{k}" for k in range(len(edges) - 1)]
    enc = ple_encode(np.array([-1.0, 0.0, 4.0, 9.0, np.nan]), [0.0, 1.0, 4.0])
    assert enc.tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    assert ple_encode(np.array([2.5]), [0.0, 1.0, 4.0]).tolist() == [[1.0, 0.5]]
    out = transform_tabular(pa.table({"a": [2.0], "c": ["y"]}), stats)
    assert out.column_names == [*numeric_columns(stats), "c"] and out["c"].to_pylist() == [0]
