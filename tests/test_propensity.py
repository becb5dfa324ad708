"""Purchase propensity: pure feature functions, the DCN model, and a tiny run on the shoppers table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ecomray.features.tabular import cardinalities, fit_tabular, transform_tabular
from ecomray.models.tabular_dcn import TabularDCN
from tests.test_prepare import DATASETS
from tests.test_train import compose_cfg


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


def test_dcn_forward_shape() -> None:
    model = TabularDCN(num_numeric=3, cardinalities=[4, 5], embed_dim=2, hidden=[8])
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
