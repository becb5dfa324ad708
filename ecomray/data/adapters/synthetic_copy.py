"""A small seeded copy table, built in memory: what tests and `experiment=tiny_copy` use without the research-only
datasets. Attribute strings in AdvertiseGen's format (`类型#上衣*颜色#白色*...`), copy assembled from phrases that
state the values, an aspect and audience on some rows, a few bad rows (a malformed attribute string, an empty
target) for the quarantine, and a seeded train / val / test split by attribute set. Knobs: `dataset.synthetic.{rows,
seed}`.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import polars_hash  # noqa: F401  (.nchash: stable across Polars versions)

from ecomray.data.adapters.copy_common import copy_checks

KEYS = {"类型": ["上衣", "裙", "裤"], "颜色": ["白色", "黑色", "红色", "蓝色"], "材质": ["棉", "牛仔布", "雪纺"],
        "风格": ["简约", "复古", "休闲"], "图案": ["条纹", "刺绣", "纯色"]}
OPEN = ["这款{类型}", "一款{风格}的{类型}", "{颜色}的{类型}"]
BODY = {"颜色": "{颜色}十分百搭", "材质": "采用{材质}面料，穿着舒适", "风格": "{风格}的设计很有气质",
        "图案": "{图案}元素增添看点"}
CLOSE = ["，日常出行都很合适。", "，让你轻松穿出时尚感。", "，展现别样魅力。"]


def frame(dataset: dict) -> pl.DataFrame:
    opts = dataset.get("synthetic") or {}
    n, seed = int(opts.get("rows", 600)), int(opts.get("seed", 0))
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        chosen = {"类型": KEYS["类型"][int(g.integers(3))]}
        for k in g.choice(["颜色", "材质", "风格", "图案"], size=int(g.integers(2, 5)), replace=False):
            chosen[str(k)] = KEYS[str(k)][int(g.integers(len(KEYS[str(k)])))]
        chosen.setdefault("颜色", "白色")
        chosen.setdefault("风格", "简约")
        attrs = "*".join(f"{k}#{v}" for k, v in chosen.items())
        text = OPEN[int(g.integers(3))].format(**chosen) + "，" + "，".join(
            BODY[k].format(**chosen) for k in chosen if k in BODY) + CLOSE[int(g.integers(3))]
        aspect = f"<{int(g.integers(3))}>" if g.random() < 0.3 else None
        rows.append({"attributes": attrs, "title": None, "aspect": aspect,
                     "audience": ("<a>" if g.random() < 0.5 else "<b>") if aspect else None, "target": text})
    rows.append({"attributes": "类型#上衣*颜色", "title": None, "aspect": None, "audience": None, "target": "坏"})
    rows.append({"attributes": "类型#裙", "title": None, "aspect": None, "audience": None, "target": "  "})
    df = pl.DataFrame(rows, schema={c: pl.Utf8 for c in ("attributes", "title", "aspect", "audience", "target")})
    draw = (pl.lit(f"{seed}:") + pl.col("attributes")).nchash.xxhash64() % 10   # by attribute set: no set in two splits
    return df.with_columns(split=pl.when(draw == 0).then(pl.lit("test")).when(draw == 1).then(pl.lit("val"))
                           .otherwise(pl.lit("train")), _reason=pl.lit(None, dtype=pl.Utf8))


def sources(dataset: dict, paths: dict) -> list[tuple[str, pl.LazyFrame]]:
    df = copy_checks(frame(dataset).with_row_index("_row").with_columns(pl.col("_row").cast(pl.Int64)))
    return [("<synthetic_copy>", df.lazy())]
