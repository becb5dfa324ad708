"""The end-to-end path on a local Ray: prepare -> train -> evaluate -> tune -> deploy -> one HTTP request."""

from __future__ import annotations

import json
from pathlib import Path

from ecomray import registry
from jobs.pipeline import run as pipeline
from tests.test_train_next_item import compose_cfg


def test_pipeline_end_to_end_serves_the_promoted_sweep_winner(tmp_path: Path, ray_session) -> None:
    from ray import serve

    cfg = compose_cfg("pipeline", tmp_path, "dataset.synthetic.users=400", "train.epochs=2", "deploy.port=0")
    try:
        out = pipeline(cfg)
    finally:
        serve.shutdown()   # the session's Ray is shared with later tests: leave no Serve proxy behind
    prep, train, tune, deploy = out["prepare"], out["train"], out["tune"], out["deploy"]
    assert prep["rows_in"] == prep["rows_out"] + prep["rows_quarantined"] > 0
    root = cfg["paths"]["registry"]
    name = train["name"]
    assert tune["name"] == name and registry.get_alias(root, name, "best") == tune["version"] != train["version"]
    # evaluate re-scored the version train registered
    assert out["evaluate"]["version"] == train["version"]
    assert out["evaluate"]["metrics"]["model"]["ndcg@10"] == train["metrics"]["test/ndcg@10"]
    # deploy served the sweep's winner (no prod alias: best) and answered one request over HTTP
    response = deploy["response"]
    assert response["model"] == {"name": name, "version": tune["version"]}
    assert len(response["items"]) == 5 and response["fallback"] is False       # the stored example asks for 5
    lineage = json.loads((Path(root) / name / tune["version"] / "lineage.json").read_text())
    assert lineage["sweep"]["name"] == cfg["sweep"]["name"]
