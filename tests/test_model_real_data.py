"""The protocol on abxi-food-kitchen (prepared from ../shared/data with the project's reader, into tmp)."""

from __future__ import annotations

import numpy as np
import pytest

from fedscope_jax.data.batching import train_sequences
from fedscope_jax.data.canonical import load_dataset
from fedscope_jax.data.formats import prepare
from fedscope_jax.eval.protocol import EvalConfig, eval_set, popularity_ranks, popularity_scores, summarize
from conftest import real_dataset


@pytest.fixture(scope="module")
def afk(tmp_path_factory):
    src = real_dataset("abxi-food-kitchen")
    out = tmp_path_factory.mktemp("afk") / "afk"
    prepare(src, out)
    return load_dataset(out)


def test_abxi_targets_histories_and_negatives(afk):
    ds = afk
    test = eval_set(ds, "test", 50, EvalConfig())
    valid = eval_set(ds, "valid", 50, EvalConfig())
    # PROVENANCE.md: one test and one valid target per user; 4,725 / 4,307 of them in domain B (kitchen)
    assert len(test) == len(valid) == 7144
    assert int(np.sum(test.domain == 1)) == 4725 and int(np.sum(valid.domain == 1)) == 4307
    assert test.negatives.shape == (7144, 999)
    # negatives: distinct, in range, never an item the user interacted with in that domain (spot check)
    rng = np.random.default_rng(0)
    for e in rng.choice(len(test), 200, replace=False):
        seen = set(ds.item[(ds.user == test.user[e]) & (ds.domain == test.domain[e])] + 1)
        neg = test.negatives[e]
        assert len(set(neg)) == 999 and not seen & set(neg) and neg.max() <= ds.n_items[test.domain[e]]
    # the test history ends with the valid target whenever both are in the same domain
    same = test.domain == valid.domain
    assert np.array_equal(test.history[same, -1], valid.target[same])
    seqs = train_sequences(ds, 50)
    assert len(seqs.user) == 7144 and int((seqs.target > 0).sum()) == 144972
    pop = summarize(test, popularity_ranks(test, popularity_scores(ds)), ds.domains, (1, 5, 10))
    # the sanity anchor is far from chance (HR@10 = 1% with 999 random negatives) and below 1
    for dom in ds.domains:
        assert 0.02 < pop["sampled"][dom]["HR@10"] < 0.5
