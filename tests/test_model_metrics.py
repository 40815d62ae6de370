"""Ranking metrics against hand-computed rankings, with ties and NaN counted pessimistically."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedscope_jax.eval.metrics import pessimistic_rank, ranking_metrics
from fedscope_jax.eval.protocol import bucket_labels


def test_pessimistic_rank_counts_ties_and_nan_against_target():
    target = np.array([0.5, 0.5, 0.5, np.nan])
    others = np.array([[0.1, 0.2, 0.3],     # best: rank 0
                       [0.5, 0.1, 0.9],     # one tie + one higher: rank 2
                       [0.5, 0.5, 0.5],     # all tied: worst, rank 3
                       [0.1, 0.2, 0.3]])    # NaN target: worst
    assert pessimistic_rank(target, others).tolist() == [0, 2, 3, 3]
    assert pessimistic_rank(np.array([0.5]), np.array([[np.nan, 0.1]])).tolist() == [1]


def test_ranking_metrics_hand_computed():
    ranks = np.array([0, 2, 4, 9, 20])
    m = ranking_metrics(ranks, ks=(1, 5, 10))
    assert m["HR@1"] == pytest.approx(1 / 5)
    assert m["HR@5"] == pytest.approx(3 / 5)
    assert m["HR@10"] == pytest.approx(4 / 5)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6)) / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 5 + 1 / 10 + 1 / 21) / 5)
    assert set(m) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR"}
    assert all(math.isnan(v) for v in ranking_metrics(np.array([], int)).values())


def test_bucket_labels():
    assert bucket_labels((1, 3, 6, 11)) == ["0", "1-2", "3-5", "6-10", ">10"]
    assert bucket_labels((2,)) == ["0-1", ">1"]
