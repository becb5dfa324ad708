"""The built-in synthetic shop: a seeded generator of behaviour logs whose true preferences are known.

The world (`D = taste_dim`, `I = items`):
- items: a category (each category has a centroid in the D-dim taste space), a vector near its centroid, a price
  (lognormal around the category's price level) and a Zipf-like popularity logit;
- users: a taste vector (a mix of two category centroids plus noise) and an activity level (lognormal) that sets
  their number of sessions; sessions are spread over a `days`-long window, views within a session minutes apart;
- choices: every view picks one item from a softmax over the catalogue,
      score(user, j) = taste . v_j + pop_j + drift * (v_anchor M) . v_j,      p(j) ~ exp(score / temperature)
  where the anchor is the user's most recent *new* item (the last item of their first-interaction history) and
  M = 0.5 I + Q (Q a random rotation) mixes "more like the last item" with "what goes with the last item".
  The anchor term is why a sequential model beats static taste, and static taste beats popularity;
  `true_scores()` returns exactly this score, which an oracle recommender ranks by;
- funnel: each view may become a click, a cart (quantity >= 1) and a purchase (the same quantity), with
  probabilities rising with how far the chosen item's score stands above the user's average over the catalogue.

Scale: users are generated `chunk_users` at a time, vectorized over the chunk with numpy, and each chunk is written
straight to its own file, so 100M+ events never sit in memory; memory per chunk is bounded by working on blocks
of about 4M (user, item) cells. Per-user randomness comes from a counter-based hash of (seed, stream, user, index),
not from a stream shared by the chunk, so a user's rows do not depend on `chunk_users`: any chunking writes the same
rows, byte for byte, in the same order. Only the catalogue uses a seeded numpy Generator.

The ordering and the anchor make the oracle exact for next-item evaluation over first-interaction histories built
from all events; over other histories (e.g. purchases only) it is the generator's score given that last item.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from ecomray.runtime import UserError

__all__ = ["DEFAULTS", "Truth", "generate", "load_truth", "true_scores", "write_csv", "item_id", "user_id"]

EPOCH0 = 1767225600  # 2026-01-01T00:00:00Z
GENERATOR_VERSION = 3  # bump when the generator changes: cached raw data is then regenerated
DEFAULTS: dict = {"seed": 0, "users": 3000, "items": 600, "categories": 12, "sessions_per_user": 6.0, "taste_dim": 8,
                  "chunk_users": 50000, "drift": 3.0, "temperature": 1.0, "max_sessions": 40, "days": 90}
EVENTS = ("view", "click", "cart", "purchase")
COLUMNS = ("user_id", "item_id", "event", "ts", "price", "category", "session_id", "quantity")
TS_TEXT = "%Y-%m-%dT%H:%M:%S%.6f"  # CSV / JSONL timestamps: 2026-03-01T12:00:00.123456 (UTC)
MAX_VIEWS_PER_SESSION = 4
CELLS_PER_BLOCK = 1 << 22  # (users x items) cells worked on at once: bounds memory whatever the chunk size
Z_MID = 2.0
DENSE_ITEMS = 4096  # up to this many items the item->item anchor term is precomputed as an (I, I) table

# Independent random streams of the counter-based generator.
_S_CAT_A, _S_CAT_B, _S_MIX, _S_TASTE, _S_ACT, _S_JOIN, _S_GAP, _S_NVIEWS = range(8)
_S_CHOICE, _S_CLICK, _S_CART, _S_BUY, _S_QTY, _S_DT_VIEW, _S_DT_CLICK, _S_DT_CART, _S_DT_BUY = range(8, 17)


# ----------------------------------------------------------------------------------------------- randomness
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective avalanche on uint64 (wraps on overflow by design)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, stream: int, a: np.ndarray, b: np.ndarray | int = 0) -> np.ndarray:
    """U(0, 1) as a pure function of (seed, stream, a, b), a < 2**50 (the user), b < 4096 (an index)."""
    key = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) % 2**64], dtype=np.uint64))
    counter = (np.asarray(a, dtype=np.uint64) << np.uint64(12)) | np.asarray(b, dtype=np.uint64)
    h = _mix64(_mix64(counter + key[0]))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _normal(seed: int, stream: int, a: np.ndarray, b: np.ndarray | int = 0) -> np.ndarray:
    """N(0, 1) by Box-Muller from two hashed uniforms (indices 2b and 2b+1)."""
    b2 = np.asarray(b, dtype=np.uint64) * np.uint64(2)
    u1, u2 = _uniform(seed, stream, a, b2), _uniform(seed, stream, a, b2 + np.uint64(1))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


# ----------------------------------------------------------------------------------------------- the world
@dataclass
class Truth:
    """The generator's ground truth: everything `true_scores` needs, in `item_ids` / `user_ids` order."""

    item_ids: list[str]
    item_vecs: np.ndarray      # (I, D)
    item_pop: np.ndarray       # (I,) popularity logit
    user_ids: list[str]
    user_taste: np.ndarray     # (U, D)
    drift: float
    temperature: float
    transition: np.ndarray     # (D, D) M in the anchor term (v_anchor M) . v_j
    item_category: list[str] = field(default_factory=list)
    item_price: np.ndarray = field(default_factory=lambda: np.zeros(0))
    user_activity: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @functools.cached_property
    def _items(self) -> dict[str, int]:
        return {item: k for k, item in enumerate(self.item_ids)}

    @functools.cached_property
    def _users(self) -> dict[str, int]:
        return {u: k for k, u in enumerate(self.user_ids)}

    def item_index(self) -> dict[str, int]:
        """item id -> row in `item_vecs` (and column in `true_scores`)."""
        return self._items


