"""Opinion monitoring: score a prepared review table with a registry model and write a Markdown report with PNG plots.

    python -m jobs.opinion dataset=online_shopping opinion.model=sentiment_tfidf_chnsenticorp [opinion.split=all]

The report (`<opinion.out>/report.md`) holds, from the model's predictions:
- the sentiment share by category (`share_by_category.png`) and, when the table has timestamps, the weekly
  negative share over time (`share_over_time.png`);
- the most negative categories (table + `most_negative.png`), beside the labelled share when labels exist;
- the most frequent terms in negative reviews per category: jieba word counts, words of >= `opinion.min_term_len`
  characters, stop words, digits and punctuation left out (table; plus `negative_terms.png` when a CJK font exists).
Plots label categories with their Chinese name when matplotlib finds a CJK font, else with C1, C2, ... (mapped in the
report). Scores and predictions go to `<out>/scored.parquet`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from typing import Any

import numpy as np
import polars as pl

from ecomray.features.text import blank_expr
from ecomray.runtime import UserError, check_number, check_outside, output_folder

STOP = set("""的 了 是 我 也 和 就 都 不 在 有 这 那 你 他 她 它 们 很 还 又 吧 吗 啊 呢 哦 着 给 让 说 要 会 能 到 去 来 上 下 个 一 没 对 与 及 被 把 而 但 所 以 为 之 其 或 等 这个 那个 我们 你们 他们 就是 还是 但是 因为 所以 如果 而且 然后 已经 没有 一个 什么 这样 那样 可以 觉得 感觉 东西 时候 现在 自己 真的 一下 一些 这么 那么 非常 比较 有点 不是 还有 不过 只是 一样 知道 一直 出来 起来 应该 可能 这种 那种 怎么 这次 一次 一点 看看 以后 之前 之后 的话""".split())
_WORD = re.compile(r"^[\u4e00-\u9fffA-Za-z]+$")


REPORT_FILES = ("report.md", "summary.json", "scored.parquet")


def _report_file(name: str) -> bool:
    """Whether `name` is a file an opinion report writes, its plots included (a folder with anything else is not a
    report to replace)."""
    return name in REPORT_FILES or name.endswith(".png")


def score(loaded: Any, texts: list[str], batch: int = 512) -> np.ndarray:
    """(N, C) class probabilities from the loaded model's own `predict` (the serving code path)."""
    labels = loaded.meta["labels"]
    out = np.zeros((len(texts), len(labels)), dtype=np.float32)
    for lo in range(0, len(texts), batch):
        res = loaded.task.predict(loaded.model, loaded.meta, texts[lo:lo + batch])
        out[lo:lo + batch] = [[r["probs"][lab] for lab in labels] for r in res]
    return out


def top_terms(texts: list[str], n: int, min_len: int = 2, stop: set[str] | None = None) -> list[tuple[str, int]]:
    import jieba

    stop = STOP if stop is None else stop
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(w for w in jieba.lcut(t) if len(w) >= min_len and w not in stop and _WORD.match(w))
    return counts.most_common(n)


def _check_settings(o: dict) -> None:
    """Numbers and the time bucket no report can use, named before any scoring (they were tracebacks, or a
    `max_rows: -1990` that scored 10 rows)."""
    if o.get("split", "all") not in ("all", "train", "val", "test"):   # ("no rows to score" said nothing of why)
        raise UserError(f"opinion.split={o['split']!r}: use all, train, val or test")
    if o.get("max_rows") is not None:
        check_number("opinion.max_rows", o["max_rows"], lambda v: v >= 1, ">= 1 (or null: every row)", integer=True)
    for key in ("top_terms", "top_categories", "min_term_len"):
        if o.get(key) is not None:
            check_number(f"opinion.{key}", o[key], lambda v: v >= 1, ">= 1", integer=True)
    bucket = str(o.get("time_bucket", "1w"))
    parts = re.findall(r"(\d+)(ns|us|ms|mo|s|m|h|d|w|q|y)", bucket)
    ok = ("".join(n + u for n, u in parts) == bucket and any(int(n) for n, _ in parts)
          and all(u != "ns" for _, u in parts))    # (timestamps are in us: a 1ns bucket made Polars panic)
    if ok:   # as the report will use it, on a timestamp column like the data's (mixed units, 1ns: Polars refuses)
        try:
            (pl.DataFrame({"ts": [0]}).with_columns(pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC"))
             .group_by_dynamic("ts", every=bucket).agg(pl.len()))
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException, ValueError):
            ok = False
    if not ok:
        raise UserError(f"opinion.time_bucket={o.get('time_bucket')!r}: write a Polars duration such as 1d, 1w "
                        f"or 1mo")


