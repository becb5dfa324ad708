"""Experiment tracking from the one training loop (rank 0): TensorBoard event files always, MLflow when configured.

TensorBoard: every run writes `<paths.runs>/<run name>/tensorboard/` (next to its Ray Train checkpoints), and a Tune
sweep's trials are logged by Tune itself under `<paths.runs>/<sweep>/`, so `tensorboard --logdir <paths.runs>`
(`runs/train`) shows every train and tune run. Tags are the project's metric names with the characters TensorBoard
refuses replaced by `_` (`val/ndcg@10` -> `val/ndcg_10`, as Tune writes them), so both kinds of runs line up; the
names in results, the registry and filters stay as they are. The registry version a run became is written into it
as text (`registry`).

MLflow (`tracking.mlflow_uri`, the optional `mlflow` extra: the mlflow-skinny client): the same metrics, the
resolved config as parameters and the registry version as a tag, through Ray's MLflow integration
(`ray.air.integrations.mlflow.setup_mlflow`), to any tracking server or a local file store.
"""

from __future__ import annotations

import os
import re
from typing import Any

_TAG = re.compile(r"[^-/\w\.]")


def clean(name: str) -> str:
    """A metric name as a TensorBoard tag (what TensorBoard would rename it to, without its warning)."""
    return _TAG.sub("_", name).lstrip("/")


def tensorboard_dir(cfg: dict) -> str:
    return os.path.join(cfg["paths"]["runs"], cfg["run_name"], "tensorboard")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """Rank 0 of a run. `log(metrics, step)` every epoch, `close()` at the end; failures to track never fail a run."""

    def __init__(self, cfg: dict) -> None:
        t = cfg.get("tracking") or {}
        self.writer = None
        self.mlflow = None
        if t.get("tensorboard", True) and not cfg.get("_tune_trial") and "://" not in cfg["paths"]["runs"]:
            # (Tune logs its trials itself; object-store run folders have no local files to write to)
            try:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(tensorboard_dir(cfg), flush_secs=10)
            except Exception as err:  # noqa: BLE001 - tracking is best effort, but says when it is off
                print(f"[train] TensorBoard logging off: {type(err).__name__}: {err}", flush=True)
                self.writer = None
        if t.get("mlflow_uri"):
            from ray.air.integrations.mlflow import setup_mlflow

            params = {k: v for k, v in _flat({k: cfg[k] for k in ("task", "model", "optim", "train", "seed")
                                               if k in cfg}).items() if not isinstance(v, (list, dict))}
            self.mlflow = setup_mlflow(params, tracking_uri=str(t["mlflow_uri"]),
                                       experiment_name=str(t.get("mlflow_experiment") or "ecomray"),
                                       run_name=cfg["run_name"], create_experiment_if_not_exists=True,
                                       tags={"dataset": cfg["dataset"]["name"], "task": cfg["task"]["name"]})

    def log(self, metrics: dict[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(clean(k), v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({clean(k).replace("/", "."): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def record_registration(cfg: dict, name: str, version: str) -> None:
    """After registering: the registry version into the run's TensorBoard text and its MLflow run's tags."""
    t = cfg.get("tracking") or {}
    folder = tensorboard_dir(cfg)
    if t.get("tensorboard", True) and os.path.isdir(folder):
        try:
            from tensorboardX import SummaryWriter

            # its own file: event files are named by second and host, so a writer opened in the same second as
            # the run's would replace the run's file
            with SummaryWriter(folder, filename_suffix=".registry") as w:
                w.add_text("registry", f"{name} {version}")
        except Exception:  # noqa: BLE001 - best effort
            pass
    if t.get("mlflow_uri"):
        import mlflow

        mlflow.set_tracking_uri(str(t["mlflow_uri"]))
        runs = mlflow.search_runs(experiment_names=[str(t.get("mlflow_experiment") or "ecomray")],
                                  filter_string=f"tags.mlflow.runName = '{cfg['run_name']}'", output_format="list")
        for run in runs:
            mlflow.MlflowClient().set_tag(run.info.run_id, "registry_version", f"{name}:{version}")