@dataclass
class _World:
    category: np.ndarray   # (I,) int
    vecs: np.ndarray       # (I, D)
    pop: np.ndarray        # (I,)
    price: np.ndarray      # (I,)
    centroids: np.ndarray  # (C, D)
    transition: np.ndarray  # (D, D)
    anchor_exp: np.ndarray | None  # (I + 1, I) float32 exp(drift * v_a M v_j / temperature), row max removed;
                                   # the last row (no anchor yet) is ones


def _setting(key: str, value: Any, kind: type) -> Any:
    """`dataset.synthetic.<key>` as an int (a whole number) or a finite float; anything else is one error line."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        out = kind(value)
    except (TypeError, ValueError):
        out = None
    if out is None or (kind is float and not math.isfinite(out)):
        raise UserError(f"dataset.synthetic.{key}={value!r}: must be "
                        f"{'an integer' if kind is int else 'a finite number'}")
    return out


def _conf(synth: dict) -> dict:
    c = {**DEFAULTS, **{k: v for k, v in (synth or {}).items() if v is not None}}
    for key in ("seed", "users", "items", "categories", "taste_dim", "chunk_users", "max_sessions", "days"):
        c[key] = _setting(key, c[key], int)
    for key in ("sessions_per_user", "drift", "temperature"):
        c[key] = _setting(key, c[key], float)
    problems = [f"{k} must be >= 1 (got {c[k]})" for k in ("users", "items", "categories", "taste_dim", "chunk_users",
                                                           "max_sessions", "days") if c[k] < 1]
    if c["max_sessions"] * MAX_VIEWS_PER_SESSION >= 4096:
        problems.append(f"max_sessions must be < {4096 // MAX_VIEWS_PER_SESSION} (got {c['max_sessions']})")
    if c["temperature"] <= 0 or c["sessions_per_user"] <= 0:
        problems.append("temperature and sessions_per_user must be > 0")
    if c["max_sessions"] * 3600 * 2 > c["days"] * 86400:
        problems.append(f"{c['max_sessions']} sessions of an hour do not fit comfortably in {c['days']} days")
    if problems:
        raise UserError("dataset.synthetic: " + "; ".join(problems))
    return c


def _world(c: dict) -> _World:
    rng = np.random.default_rng([c["seed"], 0])
    n_items, n_cat, dim = c["items"], c["categories"], c["taste_dim"]
    centroids = rng.normal(0.0, 1.0, (n_cat, dim))
    category = rng.integers(0, n_cat, n_items)
    vecs = (centroids[category] + 0.6 * rng.normal(0.0, 1.0, (n_items, dim))) / np.sqrt(dim)
    pop = -0.8 * np.log(rng.permutation(n_items) + 1.0)  # Zipf-like: logit ~ -0.8 log(rank)
    pop -= pop.mean()
    price_level = rng.lognormal(3.0, 0.7, n_cat)
    price = np.round(price_level[category] * rng.lognormal(0.0, 0.3, n_items), 2)
    q, r = np.linalg.qr(rng.normal(0.0, 1.0, (dim, dim)))
    transition = 0.5 * np.eye(dim) + q * np.sign(np.diag(r))[None, :]
    exp = None
    if n_items <= DENSE_ITEMS:
        term = np.zeros((n_items + 1, n_items))
        term[:n_items] = c["drift"] * (vecs @ transition) @ vecs.T
        exp = np.exp((term - term.max(1, keepdims=True)) / c["temperature"]).astype(np.float32)
    return _World(category, vecs, pop, price, centroids, transition, exp)


def _users(c: dict, w: _World, uid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(taste (n, D), activity (n,), sessions (n,)) for global user numbers `uid`."""
    seed, n_cat, dim = c["seed"], c["categories"], c["taste_dim"]
    a = np.minimum((_uniform(seed, _S_CAT_A, uid) * n_cat).astype(np.int64), n_cat - 1)
    b = np.minimum((_uniform(seed, _S_CAT_B, uid) * n_cat).astype(np.int64), n_cat - 1)
    mix = 0.5 + 0.5 * _uniform(seed, _S_MIX, uid)[:, None]
    noise = _normal(seed, _S_TASTE, uid[:, None], np.arange(dim, dtype=np.uint64)[None, :])
    taste = 1.5 * (mix * w.centroids[a] + (1.0 - mix) * w.centroids[b] + 0.5 * noise)
    activity = np.exp(0.6 * _normal(seed, _S_ACT, uid) - 0.18)  # lognormal with mean 1
    sessions = np.clip(np.round(c["sessions_per_user"] * activity), 1, c["max_sessions"]).astype(np.int64)
    return taste, activity, sessions


