"""A finished sweep's trials as a table (`trials.csv`, printed) and validation curves (`curves.png`)."""

from __future__ import annotations

import csv
import os
from typing import Any


def trial_table(grid: Any, spec: dict, base: dict) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """One row per trial (sorted by trial id) and each trial's validation curve [(epoch, value)]."""
    metric, sign = spec["metric"], (1 if spec["mode"] == "max" else -1)
    epochs = int(base["train"]["epochs"])
    rows, curves = [], {}
    for result in grid:
        df = result.metrics_dataframe
        config = {k: result.config[k] for k in spec["space"] if k in result.config}
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(str(result.path))
        if (df is None or metric not in getattr(df, "columns", []) or df.empty) and (result.metrics or {}).get(
                "checkpoint_path"):
            # a resumed trial whose Train run had already ended: Tune kept only its last result
            df = _history_frame(result.metrics)
        elif df is not None and "epoch" in getattr(df, "columns", []) and not df.empty and int(df["epoch"].iloc[0]) > 0 \
                and (result.metrics or {}).get("checkpoint_path"):
            # a trial resumed after a kill: Tune's rows start at the epoch it resumed from; its last checkpoint
            # holds every epoch (a trial that had completed was listed as stopped by the scheduler, its curve cut)
            full = _history_frame(result.metrics)
            df = full if full is not None else df
        if df is None or metric not in getattr(df, "columns", []) or df.empty:
            rows.append({"trial_id": trial_id, "config": config, "best_value": None, "epochs_run": 0,
                         "stopped_early": False, "stopped_by": "error" if result.error else "not started",
                         "wall_s": 0.0, "checkpoint": None, "error": str(result.error or "")[:200],
                         "started_at": None, "ended_at": None})
            continue
        values = [float(v) for v in df[metric]]
        stamps = [float(t) for t in df["timestamp"]] if "timestamp" in df else [0.0] * len(values)
        curves[trial_id] = [(int(e), v, t) for e, v, t in
                            zip(df["epoch"] if "epoch" in df else range(len(values)), values, stamps)]
        last = df.iloc[-1]
        n = int(last["epoch"]) + 1 if "epoch" in df else len(values)      # epochs run, whatever rows are missing
        if result.error:
            by = "error"
        elif n >= epochs:
            by = "completed"
        elif float(last.get("stopped_early", 0.0) or 0.0) > 0:
            by = "train_loop"             # the loop's own early stop (train.patience or train.time_budget_s)
        else:
            by = "scheduler"              # ASHA (or the sweep's time budget) stopped it
        end = float(last.get("timestamp", 0.0) or 0.0)
        rows.append({"trial_id": trial_id, "config": config,
                     "best_value": max(values, key=lambda v: sign * v), "epochs_run": n,
                     "started_at": end - float(last.get("time_total_s", 0.0)), "ended_at": end,
                     "stopped_early": by == "scheduler", "stopped_by": by,
                     "wall_s": float(last.get("time_total_s", 0.0)),
                     "checkpoint": last.get("checkpoint_path"), "error": str(result.error or "")[:200]})
    rows.sort(key=lambda r: r["trial_id"])
    t0 = min((r["started_at"] for r in rows if r["started_at"]), default=0.0)
    for r in rows:
        r["start_s"] = None if r["started_at"] is None else r["started_at"] - t0
    return rows, curves


def _history_frame(last: dict) -> Any:
    """Per-epoch rows of a trial from its last Train checkpoint (`state.pt` keeps every epoch's metrics)."""
    import pandas as pd
    import torch
    from ray.train import Checkpoint

    try:
        with Checkpoint(str(last["checkpoint_path"])).as_directory() as d:
            history = torch.load(os.path.join(d, "state.pt"), weights_only=False, map_location="cpu")["history"]
    except (OSError, KeyError, RuntimeError):
        return None
    df = pd.DataFrame(history)
    df["timestamp"] = float(last.get("timestamp", 0.0))
    df["time_total_s"] = float(last.get("time_total_s", 0.0))
    df["checkpoint_path"] = last["checkpoint_path"]
    return df


def write_results(rows: list[dict], curves: dict, spec: dict, sweep_dir: str) -> None:
    """Print the trial table and write it as `trials.csv`; plot every validation curve to `curves.png`."""
    keys = list(spec["space"])
    header = ["trial_id", *keys, f"best {spec['metric']}", "epochs_run", "stopped_early", "stopped_by", "wall_s",
              "start_s"]
    table = [[r["trial_id"], *[r["config"].get(k) for k in keys],
              None if r["best_value"] is None else round(r["best_value"], 6), r["epochs_run"], r["stopped_early"],
              r["stopped_by"], round(r["wall_s"], 1), None if r["start_s"] is None else round(r["start_s"], 1)]
             for r in rows]
    with open(os.path.join(sweep_dir, "trials.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(table)
    fmt = [[_fmt(c) for c in row] for row in [header, *table]]
    widths = [max(len(row[i]) for row in fmt) for i in range(len(header))]
    print("\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in fmt), flush=True)

    from matplotlib.ticker import MaxNLocator

    from ecomray.plots import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        pts = curves.get(r["trial_id"])
        if pts:
            ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    ls="--" if r["stopped_early"] else "-",
                    label=f"{r['trial_id']} best {_fmt(r['best_value'])}: " + ", ".join(
                        f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in r["config"].items()))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(spec["metric"])
    ax.set_title(f"sweep {spec['name']}: validation curves (dashed: stopped early)")
    ax.grid(alpha=0.3)
    if 0 < len(ax.lines) <= 20:   # below the axes, one trial a line: the figure grows to hold it (bbox_inches="tight")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=1, frameon=False)
    fig.savefig(os.path.join(sweep_dir, "curves.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
