"""A small seeded review table, built in memory: what tests and `experiment=tiny_sentiment` use when the public
datasets are absent. Reviews are short Chinese sentences assembled from positive and negative phrases, with a
category, an item id, a timestamp (90 days) and a little label noise; a few bad rows (an empty text, an unknown
label) exercise the quarantine. Knobs: `dataset.synthetic.{rows, seed, noise}`.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl

CATEGORIES = ["手机", "酒店", "书籍", "衣服", "水果"]
POSITIVE = ["质量很好", "非常满意", "物超所值", "服务周到", "推荐购买", "发货很快", "做工精致", "味道不错", "干净舒适", "很喜欢"]
NEGATIVE = ["质量太差", "非常失望", "不值这个价", "服务态度差", "不会再买", "发货太慢", "做工粗糙", "味道很怪", "又脏又乱", "很后悔"]
FILLER = ["这个{c}", "买的{c}", "收到了，", "用了几天，", "总的来说", "说实话", "朋友推荐的{c}", ""]
# negative categories lean negative, so the opinion report has something to find
NEG_RATE = {"手机": 0.4, "酒店": 0.5, "书籍": 0.3, "衣服": 0.6, "水果": 0.5}


def frame(dataset: dict) -> pl.DataFrame:
    opts = dataset.get("synthetic") or {}
    n, seed, noise = int(opts.get("rows", 2000)), int(opts.get("seed", 0)), float(opts.get("noise", 0.03))
    g = np.random.default_rng(seed)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(n):
        c = CATEGORIES[int(g.integers(len(CATEGORIES)))]
        neg = g.random() < NEG_RATE[c]
        words = NEGATIVE if neg else POSITIVE
        k = int(g.integers(1, 3))
        body = "，".join(words[int(j)] for j in g.choice(len(words), size=k, replace=False))
        text = FILLER[int(g.integers(len(FILLER)))].format(c=c) + body + ("！" if g.random() < 0.5 else "。")
        label = int(not neg) if g.random() >= noise else int(neg)
        ts = t0 + timedelta(days=float(g.random() * 90))
        rows.append({"text": text, "label": str(label), "category": c, "item_id": f"{c}-{int(g.integers(20))}",
                     "ts": ts.isoformat()})
    rows.append({"text": "   ", "label": "1", "category": "手机", "item_id": "x", "ts": t0.isoformat()})
    rows.append({"text": "还行吧", "label": "2", "category": "手机", "item_id": "x", "ts": t0.isoformat()})
    return pl.DataFrame(rows)


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    from ecomray.data.adapters.chnsenticorp import review_checks

    df = frame(dataset).with_row_index("_row").with_columns(pl.col("_row").cast(pl.Int64))
    return [("<synthetic_reviews>", df.with_columns(_reason=review_checks(pl.col("text"))).lazy())]
