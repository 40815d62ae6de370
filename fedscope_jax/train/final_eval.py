"""The final evaluation every trainer reports: both splits, both protocols, popularity anchor, cold start, long tail.

One function per step so trainers that rank targets with several models (local-only training: each user by its
own client's model) share the same summary: `eval_sets` builds the targets once, `metrics_from_ranks` turns
ranks into the summary sections, `final_metrics` does both for one parameter set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedscope_jax.data.canonical import CanonicalDataset
from fedscope_jax.eval.protocol import (EvalSet, cold_start, eval_set, long_tail, model_ranks, popularity_ranks,
                                        popularity_scores, summarize)
from fedscope_jax.model import Params, Semantic
from fedscope_jax.train.config import RunConfig

SPLITS = ("valid", "test")


def eval_sets(ds: CanonicalDataset, cfg: RunConfig) -> dict[str, EvalSet]:
    """{"valid": EvalSet, "test": EvalSet} with the run's max_len and eval settings (seeded negatives)."""
    return {split: eval_set(ds, split, cfg.model.max_len, cfg.eval) for split in SPLITS}


def protocol_facts(cfg: RunConfig) -> dict[str, Any]:
    """What a reader needs to compare numbers across runs."""
    ec = cfg.eval
    peer = ec.protocol == "feddcsr"
    return {"name": ec.protocol, "sampled_negatives": ec.num_negatives, "negatives_seed": ec.seed,
            "ties": "count for the target (rank = 1 + candidates strictly higher)" if peer else "pessimistic",
            "history": f"in-domain, last {cfg.model.max_len} items (model.max_len)",
            "candidates": ("every item of the target's domain but the target; sampled ones drawn with replacement"
                           if peer else "items the user never interacted with in the target's domain"),
            "long_tail_head": f"the ceil({ec.head_share} * N) items of a domain with the most train interactions"}


def metrics_from_ranks(ds: CanonicalDataset, cfg: RunConfig, sets: dict[str, EvalSet],
                       ranks: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Summary sections from model ranks {split: {protocol: int [E]}} on `sets` (same target order).

    Keys: valid, valid_full, test, test_full ({domain: metrics + "targets"}), baselines (popularity on the
    same candidates), cold_start (by in-domain history length, model and popularity), long_tail (test targets
    by the target item's train popularity), protocol.
    """
    ks = cfg.eval.ks
    valid = summarize(sets["valid"], ranks["valid"], ds.domains, ks)
    test = summarize(sets["test"], ranks["test"], ds.domains, ks)
    pop_test = popularity_ranks(sets["test"], popularity_scores(ds))
    pop = summarize(sets["test"], pop_test, ds.domains, ks)
    return {
        "test": test["sampled"], "test_full": test["full"],
        "valid": valid["sampled"], "valid_full": valid["full"],
        "baselines": {"popularity": pop["sampled"], "popularity_full": pop["full"]},
        "cold_start": cold_start(sets["test"], {"model": ranks["test"], "popularity": pop_test}, ds.domains,
                                 cfg.eval),
        "long_tail": long_tail(sets["test"], ranks["test"], ds, cfg.eval),
        "protocol": protocol_facts(cfg),
    }


def final_metrics(params: Params, ds: CanonicalDataset, cfg: RunConfig, semantic: Semantic = None, *,
                  sets: dict[str, EvalSet] | None = None) -> dict[str, Any]:
    """`metrics_from_ranks` of one model's parameters on the valid and test targets (`sets`: prebuilt targets)."""
    sets = eval_sets(ds, cfg) if sets is None else sets
    ranks = {split: model_ranks(params, cfg.model, sets[split], semantic, cfg.eval.batch_size) for split in SPLITS}
    return metrics_from_ranks(ds, cfg, sets, ranks)


__all__ = ["SPLITS", "eval_sets", "final_metrics", "metrics_from_ranks", "protocol_facts"]
