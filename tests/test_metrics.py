"""Ranking metrics and the two evaluation protocols (full and sampled ranking), against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecomray.metrics import rank_of_target, rank_targets, ranking_sums, sample_negatives
from ecomray.runtime import UserError


def test_ranks_and_metrics_match_a_hand_computed_ranking() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # target 2 (0.5): one higher -> rank 1
                           [0.1, 0.2, 0.3, 0.4],    # target 0: three higher -> rank 3
                           [0.0, 1.0, 0.2, 0.1]])   # target 1: rank 0
    rank = rank_of_target(scores, torch.tensor([2, 0, 1]))
    assert rank.tolist() == [1, 3, 0]
    s = ranking_sums(rank, ks=(1, 2, 5))
    assert (s["hr@1"], s["hr@2"], s["hr@5"]) == (1, 2, 3)
    assert s["ndcg@1"] == pytest.approx(1.0)
    assert s["ndcg@2"] == pytest.approx(1 / math.log2(3) + 1.0)
    assert s["ndcg@5"] == pytest.approx(1 / math.log2(3) + 1 / math.log2(5) + 1.0)


def test_ties_put_the_target_mid_group_so_a_constant_scorer_is_not_perfect() -> None:
    rank = rank_of_target(torch.zeros(1, 11), torch.tensor([4]))
    assert rank.tolist() == [5]                      # 10 others tied: half of them ahead


def test_a_nan_score_ranks_last_never_first() -> None:
    """A NaN target compared false with everything: rank -1, a hit at every K, NDCG inf (a diverged model looked
    perfect and was kept)."""
    scores = torch.tensor([[0.5, float("nan"), 0.1, 0.9], [float("nan")] * 4])
    rank = rank_of_target(scores, torch.tensor([1, 2]))
    assert rank.tolist() == [3, 1]                    # below every number; an all-NaN row ranks like a constant
    sums = ranking_sums(rank, ks=(1,))
    assert sums == {"hr@1": 0.0, "ndcg@1": 0.0}


def test_history_excluded_or_kept() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    hist = [np.array([0, 1, 3])]                     # columns 0, 1 in the history (and 3, the target itself)
    target = np.array([3])
    assert rank_targets(scores, target, hist, exclude_history=False).tolist() == [3]
    assert rank_targets(scores, target, hist, exclude_history=True).tolist() == [1]   # only column 2 is ahead


def test_sampled_ranking_is_seeded_per_user_and_avoids_target_and_history() -> None:
    hist = np.array([0, 1, 2])
    neg = sample_negatives(50, 20, target=7, history=hist, seed=3, user_key=11)
    assert len(set(neg.tolist())) == 20 and not {0, 1, 2, 7} & set(neg.tolist())
    assert neg.tolist() == sample_negatives(50, 20, 7, hist, 3, 11).tolist()
    assert neg.tolist() != sample_negatives(50, 20, 7, hist, 3, 12).tolist()
    # rank among the sampled candidates = how many of the sampled negatives score higher than the target
    scores = torch.arange(50, dtype=torch.float32)[None].flip(1)        # column c scores 49 - c
    r = rank_targets(scores, np.array([7]), [hist], True, sampled=20, seed=3, user_keys=[11])
    assert r.tolist() == [int((neg < 7).sum())]
    # the same user gets the same negatives whatever batch it sits in
    two = rank_targets(scores.expand(2, -1), np.array([9, 7]), [np.array([0]), hist], True, sampled=20, seed=3,
                       user_keys=[5, 11])
    assert two[1].item() == r.item()
    with pytest.raises(UserError, match=r"task.eval_sampled=4: cannot sample 4 negatives"):
        sample_negatives(5, 4, target=0, history=np.array([1]), seed=0, user_key=0)