def run(cfg: dict) -> dict[str, Any]:
    import jieba

    from ecomray.plots import cjk_font, pyplot

    plt = pyplot()

    from ecomray.inference import load_model
    from ecomray.tasks.sentiment import read_reviews

    jieba.setLogLevel(60)
    t0 = time.time()
    o = cfg["opinion"]
    _check_settings(o)
    if not o.get("model"):
        raise UserError("set opinion.model=<registry name>[:version] (a sentiment model, e.g. sentiment_tfidf_chnsenticorp)")
    from ecomray import registry

    name, ref = registry.parse_ref(str(o["model"]))
    loaded = load_model(cfg["paths"]["registry"], name, o.get("version") or ref)
    if "labels" not in loaded.meta:
        raise UserError(f"{name} is not a sentiment model (its meta has no labels)")
    df = read_reviews(cfg, cfg["dataset"]["name"])
    split = o.get("split", "all")
    if split != "all":
        df = df.filter(pl.col("split") == split)
    if o.get("max_rows"):
        df = df.head(int(o["max_rows"]))
    if df.height == 0:
        raise UserError(f"{cfg['dataset']['name']}: no rows to score (split={split})")
    blank = df.select(pl.col("text").is_null() | blank_expr("text")).to_series()
    if blank.any():   # a table prepared before blank texts were quarantined: scored as nothing, then a traceback
        print(f"[opinion] {int(blank.sum()):,} review(s) with no text left out (empty or blank)", flush=True)
        df = df.filter(~blank)
        if df.height == 0:
            raise UserError(f"{cfg['dataset']['name']}: every review to score is empty (split={split})")
    neg = o.get("negative_label", "negative")
    labels = loaded.meta["labels"]
    if neg not in labels:
        raise UserError(f"opinion.negative_label={neg!r} is not a label of {name} ({labels})")
    texts = df["text"].to_list()
    t_score = time.time()
    p = score(loaded, texts)
    scoring_s = time.time() - t_score
    k = labels.index(neg)
    df = df.with_columns(p_negative=pl.Series(p[:, k]), predicted=pl.Series([labels[i] for i in p.argmax(1)]))
    from ecomray.data import shards

    names = cfg["dataset"].get("label_names") or shards.load_manifest(shards.dataset_dir(cfg)).get("label_names") or {}
    if "label" in df.columns:
        df = df.with_columns(label_name=pl.col("label").replace_strict(names, default=pl.col("label")) if names else pl.col("label"))
    if "category" not in df.columns or df["category"].null_count() == df.height:
        df = df.with_columns(category=pl.lit("(all)"))
    df = df.with_columns(pl.col("category").fill_null("(none)"))
    final = os.path.abspath(o["out"])   # written whole into a work folder, then swapped in for the old one
    check_outside(final, cfg["paths"]["registry"], "opinion.out", "the registry")
    with output_folder(final, "opinion.out", ("report.md", "summary.json"), "an opinion report",
                       lambda m: print(f"[opinion] {m}", flush=True), owns=_report_file) as out:
        os.makedirs(out)
        df.select([c for c in ("text", "category", "ts", "label_name", "predicted", "p_negative") if c in df.columns]) \
          .write_parquet(os.path.join(out, "scored.parquet"))

        agg = [pl.len().alias("reviews"), (pl.col("predicted") == neg).mean().alias("negative_share")]
        if "label_name" in df.columns:
            agg.append((pl.col("label_name") == neg).mean().alias("labelled_negative_share"))
            agg.append((pl.col("label_name") == pl.col("predicted")).mean().alias("accuracy"))
        by_cat = df.group_by("category").agg(agg).sort("negative_share", descending=True)
        cats = by_cat["category"].to_list()
        font = cjk_font()
        if font:
            tick = {c: c for c in cats}
        else:
            tick = {c: f"C{i + 1}" for i, c in enumerate(cats)}

        # 1. sentiment share by category (stacked): at most `top_categories` bars, the categories with the most
        # reviews (700 categories made an unreadable plot; the report's table lists every one)
        n_top = int(o.get("top_categories", 10))
        largest = by_cat.sort("reviews", descending=True, maintain_order=True).head(n_top) \
            .sort("negative_share", descending=True, maintain_order=True)
        fig, ax = plt.subplots(figsize=(8, 4))
        x = np.arange(largest.height)
        share = largest["negative_share"].to_numpy()
        ax.bar(x, 1 - share, label="positive", color="#4c9a2a")
        ax.bar(x, share, bottom=1 - share, label="negative", color="#c0392b")
        ax.set_xticks(x, [tick[c] for c in largest["category"].to_list()])
        ax.set_ylabel("share of reviews (predicted)")
        shown = f"; the {n_top} with most reviews of {len(cats)}" if len(cats) > n_top else ""
        ax.set_title(f"Sentiment share by category ({name} {loaded.version}{shown})")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "share_by_category.png"), dpi=110)
        plt.close(fig)

        # 2. most negative categories
        fig, ax = plt.subplots(figsize=(7, 4))
        top = by_cat.head(n_top)
        ax.barh([tick[c] for c in top["category"].to_list()][::-1], top["negative_share"].to_numpy()[::-1], color="#c0392b",
                label="predicted")
        if "labelled_negative_share" in top.columns:
            ax.scatter(top["labelled_negative_share"].to_numpy()[::-1], np.arange(top.height), color="black", zorder=3,
                       label="labelled", s=14)
        ax.set_xlabel("negative share")
        ax.set_title("Most negative categories")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "most_negative.png"), dpi=110)
        plt.close(fig)

        # 3. over time
        over_time = None
        if "ts" in df.columns and df["ts"].null_count() < df.height:
            over_time = (df.filter(pl.col("ts").is_not_null()).sort("ts")
                           .group_by_dynamic("ts", every=o.get("time_bucket", "1w"))
                           .agg(pl.len().alias("reviews"), (pl.col("predicted") == neg).mean().alias("negative_share")))
            fig, ax = plt.subplots(figsize=(8, 3.5))
            ax.plot(over_time["ts"].to_list(), over_time["negative_share"].to_numpy(), marker="o")
            ax.set_ylabel("negative share")
            ax.set_title(f"Negative share over time (per {o.get('time_bucket', '1w')})")
            fig.autofmt_xdate()
            fig.tight_layout()
            fig.savefig(os.path.join(out, "share_over_time.png"), dpi=110)
            plt.close(fig)

        # 4. top terms in negative reviews per category (jieba)
        n_terms = int(o.get("top_terms", 10))
        terms = {}
        for c in cats:
            neg_texts = df.filter((pl.col("category") == c) & (pl.col("predicted") == neg))["text"].to_list()
            terms[c] = top_terms(neg_texts, n_terms, int(o.get("min_term_len", 2)), STOP | {c})
        if font:      # the `top_categories` most negative categories (700 made a 77,000-pixel-high image)
            plotted = cats[:n_top]
            cols = min(3, len(plotted))
            rows = int(np.ceil(len(plotted) / cols))
            fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
            for ax, c in zip(axes.flat, plotted):
                words = terms[c][:8][::-1]
                ax.barh([w for w, _ in words], [n for _, n in words], color="#c0392b")
                ax.set_title(c)
            for ax in list(axes.flat)[len(plotted):]:
                ax.axis("off")
            fig.tight_layout()
            fig.savefig(os.path.join(out, "negative_terms.png"), dpi=110)
            plt.close(fig)

        lines = [f"# Opinion report: {cfg['dataset']['name']}", "",
                 f"Model `{name}` {loaded.version} (task {loaded.config['task']['name']}, model "
                 f"`{loaded.config['model']['_target_'].rsplit('.', 1)[-1]}`), {df.height:,} reviews "
                 f"(split: {split}), scored in {time.time() - t0:.0f} s. Shares are of predicted labels.", "",
                 "## Sentiment share by category", "", "![share by category](share_by_category.png)", ""]
        if not font:
            lines += ["Plot labels: " + ", ".join(f"{tick[c]} = {c}" for c in cats) + " (no CJK font found for matplotlib).", ""]
        head = "| category | reviews | negative share (predicted) |" + (" negative share (labelled) | accuracy |" if "accuracy" in by_cat.columns else "")
        lines += ["## Most negative categories", "", "![most negative](most_negative.png)", "", head,
                  "|---|---:|---:|" + ("---:|---:|" if "accuracy" in by_cat.columns else "")]
        for r in by_cat.iter_rows(named=True):
            row = f"| {r['category']} | {r['reviews']:,} | {r['negative_share']:.1%} |"
            if "accuracy" in r:
                row += f" {r['labelled_negative_share']:.1%} | {r['accuracy']:.1%} |"
            lines.append(row)
        lines.append("")
        if over_time is not None:
            lines += ["## Over time", "", "![over time](share_over_time.png)", ""]
        else:
            lines += ["## Over time", "", "The table has no timestamps (`ts`), so there is no time series.", ""]
        lines += ["## Most frequent terms in negative reviews (jieba word counts)", ""]
        if font:
            lines += ["![negative terms](negative_terms.png)", ""]
        lines += ["| category | top terms (count) |", "|---|---|"]
        for c in cats:
            lines.append(f"| {c} | " + ", ".join(f"{w} ({n})" for w, n in terms[c]) + " |")
        with open(os.path.join(out, "report.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        summary = {"report": os.path.join(final, "report.md"), "model": f"{name}:{loaded.version}", "rows": df.height,
                   "seconds": time.time() - t0, "scoring_seconds": scoring_s, "by_category": by_cat.to_dicts(),
                   "terms": {c: terms[c] for c in cats}, "plots": sorted(f for f in os.listdir(out) if f.endswith(".png"))}
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, ensure_ascii=False, default=str)
    print(f"[opinion] {df.height:,} reviews scored with {name} {loaded.version}; report: {summary['report']} "
          f"({summary['seconds']:.0f}s, of which scoring {scoring_s:.0f}s)", flush=True)
    return summary
