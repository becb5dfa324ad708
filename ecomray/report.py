"""The pipeline's run report: one HTML file (plus its PNGs, made with matplotlib) that says what a run did: the data
it prepared, how training went, the model against its baselines, the sweep's trials, the served sample answer, and
how long each stage took. `jobs.pipeline` writes it to `<paths.reports>/pipeline-<time>/report.html`.
"""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import time
from typing import Any

STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}.muted{color:#777}"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return html.escape(f"{v:.4f}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _curves(history: list[dict[str, Any]], monitor: str, path: str) -> str | None:
    """Training loss and the monitored validation metric per epoch."""
    if not history:
        return None
    from ecomray.plots import pyplot

    plt = pyplot()
    epochs = [int(h.get("epoch", i)) + 1 for i, h in enumerate(history)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(epochs, [h.get("train/loss") for h in history], marker="o", ms=3)
    a.set_title("train/loss")
    a.set_xlabel("epoch")
    b.plot(epochs, [h.get(monitor) for h in history], marker="o", ms=3, color="#c0392b")
    b.set_title(monitor)
    b.set_xlabel("epoch")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)


def _bars(rows: dict[str, dict[str, float]], metric: str, path: str, split: str = "test") -> str | None:
    """The headline metric of the model and each baseline."""
    names = [n for n, m in rows.items() if isinstance(m.get(metric), (int, float))]
    if not names:
        return None
    from ecomray.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
    vals = [rows[n][metric] for n in names]
    ax.barh(names[::-1], vals[::-1], color=["#2c7fb8" if n != "model" else "#c0392b" for n in names[::-1]])
    ax.set_xlabel(f"{split} {metric}")
    for y, v in enumerate(vals[::-1]):
        ax.text(v, y, f" {v:.4f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)


def write(results: dict[str, Any], timings: dict[str, float], cfg: dict, out_dir: str) -> str:
    """Write report.html (and its PNGs) into `out_dir`; returns the HTML's path."""
    os.makedirs(out_dir, exist_ok=True)
    parts = [f"<h1>ecomray pipeline run</h1><p class=muted>{time.strftime('%Y-%m-%d %H:%M:%S')} &middot; experiment "
             f"{html.escape(str((cfg.get('choices') or {}).get('experiment', '-')))} &middot; dataset "
             f"{html.escape(cfg['dataset']['name'])} &middot; task {html.escape(cfg['task']['name'])}</p>"]
    parts.append("<h2>Stages</h2>" + _table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]
                                             + [["total", f"{sum(timings.values()):.1f}"]]))
    m = results.get("prepare")
    if m:
        parts.append("<h2>Data</h2>" + _table(
            ["rows in", "rows out", "quarantined", "shards", "duplicates found"],
            [[m["rows_in"], m["rows_out"], m["rows_quarantined"], len(m["shards"]), m["duplicates"]["found"]]]))
        if m.get("reasons"):
            parts.append(_table(["quarantine reason", "rows"], [[k, v] for k, v in m["reasons"].items()]))
        parts.append(_table(["split", "rows"], sorted([k, v] for k, v in m["split"].get("rows", {}).items())))
    t = results.get("train")
    if t:
        monitor = cfg["train"]["monitor"]
        img = _curves(t.get("history") or [], monitor, os.path.join(out_dir, "training.png"))
        parts.append(f"<h2>Training</h2><p>Registered <b>{html.escape(str(t.get('name')))} "
                     f"{html.escape(str(t.get('version')))}</b>: best epoch {t['metrics'].get('best_epoch', 0) + 1} of "
                     f"{t['metrics'].get('epochs_run')}, {t['metrics'].get('train_seconds', 0):.0f} s.</p>")
        if img:
            parts.append(f'<img src="{img}" alt="training curves">')
        keys = [k for k in t["metrics"] if k.startswith(("val/", "test/"))]
        parts.append(_table(["metric", "value"], [[k, t["metrics"][k]] for k in keys]))
    e = results.get("evaluate")
    if e:
        from ecomray.tasks import key_metrics, load_task

        rows = e["metrics"]
        first = next(iter(rows.values()))
        # the task's headline metrics first (dict order put hr@10 before ndcg@10), then the rest
        floats = [k for k in first if isinstance(first[k], float) and not k.startswith("sampled_")]
        keys = ([k for k in key_metrics(load_task(cfg)) if k in floats]
                + [k for k in floats if k not in key_metrics(load_task(cfg))])[:6]
        img = _bars(rows, keys[0], os.path.join(out_dir, "baselines.png"), e["split"]) if keys else None
        what = f"{html.escape(str(e.get('model')))} {html.escape(str(e.get('version')))}"
        heading = f"{what} against baselines" if len(rows) > 1 else f"Evaluation of {what}"
        parts.append(f"<h2>{heading} ({html.escape(e['split'])} split)</h2>")
        if e.get("task_overrides"):
            parts.append(f"<p>Scored with task overrides <code>{html.escape(json.dumps(e['task_overrides']))}"
                         f"</code>.</p>")
        if img:
            parts.append(f'<img src="{img}" alt="model and baselines">')
        parts.append(_table(["", *keys], [[who, *[r.get(k) for k in keys]] for who, r in rows.items()]))
    s = results.get("tune")
    if s:
        parts.append(f"<h2>Sweep {html.escape(os.path.basename(s['sweep_dir']))}</h2><p>{s['trials']} trials in "
                     f"{s.get('sweep_seconds', 0):.0f} s; winner {html.escape(s['best_trial'])} "
                     f"({html.escape(s['metric'])} {s['value']:.4f}) registered as "
                     f"{html.escape(str(s.get('name')))} {html.escape(str(s.get('version')))} "
                     f"(alias <code>{html.escape(str(s.get('alias')))}</code>).</p>")
        if os.path.exists(s.get("plot", "")):
            shutil.copy(s["plot"], os.path.join(out_dir, "sweep_curves.png"))
            parts.append('<img src="sweep_curves.png" alt="sweep validation curves">')
        if os.path.exists(s.get("csv", "")):
            with open(s["csv"]) as fh:
                table = list(csv.reader(fh))
            parts.append(_table(table[0], table[1:]))
    d = results.get("deploy")
    if d:
        loaded = (d.get("models") or {}).get("loaded") or []
        parts.append("<h2>Served</h2>" + _table(["route", "model", "version"],
                                                [[f"/v1/{x['route']}", x["name"], x["version"]] for x in loaded]))
        if d.get("response") is not None:
            parts.append("<p>The sample request's answer:</p><pre>"
                         + html.escape(json.dumps(d["response"], indent=2, ensure_ascii=False)) + "</pre>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>ecomray pipeline run</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as fh:
        fh.write(page)
    return path
