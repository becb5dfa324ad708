"""The main job as a user runs it: `python -m jobs.pipeline` in its own process (its own local Ray), prepare -> train
-> evaluate -> tune -> deploy -> one HTTP request, then the run report. It must print little (one line per epoch,
one per trial, stage banners: at most ~80 lines), no traceback, and its report must render in a browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ecomray import registry

pytestmark = pytest.mark.slow      # the whole pipeline in its own process (~90 s on 2 cores)

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, no_local_ray: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pipeline")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "jobs.pipeline", f"paths.root={root}", "dataset.synthetic.users=400",
                          "train.epochs=2", "deploy.port=0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    return {"root": root, "out": out, "text": out.stdout + out.stderr}


def test_pipeline_prints_little_and_serves_the_promoted_sweep_winner(pipeline_run: dict[str, Any]) -> None:
    out, text, root = pipeline_run["out"], pipeline_run["text"], pipeline_run["root"]
    assert out.returncode == 0, text[-4000:]
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert "Traceback" not in text and "Summary name" not in text and "Reporting training result" not in text
    epochs = [line for line in lines if "[train] epoch" in line]
    assert len(epochs) == len(set(epochs)) > 0                          # every epoch line once
    reg = str(root / "registry")
    name = "next_item_synthetic"
    assert registry.versions(reg, name) == ["v0001", "v0002"]          # the train stage's, then the sweep winner's
    assert registry.get_alias(reg, name, "best") == "v0002"
    lineage = json.loads((root / "registry" / name / "v0002" / "lineage.json").read_text())
    assert lineage["sweep"]["name"] == "tiny"
    assert '"version": "v0002"' in text and "POST /v1/recommend" in text and "-> 200" in text   # served the winner
    reports = sorted((root / "reports").glob("pipeline-*/report.html"))
    assert len(reports) == 1 and str(reports[0]) in text
    page = reports[0].read_text()
    for part in ("Data", "Training", "against baselines", "Sweep", "Served", "training.png",
                 "baselines.png", "sweep_curves.png", "item_knn"):
        assert part in page, part
    # TensorBoard event files of the train run (Tune writes its trials' own)
    assert list((root / "train").glob("*/tensorboard/events.out.tfevents.*"))


def test_the_run_report_renders_in_a_browser(pipeline_run: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    report = next((pipeline_run["root"] / "reports").glob("pipeline-*/report.html"))
    browser.get(report.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);")
    assert len(images) >= 3 and all(ok for _, ok in images), images
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
