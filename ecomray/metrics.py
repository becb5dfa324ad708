"""Ranking metrics from the rank of the held-out item (0 = ranked first)."""

from __future__ import annotations

import math

import torch

KS = (5, 10, 20)


def rank_of_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores (B, N), target (B,) column index -> rank (B,): how many items score strictly higher."""
    t = scores.gather(1, target[:, None])
    return (scores > t).sum(1)


def ranking_sums(rank: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Sums (not means) of HR@K and NDCG@K over the batch, so shards can be added before dividing."""
    out = {}
    for k in ks:
        hit = rank < k
        out[f"hr@{k}"] = float(hit.sum())
        out[f"ndcg@{k}"] = float((hit.double() / torch.log2(rank.double() + 2)).sum())
    return out


def ndcg_single(rank: int, k: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0
