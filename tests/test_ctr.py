"""The click-through-rate family on generated Frappe-shaped files (no research-only data in the tests): prepare with
quarantine, the vocabularies and their out-of-vocabulary slot, the models' algebra, a tiny train -> registry ->
evaluate -> predict, and the serving schema and answers."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

from ecomray.data.prepare import run as prepare
from ecomray.inference import load_model
from ecomray.models.dcnv2 import DCNv2
from ecomray.models.deepfm import DeepFM
from ecomray.models.finalmlp import FinalMLP
from ecomray.tasks import RequestError, ctr
from tests.test_train_next_item import compose_cfg

FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]


def _rows(n: int, seed: int, items: range) -> list[list[str]]:
    """label 1 when the item is in the liked third or the user likes weekends and it is one; 10% noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u, i, wk = rng.randrange(40), rng.choice(items), rng.randrange(2)
        y = int(i % 3 == 0 or (u % 2 == 0 and wk == 1))
        y = y if rng.random() > 0.1 else 1 - y
        out.append([str(y), f"u{u}", f"i{i}", str(rng.randrange(7)), str(rng.randrange(7)), str(wk), "0", "free",
                    "sunny", "c1", str(rng.randrange(5))])
    return out


def _write(path: Path, rows: list[list[str]]) -> None:
    lines = [",".join(["label", *FIELDS])] + [",".join(r) for r in rows]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())          # CRLF, as the BARS files


