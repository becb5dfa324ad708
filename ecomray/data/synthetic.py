"""The built-in synthetic shop: a seeded generator of behaviour logs with known true preferences.

The world:
- items: a category (with a centroid in a `taste_dim` latent space), a vector near that centroid, a price
  (lognormal around the category's price level) and a Zipf-like popularity logit;
- users: a taste vector (a mix of one or two category centroids plus noise) and an activity level (lognormal)
  that sets their number of sessions;
- sessions: each session the user looks at 1-4 items drawn (without replacement, Gumbel top-k) from a softmax over
  `true score = (taste + drift * vec(previous session's first item)) . item_vec + popularity`. Each viewed item
  goes down the funnel view -> click -> cart -> purchase with probabilities that rise with its true score.

The `drift` term makes the next session depend on the last one, so a sequential model has something to learn
beyond a user's static taste; `true_scores()` is that same score, which an oracle recommender ranks by.

Users are generated in chunks of `chunk_users` with all work vectorized over the chunk, and each chunk is written
straight to Parquet, so 100M+ events never sit in memory. Same config -> the same rows, byte for byte.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import polars as pl

EPOCH0 = 1767225600  # 2026-01-01T00:00:00Z
DAYS = 90
GENERATOR_VERSION = 2  # bump when the generator changes: cached raw data is regenerated
DEFAULTS = {"seed": 0, "users": 3000, "items": 600, "categories": 12, "sessions_per_user": 6.0, "taste_dim": 8,
            "chunk_users": 50000, "drift": 1.0, "temperature": 1.0, "max_sessions": 40}


@dataclass
class Truth:
    item_ids: list[str]
    item_vecs: np.ndarray   # (I, D)
    item_pop: np.ndarray    # (I,)
    user_ids: list[str]
    user_taste: np.ndarray  # (U, D)
    drift: float
    temperature: float

    def item_index(self) -> dict[str, int]:
        return {item: k for k, item in enumerate(self.item_ids)}


def _conf(synth: dict) -> dict:
    return {**DEFAULTS, **{k: v for k, v in synth.items() if v is not None}}


def _catalogue(c: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([c["seed"], 0])
    n_items, n_cat, dim = c["items"], c["categories"], c["taste_dim"]
    centroids = rng.normal(0.0, 1.0, (n_cat, dim))
    category = rng.integers(0, n_cat, n_items)
    vecs = centroids[category] + 0.6 * rng.normal(0.0, 1.0, (n_items, dim))
    vecs /= np.sqrt(dim)
    pop = -0.8 * np.log(rng.permutation(n_items) + 1.0)  # Zipf-like popularity logit
    pop -= pop.mean()
    price_level = rng.lognormal(3.0, 0.7, n_cat)
    price = np.round(price_level[category] * rng.lognormal(0.0, 0.3, n_items), 2)
    return category, vecs, pop, price, centroids  # type: ignore[return-value]


def _users(c: dict, chunk: int, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = chunk * c["chunk_users"]
    n = min(c["chunk_users"], c["users"] - lo)
    rng = np.random.default_rng([c["seed"], 1, chunk])
    n_cat, dim = centroids.shape
    a, b = rng.integers(0, n_cat, n), rng.integers(0, n_cat, n)
    w = rng.uniform(0.5, 1.0, (n, 1))
    taste = (w * centroids[a] + (1 - w) * centroids[b] + 0.5 * rng.normal(0.0, 1.0, (n, dim))) * 1.5
    activity = rng.lognormal(0.0, 0.6, n)
    sessions = np.minimum(1 + rng.poisson(c["sessions_per_user"] * activity / np.exp(0.18)), c["max_sessions"])
    return np.arange(lo, lo + n), taste, sessions


def _chunk_events(c: dict, chunk: int, cat: tuple) -> pl.DataFrame:
    category, vecs, pop, price, centroids = cat
    uid, taste, n_sessions = _users(c, chunk, centroids)
    rng = np.random.default_rng([c["seed"], 2, chunk])
    n_users, n_items = len(uid), len(pop)
    prev = np.zeros_like(taste)
    clock = EPOCH0 + rng.uniform(0, 0.2 * DAYS * 86400, n_users)
    parts = []
    for t in range(int(n_sessions.max())):
        act = np.nonzero(n_sessions > t)[0]
        score = ((taste[act] + c["drift"] * prev[act]) @ vecs.T + pop) / c["temperature"]  # (A, I)
        k = 4
        gumbel = -np.log(-np.log(rng.uniform(1e-12, 1.0, score.shape)))
        top = np.argpartition(-(score + gumbel), k, axis=1)[:, :k]                           # (A, k) unordered
        order = np.argsort(-np.take_along_axis(score + gumbel, top, 1), axis=1)
        top = np.take_along_axis(top, order, 1)                                              # (A, k) best first
        n_views = 1 + rng.binomial(k - 1, 0.4, len(act))
        shown = np.arange(k)[None, :] < n_views[:, None]
        s = np.take_along_axis(score, top, 1)
        z = (s - score.mean(1, keepdims=True)) / (score.std(1, keepdims=True) + 1e-9)
        click = shown & (rng.uniform(size=s.shape) < 1 / (1 + np.exp(-(-2.0 + 0.8 * z))))
        cart = click & (rng.uniform(size=s.shape) < 1 / (1 + np.exp(-(-1.2 + 0.5 * z))))
        buy = cart & (rng.uniform(size=s.shape) < 1 / (1 + np.exp(-(-0.8 + 0.5 * z))))
        start = clock[act] + rng.exponential(DAYS * 86400 / (2 + n_sessions[act]))
        clock[act] = start + 3600
        prev[act] = vecs[top[:, 0]]
        users = np.repeat(uid[act][:, None], k, 1)
        sess = np.repeat((uid[act] * 1000 + t)[:, None], k, 1)
        base = start[:, None] + 120.0 * np.arange(k)[None, :]
        for stage, (mask, name, offset) in enumerate([(shown, "view", 0), (click, "click", 20), (cart, "cart", 50),
                                                      (buy, "purchase", 90)]):
            qty = rng.integers(1, 3, int(mask.sum())) if name in ("cart", "purchase") else None
            parts.append({"u": users[mask], "i": top[mask], "e": np.full(int(mask.sum()), stage, np.int8),
                          "ts": base[mask] + offset, "s": sess[mask], "q": qty})
    u = np.concatenate([p["u"] for p in parts])
    i = np.concatenate([p["i"] for p in parts])
    e = np.concatenate([p["e"] for p in parts])
    ts = np.concatenate([p["ts"] for p in parts])
    s = np.concatenate([p["s"] for p in parts])
    q = np.concatenate([p["q"] if p["q"] is not None else np.full(len(p["u"]), -1) for p in parts])
    order = np.lexsort((e, ts, u))
    u, i, e, ts, s, q = u[order], i[order], e[order], ts[order], s[order], q[order]
    names = np.array(["view", "click", "cart", "purchase"])
    q = q.astype(np.float64)
    q[q < 0] = np.nan
    return pl.DataFrame({"u": u, "i": i, "e": names[e], "ts": (ts * 1_000_000).astype(np.int64), "p": price[i],
                         "c": category[i], "s": s, "q": q}, nan_to_null=True).select(
        user_id=pl.lit("u") + pl.col("u").cast(pl.Utf8).str.zfill(7),
        item_id=pl.lit("i") + pl.col("i").cast(pl.Utf8).str.zfill(5),
        event=pl.col("e"),
        ts=pl.col("ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
        price=pl.col("p"),
        category=pl.lit("c") + pl.col("c").cast(pl.Utf8).str.zfill(2),
        session_id=pl.lit("s") + pl.col("s").cast(pl.Utf8),
        quantity=pl.col("q").cast(pl.Int64),
    )


def item_id(k: int) -> str:
    return f"i{k:05d}"


def user_id(k: int) -> str:
    return f"u{k:07d}"


def generate(synth: dict, out_dir: str, fmt: str = "parquet") -> dict:
    """Write `out_dir/raw/events-XXXXX.<fmt>` and `out_dir/truth/`; skip when the same config is already there."""
    c = _conf(synth)
    raw, truth = os.path.join(out_dir, "raw"), os.path.join(out_dir, "truth")
    marker = os.path.join(raw, "_SUCCESS")
    key = {**c, "fmt": fmt, "generator_version": GENERATOR_VERSION}
    if os.path.exists(marker):
        with open(marker) as fh:
            done = json.load(fh)
        if done.get("config") == key:
            return done["summary"]
    t0 = time.time()
    os.makedirs(raw, exist_ok=True)
    os.makedirs(truth, exist_ok=True)
    for old in os.listdir(raw):
        os.remove(os.path.join(raw, old))
    cat = _catalogue(c)
    category, vecs, pop, price, centroids = cat
    n_chunks = -(-c["users"] // c["chunk_users"])
    rows, files, tastes, user_list = 0, [], [], []
    for chunk in range(n_chunks):
        df = _chunk_events(c, chunk, cat)
        path = os.path.join(raw, f"events-{chunk:05d}.{fmt}")
        if fmt == "parquet":
            df.write_parquet(path, compression="zstd")
        elif fmt == "csv":
            df.with_columns(pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.6f")).write_csv(path)
        elif fmt == "jsonl":
            df.with_columns(pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.6f")).write_ndjson(path)
        else:
            raise ValueError(f"unknown format {fmt!r}")
        rows += df.height
        files.append(path)
        uid, taste, _ = _users(c, chunk, centroids)
        tastes.append(taste)
        user_list.extend(user_id(k) for k in uid)
    pl.DataFrame({"item_id": [item_id(k) for k in range(len(pop))], "category": category, "price": price,
                  "popularity": pop, "vec": vecs.tolist()}).write_parquet(os.path.join(truth, "items.parquet"))
    pl.DataFrame({"user_id": user_list, "taste": np.concatenate(tastes).tolist()}).write_parquet(
        os.path.join(truth, "users.parquet"))
    with open(os.path.join(truth, "truth.json"), "w") as fh:
        json.dump({"drift": c["drift"], "temperature": c["temperature"]}, fh)
    summary = {"rows": rows, "users": c["users"], "items": c["items"], "files": files, "seconds": round(time.time() - t0, 2)}
    with open(marker, "w") as fh:
        json.dump({"config": key, "summary": summary}, fh)
    return summary


def load_truth(out_dir: str) -> Truth:
    truth = os.path.join(out_dir, "truth")
    items = pl.read_parquet(os.path.join(truth, "items.parquet"))
    users = pl.read_parquet(os.path.join(truth, "users.parquet"))
    with open(os.path.join(truth, "truth.json")) as fh:
        extra = json.load(fh)
    return Truth(items["item_id"].to_list(), np.array(items["vec"].to_list()), items["popularity"].to_numpy(),
                 users["user_id"].to_list(), np.array(users["taste"].to_list()), extra["drift"], extra["temperature"])


def true_scores(truth: Truth, user_ids: list[str], history: list[list[str]] | None = None) -> np.ndarray:
    """(len(user_ids), n_items): the generator's score for every item given the user's last item."""
    uidx = {u: k for k, u in enumerate(truth.user_ids)}
    iidx = truth.item_index()
    taste = truth.user_taste[[uidx[u] for u in user_ids]].copy()
    if history is not None:
        for row, hist in enumerate(history):
            if hist:
                taste[row] += truth.drift * truth.item_vecs[iidx[hist[-1]]]
    return (taste @ truth.item_vecs.T + truth.item_pop) / truth.temperature
