"""Ranking metrics from the rank of the held-out item (0 = ranked first), for full and sampled ranking.

Two evaluation protocols, both exact and reproducible:
- full ranking: the target's rank among every item of the catalogue;
- sampled ranking: the target's rank among N random negatives drawn per user with a seeded generator keyed by
  (seed, user), never the target itself nor (with history excluded) an item of the user's history, so the
  result does not depend on batch size or on how users are spread over workers.
`exclude_history` removes the items already in the user's history from the candidates (except the target itself,
which a repeat-purchase log may contain), matching protocols that filter seen items.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

KS = (5, 10, 20)


def rank_of_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores (B, N), target (B,) column index -> rank (B,): candidates scoring strictly higher, plus half of the
    other candidates tied with the target (rounded down).

    A model's float scores almost never tie, but count-based baselines do (every never-bought item scores 0):
    placing the target in the middle of its tie group keeps a constant scorer from looking perfect.
    """
    # NaN as the lowest score: a NaN target compared false with everything (rank -1: HR 1, NDCG inf, and a
    # diverged model was kept as the best); an all-NaN row ranks like a constant scorer
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    t = scores.gather(1, target[:, None])
    ties = (scores == t).sum(1) - 1
    return (scores > t).sum(1) + torch.div(ties, 2, rounding_mode="floor")


def ranking_sums(rank: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Sums (not means) of HR@K and NDCG@K over the batch, so shards can be added before dividing."""
    out = {}
    for k in ks:
        hit = rank < k
        out[f"hr@{k}"] = float(hit.sum())
        out[f"ndcg@{k}"] = float((hit.double() / torch.log2(rank.double() + 2)).sum())
    return out


def mask_history(scores: torch.Tensor, histories: Sequence[np.ndarray], target: torch.Tensor) -> torch.Tensor:
    """A copy of scores (B, I) with each row's history columns set to -inf, except the row's target column."""
    scores = scores.clone()
    for r, h in enumerate(histories):
        seen = torch.as_tensor(np.asarray(h, dtype=np.int64))
        seen = seen[seen != target[r]]
        if len(seen):
            scores[r, seen] = float("-inf")
    return scores


def sample_negatives(num_items: int, n: int, target: int, history: np.ndarray | None, seed: int,
                     user_key: int) -> np.ndarray:
    """n distinct column indices in [0, num_items), none equal to target or in history; seeded by (seed, user_key)."""
    banned = {int(target)} | (set(np.asarray(history, dtype=np.int64).tolist()) if history is not None else set())
    allowed = num_items - len(banned)
    if n > allowed:
        from ecomray.runtime import UserError   # a setting's error (task.eval_sampled), not worth a retry

        raise UserError(f"task.eval_sampled={n}: cannot sample {n} negatives from the {allowed} items outside a "
                        f"user's history and target; choose fewer")
    rng = np.random.default_rng([int(seed), int(user_key)])
    picked: list[int] = []
    taken = set(banned)
    while len(picked) < n:
        for c in rng.integers(0, num_items, size=2 * (n - len(picked)) + 8).tolist():
            if c not in taken:
                taken.add(c)
                picked.append(c)
                if len(picked) == n:
                    break
    return np.asarray(picked, dtype=np.int64)


def rank_targets(scores: torch.Tensor, target: torch.Tensor | np.ndarray, histories: Sequence[np.ndarray] | None = None,
                 exclude_history: bool = True, sampled: int = 0, seed: int = 0,
                 user_keys: Sequence[int] | None = None) -> torch.Tensor:
    """Rank (B,) of each row's target column among all items (sampled=0) or among `sampled` seeded negatives.

    scores (B, I) over the catalogue; target (B,) and histories hold 0-based column indices. `user_keys` (B,)
    identify users for the per-user negative sampling (default: the row number).
    """
    t = torch.as_tensor(np.asarray(target, dtype=np.int64)) if not isinstance(target, torch.Tensor) else target.long()
    if exclude_history and histories is not None:
        scores = mask_history(scores, histories, t)
    if not sampled:
        return rank_of_target(scores, t)
    keys = list(user_keys) if user_keys is not None else list(range(len(t)))
    hist = histories if (exclude_history and histories is not None) else [None] * len(t)
    neg = torch.from_numpy(np.stack([sample_negatives(scores.shape[1], sampled, int(t[r]), hist[r], seed, keys[r])
                                     for r in range(len(t))]))                     # (B, N)
    cand = torch.cat([t[:, None], neg], 1)                                           # (B, 1 + N), target first
    return rank_of_target(scores.gather(1, cand), torch.zeros(len(t), dtype=torch.long))