def _dot(query: np.ndarray, vecs: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(n, I) query . v_j + offset_j, elementwise (not BLAS) so a row's values never depend on the block's shape."""
    out = np.repeat(offset[None, :], len(query), axis=0)
    for d in range(query.shape[1]):
        out += query[:, d : d + 1] * vecs[None, :, d]
    return out


# ----------------------------------------------------------------------------------------------- generation
def _block(c: dict, w: _World, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Every view of users lo..hi-1 with its funnel outcome, in (user, view order)."""
    seed, n_items, max_s, temp = c["seed"], c["items"], c["max_sessions"], c["temperature"]
    window = c["days"] * 86400.0
    uid = np.arange(lo, hi, dtype=np.uint64)
    n = hi - lo
    taste, _, n_sess = _users(c, w, uid)

    # sessions: (n, max_s) with the first n_sess valid; at least an hour apart, spread over the user's window
    k = np.arange(max_s + 1, dtype=np.uint64)[None, :]
    valid = np.arange(max_s)[None, :] < n_sess[:, None]                                    # (n, S)
    u_views = _uniform(seed, _S_NVIEWS, uid[:, None], k[:, :max_s])
    n_views = np.where(valid, 1 + (u_views > 0.35) + (u_views > 0.7) + (u_views > 0.9), 0)  # 1..4, mean ~1.95
    gaps = np.where(np.arange(max_s + 1)[None, :] <= n_sess[:, None],
                    -np.log(_uniform(seed, _S_GAP, uid[:, None], k)), 0.0)                 # (n, S + 1)
    cum = np.cumsum(gaps, axis=1)
    join = 0.25 * window * _uniform(seed, _S_JOIN, uid)
    span = window - join - (n_sess + 1) * 3600.0
    starts = (EPOCH0 + join)[:, None] + cum[:, :max_s] / cum[np.arange(n), n_sess][:, None] * span[:, None] \
        + 3600.0 * np.arange(max_s)[None, :]                                               # (n, S)

    # views, flattened user-major: user, session, position in session, index t among the user's views
    per_sess = n_views[valid]
    v_user = np.repeat(np.repeat(np.arange(n), n_sess), per_sess)
    v_sess = np.repeat(np.nonzero(valid)[1], per_sess)
    n_total = n_views.sum(1)                                                               # (n,)
    u_off = np.cumsum(n_total) - n_total
    v_t = np.arange(len(v_user)) - u_off[v_user]
    s_off = np.cumsum(per_sess) - per_sess
    v_pos = np.arange(len(v_user)) - np.repeat(s_off, per_sess)
    vu = uid[v_user]
    vt = v_t.astype(np.uint64)
    u_choice = _uniform(seed, _S_CHOICE, vu, vt).astype(np.float32)

    # choices, one view step at a time for every user who still has a view left (heaviest users first)
    base = _dot(taste, w.vecs, w.pop)                                                          # (n, I)
    mu, sd = base.mean(1), base.std(1) + 1e-9
    e_base = np.exp((base - base.max(1, keepdims=True)) / temp).astype(np.float32)
    order = np.argsort(-n_total, kind="stable")
    base, e_base = base[order], e_base[order]
    n_sorted = n_total[order]
    off_sorted = u_off[order]
    anchor = np.full(n, n_items)  # n_items = "no anchor yet"
    seen = np.zeros((n, n_items), dtype=bool)
    item = np.zeros(len(v_user), dtype=np.int64)
    taste_score = np.zeros(len(v_user))
    rows = np.arange(n)
    for t in range(int(n_sorted[0]) if n else 0):
        m = int(np.count_nonzero(n_sorted > t))
        r, a = rows[:m], anchor[:m]
        idx = off_sorted[:m] + t
        if w.anchor_exp is not None:
            prob = e_base[:m] * w.anchor_exp[a]                                            # (m, I)
        else:  # big catalogues: the anchor term on the fly
            lin = np.where((a < n_items)[:, None], w.vecs[np.minimum(a, n_items - 1)] @ w.transition, 0.0)
            term_a = _dot(c["drift"] * lin, w.vecs, np.zeros(n_items))                    # (m, I)
            prob = e_base[:m] * np.exp((term_a - term_a.max(1, keepdims=True)) / temp).astype(np.float32)
        cdf = np.cumsum(prob, axis=1)
        j = np.minimum(np.count_nonzero(cdf < (u_choice[idx] * cdf[:, -1])[:, None], axis=1), n_items - 1)
        item[idx] = j
        taste_score[idx] = base[r, j]
        new = ~seen[r, j]
        seen[r, j] = True
        anchor[:m] = np.where(new, j, a)

    # funnel: the further the chosen item's taste score stands above the user's average, the likelier each step;
    # chosen items sit ~Z_MID sd above it (median), so centre there to keep the funnel rates plausible
    zc = (taste_score - mu[v_user]) / sd[v_user] - Z_MID
    click = _uniform(seed, _S_CLICK, vu, vt) < 1.0 / (1.0 + np.exp(-(-1.0 + 0.6 * zc)))
    cart = click & (_uniform(seed, _S_CART, vu, vt) < 1.0 / (1.0 + np.exp(-(-0.4 + 0.5 * zc))))
    buy = cart & (_uniform(seed, _S_BUY, vu, vt) < 1.0 / (1.0 + np.exp(-(0.0 + 0.5 * zc))))
    qty = 1 + np.floor(np.log(_uniform(seed, _S_QTY, vu, vt)) / np.log(0.25)).astype(np.int64)
    t_view = starts[v_user, v_sess] + 200.0 * v_pos + 150.0 * _uniform(seed, _S_DT_VIEW, vu, vt)
    t_click = t_view + 3.0 + 40.0 * _uniform(seed, _S_DT_CLICK, vu, vt)
    t_cart = t_click + 20.0 + 100.0 * _uniform(seed, _S_DT_CART, vu, vt)
    t_buy = t_cart + 30.0 + 300.0 * _uniform(seed, _S_DT_BUY, vu, vt)
    return {"user": vu.astype(np.int64), "item": item, "session": v_sess, "qty": np.minimum(qty, 9),
            "click": click, "cart": cart, "buy": buy, "t": np.stack([t_view, t_click, t_cart, t_buy], 1)}


def _chunk_events(c: dict, w: _World, lo: int, hi: int, names: dict[str, pl.Series]) -> pl.DataFrame:
    """The event rows of users lo..hi-1, sorted by (user, ts), in the output columns."""
    block = max(1, min(c["chunk_users"], CELLS_PER_BLOCK // c["items"]))
    views = [_block(c, w, s, min(s + block, hi)) for s in range(lo, hi, block)]
    v = {key: np.concatenate([b[key] for b in views]) for key in views[0]}
    stages = [np.ones(len(v["user"]), dtype=bool), v["click"], v["cart"], v["buy"]]
    sel = [np.nonzero(mask)[0] for mask in stages]
    src = np.concatenate(sel)                                                   # view row of every event
    stage = np.concatenate([np.full(len(s), k, dtype=np.int8) for k, s in enumerate(sel)])
    ts = np.round(v["t"][src, stage] * 1e6).astype(np.int64)                    # microseconds
    user = v["user"][src]
    order = np.lexsort((stage, ts, user))
    src, stage, ts, user = src[order], stage[order], ts[order], user[order]
    item = v["item"][src]
    qty = pl.Series("quantity", v["qty"][src]).set(pl.Series(stage < 2), None)
    user_names = pl.Series([user_id(u, c["users"]) for u in range(lo, hi)])
    uid = user_names.gather(user - lo)
    session = pl.Series(v["session"][src]).cast(pl.Utf8).str.zfill(2)
    return pl.DataFrame({
        "user_id": uid,
        "item_id": names["item"].gather(item),
        "event": names["event"].gather(stage),
        "ts": pl.Series(ts).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
        "price": w.price[item],
        "category": names["category"].gather(w.category[item]),
        "session_id": "s" + uid.str.slice(1) + "-" + session,
        "quantity": qty,
    })


def _names(c: dict) -> dict[str, pl.Series]:
    return {"item": pl.Series([item_id(k, c["items"]) for k in range(c["items"])]),
            "category": pl.Series([f"c{k:02d}" for k in range(c["categories"])]),
            "event": pl.Series(list(EVENTS))}


def item_id(k: int, n_items: int = 100000) -> str:
    """Item number k as its id, e.g. i00042 (at least 5 digits)."""
    return f"i{k:0{max(5, len(str(n_items - 1)))}d}"


def user_id(k: int, n_users: int = 10**7) -> str:
    """User number k as its id, e.g. u0000123 (at least 7 digits)."""
    return f"u{k:0{max(7, len(str(n_users - 1)))}d}"


def _write(df: pl.DataFrame, path: str, fmt: str) -> None:
    if fmt == "parquet":
        df.write_parquet(path, compression="zstd")
    elif fmt == "csv":
        df.with_columns(pl.col("ts").dt.strftime(TS_TEXT)).write_csv(path)
    elif fmt == "jsonl":
        df.with_columns(pl.col("ts").dt.strftime(TS_TEXT)).write_ndjson(path)


def generate(synth: dict, out_dir: str, fmt: str = "parquet") -> dict:
    """Write the synthetic shop to `out_dir`; skip the work when the same config is already there.

    Writes `out_dir/raw/events-00000.<parquet|csv|jsonl>`, one file per chunk of `chunk_users` users, with columns
    user_id, item_id, event, ts, price, category, session_id, quantity (rows sorted by user, then ts), and the ground
    truth `out_dir/truth/{items,users}.parquet` + `truth.json`. `out_dir/raw/_SUCCESS` records the config.
    Returns {"rows", "users", "items", "files", "events", "seconds"}.
    """
    if fmt not in ("parquet", "csv", "jsonl"):
        raise ValueError(f"synthetic.generate: unknown format {fmt!r}; use parquet, csv or jsonl")
    c = _conf(synth)
    raw, truth = os.path.join(out_dir, "raw"), os.path.join(out_dir, "truth")
    marker = os.path.join(raw, "_SUCCESS")
    key = {**c, "fmt": fmt, "generator_version": GENERATOR_VERSION}
    key.pop("chunk_users")  # the rows do not depend on it
    if os.path.exists(marker):
        with open(marker) as fh:
            done = json.load(fh)
        if done.get("config") == key and all(os.path.exists(f) for f in done["summary"]["files"]):
            return done["summary"]
    t0 = time.time()
    for folder in (raw, truth):
        os.makedirs(folder, exist_ok=True)
        for old in os.listdir(folder):
            os.remove(os.path.join(folder, old))
    w, names = _world(c), _names(c)
    rows, files, counts = 0, [], dict.fromkeys(EVENTS, 0)
    users_writer = None
    try:
        for chunk, lo in enumerate(range(0, c["users"], c["chunk_users"])):
            hi = min(lo + c["chunk_users"], c["users"])
            df = _chunk_events(c, w, lo, hi, names)
            path = os.path.join(raw, f"events-{chunk:05d}.{fmt}")
            _write(df, path, fmt)
            rows += df.height
            files.append(path)
            for ev, n in df["event"].value_counts().iter_rows():
                counts[ev] += n
            taste, activity, sessions = _users(c, w, np.arange(lo, hi, dtype=np.uint64))
            table = pl.DataFrame({"user_id": [user_id(u, c["users"]) for u in range(lo, hi)], "taste": taste,
                                  "activity": activity, "sessions": sessions}).to_arrow()
            if users_writer is None:
                users_writer = pq.ParquetWriter(os.path.join(truth, "users.parquet"), table.schema, compression="zstd")
            users_writer.write_table(table)
    finally:
        if users_writer is not None:
            users_writer.close()
    pl.DataFrame({"item_id": names["item"], "category": names["category"].gather(w.category), "price": w.price,
                  "popularity": w.pop, "vec": w.vecs}).write_parquet(os.path.join(truth, "items.parquet"))
    with open(os.path.join(truth, "truth.json"), "w") as fh:
        json.dump({"drift": c["drift"], "temperature": c["temperature"], "transition": w.transition.tolist(),
                   "config": key}, fh)
    summary = {"rows": rows, "users": c["users"], "items": c["items"], "files": files, "events": counts,
               "seconds": round(time.time() - t0, 2)}
    with open(marker, "w") as fh:
        json.dump({"config": key, "summary": summary}, fh)
    return summary


def write_csv(synth: dict, path: str, rows_target: int, *, order: str = "user", duplicates: float = 0.0,
              invalid: float = 0.0) -> dict:
    """Stream exactly `rows_target` event rows (header + ISO timestamps) into one CSV file, for benchmarks.

    `synth["users"]` is replaced by enough users to reach the target (estimated on a pilot of 2,000 users); the
    last chunk is cut at the target. `order="time"` sorts each chunk by ts (a log exported in time order, users
    interleaved) instead of by user. `duplicates` / `invalid` add that fraction of exact copies of rows / rows with
    an event type outside the schema ("refund") next to randomly picked rows, to exercise dedup and quarantine.
    Returns {"rows", "users", "bytes", "seconds", "duplicates", "invalid"}.
    """
    if order not in ("user", "time"):
        raise ValueError(f"write_csv: order must be 'user' or 'time' (got {order!r})")
    t0 = time.time()
    c = _conf({**synth, "users": 2000})
    w, names = _world(c), _names(c)
    per_user = _chunk_events(c, w, 0, 2000, names).height / 2000 * (1.0 + duplicates + invalid)
    c = _conf({**synth, "users": int(rows_target / per_user * 1.05) + 1000})
    names = _names(c)
    rows, users, n_dup, n_bad = 0, 0, 0, 0
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        for chunk, lo in enumerate(range(0, c["users"], c["chunk_users"])):
            if rows >= rows_target:
                break
            hi = min(lo + c["chunk_users"], c["users"])
            df = _chunk_events(c, w, lo, hi, names).with_columns(_noise=pl.lit(0, dtype=pl.Int8))
            if duplicates or invalid:
                rng = np.random.default_rng([c["seed"], 3, chunk])
                dup = df.gather(rng.choice(df.height, int(round(df.height * duplicates)))).with_columns(_noise=pl.lit(1, dtype=pl.Int8))
                bad = df.gather(rng.choice(df.height, int(round(df.height * invalid)))).with_columns(
                    event=pl.lit("refund"), _noise=pl.lit(2, dtype=pl.Int8))
                df = pl.concat([df, dup, bad]).sort(["user_id", "ts"], maintain_order=True)
            if order == "time":
                df = df.sort("ts", maintain_order=True)
            df = df.head(rows_target - rows)
            n_dup += int((df["_noise"] == 1).sum())
            n_bad += int((df["_noise"] == 2).sum())
            df.drop("_noise").with_columns(pl.col("ts").dt.strftime(TS_TEXT)).write_csv(fh, include_header=rows == 0)
            rows += df.height
            users = hi
    if rows < rows_target:
        raise RuntimeError(f"write_csv: produced {rows} rows < {rows_target}; the pilot estimate was off")
    os.replace(tmp, path)
    return {"rows": rows, "users": users, "bytes": os.path.getsize(path), "seconds": round(time.time() - t0, 2),
            "duplicates": n_dup, "invalid": n_bad}


# ----------------------------------------------------------------------------------------------- ground truth
def load_truth(out_dir: str) -> Truth:
    """Read the ground truth that `generate(..., out_dir)` wrote."""
    folder = os.path.join(out_dir, "truth")
    if not os.path.exists(os.path.join(folder, "truth.json")):
        raise FileNotFoundError(f"{folder} holds no synthetic ground truth; run synthetic.generate(..., {out_dir!r})")
    items = pl.read_parquet(os.path.join(folder, "items.parquet"))
    users = pl.read_parquet(os.path.join(folder, "users.parquet"))
    with open(os.path.join(folder, "truth.json")) as fh:
        extra = json.load(fh)
    return Truth(item_ids=items["item_id"].to_list(), item_vecs=items["vec"].to_numpy(),
                 item_pop=items["popularity"].to_numpy(), user_ids=users["user_id"].to_list(),
                 user_taste=users["taste"].to_numpy(), drift=float(extra["drift"]),
                 temperature=float(extra["temperature"]), transition=np.asarray(extra["transition"]),
                 item_category=items["category"].to_list(), item_price=items["price"].to_numpy(),
                 user_activity=users["activity"].to_numpy())


def _anchor(history: list[str]) -> str | None:
    """The generator's anchor: the item whose first appearance in `history` is the latest."""
    seen: set[str] = set()
    last = None
    for item in history:
        if item not in seen:
            seen.add(item)
            last = item
    return last


def true_scores(truth: Truth, user_ids: list[str], history: list[list[str]] | None = None) -> np.ndarray:
    """(len(user_ids), I) the generator's score of every item (order `truth.item_ids`) for each user's next view.

    `history[b]` is user b's item sequence so far (oldest first; repeats allowed); its most recent new item is the
    anchor. Without a history the anchor term is left out (the user's static taste plus popularity).
    """
    missing = [u for u in user_ids if u not in truth._users]
    if missing:
        raise KeyError(f"true_scores: {len(missing)} user(s) not in the ground truth, e.g. {missing[0]!r}")
    taste = truth.user_taste[[truth._users[u] for u in user_ids]]                       # (B, D)
    query = taste.copy()
    if history is not None:
        if len(history) != len(user_ids):
            raise ValueError(f"true_scores: {len(history)} histories for {len(user_ids)} users")
        anchors = [_anchor(list(h)) for h in history]
        rows = [b for b, a in enumerate(anchors) if a is not None]
        if rows:
            vec = truth.item_vecs[[truth._items[anchors[b]] for b in rows]]             # (B', D)
            query[rows] += truth.drift * vec @ truth.transition
    return (query @ truth.item_vecs.T + truth.item_pop) / truth.temperature
