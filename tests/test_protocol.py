"""The task-family protocol is whole: a throwaway family, written to a temporary folder (a task module, a model and
their config, reached through Hydra's search path and a module path in config), goes through train, register,
evaluate, batch prediction and a served request with no edit to any project file. And the cheap guard: the generic
modules name no family, and `ecomray/` imports neither `jobs/` nor `serve/`."""

from __future__ import annotations

import ast
import json
import os
import re
import textwrap
from pathlib import Path

import httpx
import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ the static guard
# Every family name the project has. Generic code (training, tuning, evaluation, registry, batch prediction,
# serving, the jobs) must know none of them; a family's own files (its task module, model, adapters, configs) may.
FAMILY = re.compile(r"\b(next_item|next-item|propensity|sentiment|recommend\w*|sasrec|mlm|ctr|deepfm|dcn\w*)\b",
                    re.IGNORECASE)
GENERIC = ["ecomray/config.py", "ecomray/evaluation.py", "ecomray/inference.py", "ecomray/registry.py",
           "ecomray/runtime.py", "ecomray/serving.py", "ecomray/metrics.py", "ecomray/tasks/__init__.py",
           "ecomray/data/shards.py", "ecomray/train/driver.py", "ecomray/train/loop.py",
           *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "ecomray/train/tune").glob("*.py"))],
           *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "serve").glob("*.py"))],
           "jobs/batch_predict.py", "jobs/deploy.py", "jobs/evaluate.py", "jobs/pipeline.py", "jobs/prepare.py",
           "jobs/registry.py", "jobs/train.py", "jobs/tune.py"]


def test_generic_modules_name_no_family() -> None:
    found = []
    for rel in GENERIC:
        for n, line in enumerate((ROOT / rel).read_text().splitlines(), start=1):
            if FAMILY.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "generic code names a family (add a hook to the protocol instead):\n" + "\n".join(found)


