"""Baselines for next-item recommendation, scored in the same harness as the model (`next_item.evaluate(...,
scorer=...)`): most-popular and item-kNN. Both are fitted on the training part of each sequence only (the sequence
minus its val and test items), like the model. They take plain arrays, so this module imports nothing of the task.

A scorer is `scorer(histories, rows) -> (B, I) float scores`, histories being 1-based item-id arrays.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

Scorer = Callable[[list[np.ndarray], list[int]], torch.Tensor]


def popularity(counts: np.ndarray) -> Scorer:
    """Every user gets the catalogue ranked by training interaction counts (I,)."""
    pop = torch.from_numpy(np.asarray(counts)).float()                    # (I,)
    return lambda histories, rows: pop.expand(len(histories), -1)


def item_knn(parts: list[np.ndarray], num_items: int, neighbours: int = 100, recent: int = 10, decay: float = 0.8,
             shrink: float = 10.0) -> Scorer:
    """Item-based kNN over co-occurrence in training sequences.

    sim(i, j) = co(i, j) / (sqrt(n_i * n_j) + shrink), keeping each item's `neighbours` most similar items. A user's
    score for j is sum over the last `recent` history items h_t of decay**age(t) * sim(h_t, j): recent items weigh
    more, which suits next-item prediction.
    """
    I = num_items
    indptr = np.cumsum([0] + [len(np.unique(p)) for p in parts])
    cols = np.concatenate([np.unique(p) - 1 for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    x = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), cols, indptr), shape=(len(parts), I))  # (U, I) binary
    co = (x.T @ x).tocsr()                                                                          # (I, I)
    co.setdiag(0)
    co.eliminate_zeros()
    n = np.asarray(x.sum(0)).ravel()                                                                # (I,)
    co = co.tocoo()
    sim = sp.csr_matrix((co.data / (np.sqrt(n[co.row] * n[co.col]) + shrink), (co.row, co.col)), shape=(I, I))
    sim = _top_k_rows(sim, neighbours)

    def score(histories: list[np.ndarray], rows: list[int]) -> torch.Tensor:
        r_idx, c_idx, w = [], [], []
        for r, h in enumerate(histories):
            tail = np.asarray(h[-recent:], dtype=np.int64) - 1
            r_idx.extend([r] * len(tail))
            c_idx.extend(tail.tolist())
            w.extend((decay ** np.arange(len(tail))[::-1]).tolist())
        q = sp.csr_matrix((w, (r_idx, c_idx)), shape=(len(histories), I))          # (B, I) weighted history
        return torch.from_numpy(np.asarray((q @ sim).todense(), dtype=np.float32))  # (B, I)

    return score


def _top_k_rows(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of each row."""
    m = m.tocsr()
    rows, cols, vals = [], [], []
    for i in range(m.shape[0]):
        lo, hi = m.indptr[i], m.indptr[i + 1]
        if hi == lo:
            continue
        d, c = m.data[lo:hi], m.indices[lo:hi]
        if hi - lo > k:
            keep = np.argpartition(-d, k - 1)[:k]
            d, c = d[keep], c[keep]
        rows.append(np.full(len(c), i))
        cols.append(c)
        vals.append(d)
    if not rows:
        return sp.csr_matrix(m.shape, dtype=np.float32)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=m.shape)


def scorers(train_parts: list[np.ndarray], num_items: int, counts: np.ndarray,
            cfg: dict | None = None) -> dict[str, Scorer]:
    """The baselines by name, fitted on each user's training part (1-based item ids); `cfg` (task.baselines) may
    set item-kNN's parameters."""
    knn = ((cfg or {}).get("item_knn") or {})
    return {"popularity": popularity(counts), "item_knn": item_knn(train_parts, num_items, **knn)}
