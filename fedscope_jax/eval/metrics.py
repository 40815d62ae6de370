"""Ranking metrics from 0-based ranks (rank = how many candidates score at least as high as the target).

Ties are counted pessimistically: a candidate with the same score as the target ranks above it, so a model
that scores everything equal gets the worst rank, never a lucky one. A NaN score also counts against the target.
`strict_rank` is the FedDCSR protocol's rule (ties count for the target), for comparison with that peer only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pessimistic_rank(target_score: np.ndarray, other_scores: np.ndarray) -> np.ndarray:
    """int [E]: number of other candidates [E, M] not strictly below the target's score [E] (NaN counts)."""
    target_score = np.asarray(target_score)
    return np.sum(~(np.asarray(other_scores) < target_score[:, None]), axis=1)


def strict_rank(target_score: np.ndarray, other_scores: np.ndarray) -> np.ndarray:
    """int [E]: number of other candidates [E, M] strictly above the target's score [E], ties counting for the
    target (the FedDCSR protocol's rank - 1; NaN still counts against)."""
    target_score = np.asarray(target_score)
    return np.sum(~(np.asarray(other_scores) <= target_score[:, None]), axis=1)


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """HR@k for every k, NDCG@k for every k > 1, and MRR, averaged over targets (NaN when there are none)."""
    ranks = np.asarray(ranks, np.float64)
    out: dict[str, float] = {}
    if ranks.size == 0:
        return {**{f"HR@{k}": float("nan") for k in ks}, **{f"NDCG@{k}": float("nan") for k in ks if k > 1},
                "MRR": float("nan")}
    for k in ks:
        out[f"HR@{k}"] = float(np.mean(ranks < k))
    for k in ks:
        if k > 1:
            out[f"NDCG@{k}"] = float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)))
    out["MRR"] = float(np.mean(1.0 / (ranks + 1.0)))
    return out