@pytest.fixture(scope="module")
def frappe_like(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ctr")
    data = root / "datasets" / "frappe_x1"
    data.mkdir(parents=True)
    train = _rows(3000, 0, range(60))
    train.append(["x", "u1", "i1", "1", "1", "1", "0", "free", "sunny", "c1", "1"])       # label not a number
    train.append(["1", "", "i2", "1", "1", "1", "0", "free", "sunny", "c1", "1"])         # empty user
    train.append(["2", "u1", "i2", "1", "1", "1", "0", "free", "sunny", "c1", "1"])       # label out of range
    _write(data / "train_reconstructed.csv", train)
    _write(data / "valid.csv", _rows(600, 1, range(70)))           # items 60..69 never in train: the OOV slot
    _write(data / "test.csv", _rows(600, 2, range(70)))
    cfg = compose_cfg("train", root, "experiment=frappe_deepfm", f"paths.datasets={root / 'datasets'}",
                      "scaling=inproc", "train.epochs=4", "train.batch_size=256", "model.hidden=[32,32]",
                      "optim.lr=0.01", "task.embedding_l2=0.0")
    manifest = prepare(cfg)
    return {"cfg": cfg, "manifest": manifest}


def test_prepare_quarantines_malformed_rows_and_keeps_the_published_split(frappe_like: dict) -> None:
    m = frappe_like["manifest"]
    assert m["rows_in"] == 3003 + 600 + 600 == m["rows_out"] + m["rows_quarantined"]
    assert m["rows_quarantined"] == 3 and m["split"]["rows"] == {"train": 3000, "val": 600, "test": 600}
    q = pl.read_parquet(Path(frappe_like["cfg"]["paths"]["data"]) / "frappe" / "quarantine.parquet")
    assert sorted(q["reason"].to_list()) == sorted(m["reasons"]) == ["label > 1", "missing user", "unparseable label"]


def test_vocabularies_are_fitted_on_train_with_an_oov_slot(frappe_like: dict) -> None:
    data = ctr.build_data(frappe_like["cfg"], 0, 1)
    assert data.fields == FIELDS and len(data.vocab["item"]) == 60 and "i65" not in data.vocab["item"]
    cards = ctr.cardinalities(data.vocab, data.fields)
    offsets = ctr.field_offsets(cards)
    x = data.splits["val"]["x"]
    assert x.shape == (600, 10) and int(x.max()) < sum(cards)
    item = FIELDS.index("item")
    unseen = x[:, item] == offsets[item]                               # index 0 of the item field: OOV
    assert 0 < data.oov_rate["val"] < 1 and unseen.any()
    frame = pl.DataFrame({f: ["i65" if f == "item" else "nope"] for f in FIELDS})
    assert (ctr.encode(frame, FIELDS, data.vocab)[0] == offsets).all()   # everything unseen -> every OOV slot


def test_deepfm_pairwise_term_and_dcnv2_cross_layer() -> None:
    torch.manual_seed(0)
    model = DeepFM(cardinalities=[3, 4, 5], embed_dim=4, hidden=[8], dropout=0.0, batch_norm=False).eval()
    x = torch.tensor([[0, 4, 9], [2, 3, 7]])
    emb = model.embedding(x)                                            # (B, F, E)
    explicit = sum((emb[:, f] * emb[:, g]).sum(1) for f in range(3) for g in range(f + 1, 3))
    fm = model.fm(x, emb) - model.fm.first_order(x).sum((1, 2)) - model.fm.bias
    assert torch.allclose(fm, explicit, atol=1e-6)
    net = DCNv2(cardinalities=[3, 4], embed_dim=2, cross_layers=1, hidden=[4], dropout=0.0, batch_norm=False)
    x0 = torch.randn(5, 4)
    layer = net.cross.layers[0]
    assert torch.allclose(net.cross(x0), x0 * layer(x0) + x0)
    assert len(model.embedding_parameters()) == 2 and net(x[:, :2].clamp(max=6)).shape == (2,)
    # FinalMLP's fusion: w1.x + w2.y + sum over heads of x_h^T W_h y_h
    final = FinalMLP(cardinalities=[3, 4, 5], embed_dim=2, hidden1=[4], hidden2=[6], heads=2, gate_hidden=[4]).eval()
    fx, fy = torch.randn(3, 4), torch.randn(3, 6)
    f = final.fusion
    explicit = f.wx(fx).squeeze(1) + f.wy(fy).squeeze(1) + sum(
        ((fx[:, 2 * h:2 * h + 2] @ f.w[h]) * fy[:, 3 * h:3 * h + 3]).sum(1) for h in range(2))
    assert torch.allclose(f(fx, fy), explicit, atol=1e-5) and final(x).shape == (2,)
    gate = final.gate1(x, final.embedding(x).flatten(1))        # gates are 2 * sigmoid: in (0, 2) x embedding
    assert gate.shape == (2, 6)


def test_tiny_ctr_trains_registers_evaluates_and_serves_unknown_values(frappe_like: dict) -> None:
    from ecomray.evaluation import evaluate_version
    from ecomray.train.driver import fit

    cfg = frappe_like["cfg"]
    out = fit(cfg)
    assert out["metrics"]["test/auc"] > 0.8 and out["name"] == "ctr_frappe"
    report = evaluate_version({**cfg, "evaluate": {"split": "test"}})
    assert report["metrics"]["model"]["auc"] == pytest.approx(out["metrics"]["test/auc"], rel=1e-6)
    loaded = load_model(cfg["paths"]["registry"], out["name"])
    loaded.task.prepare_serving(loaded.model, loaded.meta)
    request_model, _ = ctr.api(loaded.meta, {"max_rows": 4})
    row = {f: f"{f}-x" for f in FIELDS} | {"item": "i3", "user": 7}
    body = request_model.model_validate({"rows": [row]}).model_dump(by_alias=True)
    (answer,) = ctr.serve_batch(loaded.model, loaded.meta, [body], {})
    assert not isinstance(answer, RequestError)
    assert answer["unknown"] == [9] and "not seen in training" in answer["warnings"][0]   # only i3 is known
    want = ctr.predict(loaded.model, loaded.meta, [row])[0]
    assert answer["probabilities"][0] == pytest.approx(float(want), rel=1e-6) and 0 < want < 1
    for bad in ({"rows": []}, {"rows": [{k: v for k, v in row.items() if k != "city"}]},
                {"rows": [row | {"item": 1.5}]}, {"rows": [row | {"extra": "x"}]}, {"rows": [row] * 5}):
        with pytest.raises(ValidationError):
            request_model.model_validate(bad)
    # batch prediction's scorer gives the same probabilities as predict for prepared rows
    df = pl.read_parquet(Path(cfg["paths"]["data"]) / "frappe" / "shards" / "*.parquet").head(16)
    scored = ctr.batch_score(loaded.model, loaded.meta, df.to_arrow(), {})
    np.testing.assert_allclose(scored["probability"].to_numpy(), ctr.predict(loaded.model, loaded.meta, df.to_arrow()),
                               rtol=1e-6)
