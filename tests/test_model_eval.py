"""Leave-one-out protocol: histories, seeded negatives, popularity baseline, model ranks, cold-start buckets."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedscope_jax.data.canonical import SPLITS
from fedscope_jax.errors import FedscopeError
from fedscope_jax.eval.protocol import (EvalConfig, cold_start, eval_set, model_ranks, popularity_ranks,
                                        popularity_scores, summarize)
from fedscope_jax.model import ModelConfig, all_item_repr, encode, init_params
from model_helpers import write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("eval") / "d", users=30, n_items=(40, 50), single_domain_users=4)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_histories_match_a_per_user_reference(tiny, split):
    ds, L = tiny, 4
    es = eval_set(ds, split, L, EvalConfig(num_negatives=10))
    code = SPLITS.index(split)
    assert len(es) == int(np.sum(ds.split == code))
    for e in range(len(es)):
        u, d = es.user[e], es.domain[e]
        row = np.flatnonzero((ds.user == u) & (ds.split == code))[0]
        assert d == ds.domain[row] and es.target[e] == ds.item[row] + 1
        sel = (ds.user == u) & (ds.domain == d) & (ds.position < ds.position[row])
        hist = list(ds.item[sel][np.argsort(ds.position[sel])] + 1)
        assert es.hist_len[e] == len(hist)
        want = np.zeros(L, np.int32)
        tail = hist[-L:]
        if tail:
            want[L - len(tail):] = tail
        np.testing.assert_array_equal(es.history[e], want)
        mine = set(ds.item[(ds.user == u) & (ds.domain == d)] + 1) - {es.target[e]}
        assert set(es.seen[e]) - {0} == mine


def test_negatives_are_unseen_distinct_and_seeded(tiny):
    ds = tiny
    cfg = EvalConfig(num_negatives=20, seed=3)
    es = eval_set(ds, "test", 5, cfg)
    for e in range(len(es)):
        d, u = es.domain[e], es.user[e]
        neg = es.negatives[e]
        seen = set(ds.item[(ds.user == u) & (ds.domain == d)] + 1)
        assert len(set(neg)) == neg.size and not seen & set(neg)
        assert neg.min() >= 1 and neg.max() <= ds.n_items[d]
    again = eval_set(ds, "test", 5, cfg)
    np.testing.assert_array_equal(again.negatives, es.negatives)
    other = eval_set(ds, "test", 5, EvalConfig(num_negatives=20, seed=4))
    assert not np.array_equal(other.negatives, es.negatives)
    with pytest.raises(FedscopeError, match="eval.num_negatives"):
        eval_set(ds, "test", 5, EvalConfig(num_negatives=45))


def test_popularity_ranks_by_brute_force(tiny):
    ds = tiny
    es = eval_set(ds, "test", 5, EvalConfig(num_negatives=15))
    pop = popularity_scores(ds)
    ranks = popularity_ranks(es, pop)
    for e in range(len(es)):
        s = pop[es.domain[e]]
        t = s[es.target[e]]
        assert ranks["sampled"][e] == sum(s[c] >= t for c in es.negatives[e])
        seen = set(ds.item[(ds.user == es.user[e]) & (ds.domain == es.domain[e])] + 1)
        others = [s[i] for i in range(1, len(s)) if i not in seen]       # the unseen items compete
        assert ranks["full"][e] == sum(o >= t for o in others)


def test_model_ranks_by_brute_force_and_summaries(tiny):
    ds = tiny
    cfg = ModelConfig(dim=8, blocks=1, heads=2, max_len=5)
    ecfg = EvalConfig(num_negatives=15, buckets=(2, 4))
    es = eval_set(ds, "test", 5, ecfg)
    params = init_params(jax.random.key(0), cfg, ds.n_items)
    ranks = model_ranks(params, cfg, es, batch_size=7)          # several batches, the last one padded
    for d in range(2):
        sel = np.flatnonzero(es.domain == d)
        h = np.asarray(encode(params, cfg, d, es.history[sel]))[:, -1]
        scores = h @ np.asarray(all_item_repr(params, cfg, d)).T
        for j, e in enumerate(sel):
            t = scores[j, es.target[e]]
            seen = set(ds.item[(ds.user == es.user[e]) & (ds.domain == d)] + 1)
            neg = scores[j, es.negatives[e]]
            full = scores[j, [i for i in range(1, scores.shape[1]) if i not in seen]]
            # the jitted scores may differ from numpy's by float rounding: bound the rank on both sides
            assert np.sum(neg > t + 1e-5) <= ranks["sampled"][e] <= np.sum(neg >= t - 1e-5)
            assert np.sum(full > t + 1e-5) <= ranks["full"][e] <= np.sum(full >= t - 1e-5)
    summ = summarize(es, ranks, ds.domains, ecfg.ks)
    assert summ["sampled"]["domA"]["targets"] + summ["sampled"]["domB"]["targets"] == len(es)
    cs = cold_start(es, {"model": ranks, "popularity": popularity_ranks(es, popularity_scores(ds))}, ds.domains, ecfg)
    assert list(cs["full"]["domA"]) == ["0-1", "2-3", ">3"]
    for d in ds.domains:
        assert sum(c["targets"] for c in cs["sampled"][d].values()) == summ["sampled"][d]["targets"]
        assert set(next(iter(cs["sampled"][d].values()))) == {"targets", "model", "popularity"}