def test_the_library_imports_neither_jobs_nor_serve() -> None:
    bad = []
    for path in sorted((ROOT / "ecomray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(ROOT)}: {m}" for m in names if m.split(".")[0] in ("jobs", "serve")]
    assert not bad, bad


# ------------------------------------------------------------------------------------------------ a new family
TASK = '''
"""A throwaway family: is an event of the synthetic shop a purchase, from its price? (A logistic regression.)"""
import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pydantic import BaseModel, Field

from ecomray import serving
from ecomray.data import shards
from ecomray.tasks import RequestError

KEY_METRICS = ("bce",)
ROUTE = "toy"


def build_data(cfg, rank=0, world_size=1):
    df = shards.read_frame(cfg, columns=["price", "event", "split", "_file", "_row"]).drop_nulls("price")
    out = {}
    for s in ("train", "val", "test"):
        part = df.filter(pl.col("split") == s)
        out[s] = (torch.tensor(np.log1p(part["price"].to_numpy()), dtype=torch.float32)[:, None],
                  torch.tensor((part["event"] == "purchase").to_numpy(), dtype=torch.float32))
    return {"splits": out, "cfg": cfg}


def build_model(cfg, data):
    return instantiate(cfg["model"], inputs=1)


def train_batches(data, epoch, seed, batch_size):
    x, y = data["splits"]["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        yield {"x": x[idx], "y": y[idx]}


def loss_step(model, batch):
    return F.binary_cross_entropy_with_logits(model(batch["x"]), batch["y"])


@torch.no_grad()
def evaluate(model, data, split):
    x, y = data["splits"][split]
    return {"bce": float(F.binary_cross_entropy_with_logits(model(x), y))}


def metadata(data):
    return {"model_kwargs": {"inputs": 1}, "examples": [{"prices": [3.0, 250.0]}]}


@torch.no_grad()
def predict(model, meta, prices):
    x = torch.log1p(torch.tensor(prices, dtype=torch.float32))[:, None]
    return torch.sigmoid(model(x)).tolist()


def batch_inputs(cfg, split):
    return shards.scan(cfg, split)


def batch_score(model, meta, batch, options):
    prices = [0.0 if p is None else p for p in batch["price"].to_pylist()]
    return pa.table({"p_purchase": pa.array(predict(model, meta, prices), pa.float32())})


class ToyResponse(serving.Response):
    probabilities: list[float]


def api(meta, limits):
    class ToyRequest(serving.Strict):
        prices: list[float] = Field(min_length=1, max_length=int(limits.get("max_prices", 8)))
    return ToyRequest, ToyResponse


def serve_batch(model, meta, requests, options):
    out = []
    for req in requests:
        if any(p < 0 for p in req["prices"]):
            out.append(RequestError(["body", "prices"], "prices are never negative"))
        else:
            out.append({"probabilities": predict(model, meta, req["prices"])})
    return out
'''

MODEL = '''
"""One linear layer: logits (B,) from features (B, inputs)."""
from torch import nn


class Logistic(nn.Module):
    def __init__(self, inputs: int, bias_init: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs, 1)
        nn.init.constant_(self.linear.bias, bias_init)

    def forward(self, x):          # (B, inputs) -> (B,)
        return self.linear(x).squeeze(-1)
'''


@pytest.fixture(scope="module")
def toy_family(plugin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The family's files: Python in the session's plugin folder (importable by Ray workers and replicas too),
    config in a temporary Hydra search-path folder."""
    pkg = plugin_dir / "toyfam"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(textwrap.dedent(TASK))
    (pkg / "model.py").write_text(textwrap.dedent(MODEL))
    conf = tmp_path_factory.mktemp("toyconf")
    for rel, text in {
        "task/toyfam.yaml": "name: toyfam\nmodule: toyfam.task\nserve:\n  batching: {max_batch_size: 4}\n"
                            "  limits: {max_prices: 4}\n",
        "model/logistic.yaml": "_target_: toyfam.model.Logistic\nbias_init: -1.0\n",
        "experiment/toyfam.yaml": "# @package _global_\ndefaults:\n  - override /task: toyfam\n"
                                  "  - override /model: logistic\n  - override /scaling: inproc\n"
                                  "dataset:\n  synthetic: {users: 300, items: 100}\n"
                                  "train: {epochs: 3, batch_size: 256, monitor: val/bce, mode: min}\n"
                                  "optim: {lr: 0.05}\n",
    }.items():
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_text(text)
    return {"conf": conf}


def test_a_family_from_a_temporary_folder_trains_evaluates_batch_predicts_and_serves(
        ray_session, toy_family: dict, tmp_path: Path) -> None:
    from ecomray.config import compose
    from ecomray.evaluation import evaluate_version
    from ecomray.inference import load_model
    from ecomray.train.driver import fit
    from jobs.batch_predict import run as batch_predict
    from jobs.deploy import start, stop
    from serve.settings import free_port

    overrides = [f"hydra.searchpath=[file://{toy_family['conf']}]", "experiment=toyfam", f"paths.root={tmp_path}"]
    cfg = compose("deploy", [*overrides, f"deploy.port={free_port()}", "serve.common.num_replicas=1"])
    trained = fit(cfg)                                   # the synthetic shop is prepared on the way
    assert trained["name"] == "toyfam_synthetic" and trained["metrics"]["test/bce"] < 0.69
    info = json.loads((Path(cfg["paths"]["registry"]) / trained["name"] / trained["version"] / "version.json")
                      .read_text())
    assert info["module"] == "toyfam.task" and info["key_metrics"] == ["bce"]

    report = evaluate_version({**cfg, "evaluate": {"split": "test"}})
    assert report["metrics"]["model"]["bce"] == pytest.approx(trained["metrics"]["test/bce"], rel=1e-6)

    bp = compose("batch_predict", [*overrides, "batch_predict.split=val"])
    out = batch_predict(bp)
    df = pl.read_parquet(os.path.join(out["out"], "*.parquet"))
    loaded = load_model(cfg["paths"]["registry"], trained["name"])
    assert out["rows"] == df.height > 0 and set(df.columns) >= {"p_purchase", "split", "model_version"}
    assert (df["split"] == "val").all()
    want = loaded.task.predict(loaded.model, loaded.meta, [3.0])[0]

    served = start(cfg)
    try:
        url = served["url"]
        r = httpx.post(f"{url}/v1/toy", json={"prices": [3.0]})
        assert r.status_code == 200, r.text
        assert r.json()["probabilities"][0] == pytest.approx(want, rel=1e-5)
        assert r.json()["model"] == {"name": trained["name"], "version": trained["version"]}
        bad = httpx.post(f"{url}/v1/toy", json={"prices": [-1.0]})           # the family's own 422
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "prices"]
        assert httpx.post(f"{url}/v1/toy", json={"prices": [1.0] * 5}).status_code == 422   # its schema's limit
        assert httpx.get(f"{url}/v1/models").json()["loaded"][0]["route"] == "toy"
    finally:
        from ray import serve

        stop(served["started_ray"], cfg["deploy"]["app_name"])
        serve.shutdown()     # the session's Ray is shared: leave no Serve proxy (bound to this port) behind
