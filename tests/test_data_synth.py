"""Synthetic generator: shape and statistics as configured, determinism, and the planted structure."""

from __future__ import annotations

import numpy as np
import pytest

from fedscope_jax.data.canonical import TEST, TRAIN, VALID, load_dataset
from fedscope_jax.data.synth import SynthConfig, generate, synthesize
from fedscope_jax.errors import FedscopeError

SMALL = SynthConfig(users=600, items=(400, 500), topics=8, seed=3)


def _row_topics(raw) -> np.ndarray:
    """The planted topic of every interaction's item (from the items' `topic` column)."""
    out = np.empty(raw.item.size, np.int64)
    for d, topics in enumerate(raw.item_extra["topic"]):
        rows = raw.domain == d
        out[rows] = np.asarray(topics)[raw.item[rows]]
    return out


def test_default_is_sized_like_abxi_food_kitchen(tmp_path):
    meta = synthesize(SynthConfig(), tmp_path / "syn")
    ds = load_dataset(tmp_path / "syn")
    assert ds.n_users == 7144 and ds.n_items == (11837, 16258)
    lengths = np.diff(ds.user_offsets())
    assert lengths.min() >= 10 and lengths.max() <= 50
    assert abs(lengths.mean() - 24.3) < 0.5                  # solved geometric rate; 7k users -> tight
    assert meta["overlap_users"] == 7144
    per_user_domain = np.zeros((ds.n_users, 2), np.int64)
    np.add.at(per_user_domain, (ds.user, ds.domain), 1)
    assert per_user_domain.min() >= 5                        # min_per_domain in each domain
    # leave-one-out: exactly one valid and one test per user, at the last two positions
    ends = ds.user_offsets()[1:]
    assert (ds.split[ends - 1] == TEST).all() and (ds.split[ends - 2] == VALID).all()
    assert int((ds.split == TRAIN).sum()) == ds.n_interactions - 2 * ds.n_users
    assert np.all(np.diff(ds.timestamp)[np.diff(ds.user) == 0] >= 0)   # chronological


def test_same_seed_same_data_other_seed_differs():
    a, b, c = generate(SMALL), generate(SMALL), generate(SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    for name in ("user", "domain", "item", "timestamp", "split"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.item.shape != c.item.shape or not np.array_equal(a.item, c.item)


def test_partial_overlap_and_single_domain_users():
    raw = generate(SynthConfig(users=2000, items=(300, 300), topics=4, overlap=0.3, seed=1))
    present = np.zeros((2000, 2), bool)
    present[raw.user, raw.domain] = True
    both = present.all(1).mean()
    assert 0.25 < both < 0.35                                 # ~30% overlapped (binomial sd ~1%)
    assert (present.sum(1) >= 1).all()


def test_topics_are_shared_across_domains_and_sticky():
    """With one-topic users (tiny concentration), each user's items in BOTH domains come from one topic."""
    cfg = SynthConfig(users=300, items=(200, 240), topics=10, concentration=1e-4, seed=7)
    raw = generate(cfg)
    item_topic = _row_topics(raw)
    distinct = [np.unique(item_topic[raw.user == u]).size for u in range(cfg.users)]
    assert np.mean(np.asarray(distinct) == 1) > 0.95
    # with a flat mixture, consecutive items share a topic at ~stickiness + (1-stickiness)/topics
    flat = generate(SynthConfig(users=1500, items=(200, 240), topics=10, concentration=100.0, stickiness=0.6,
                                seed=7))
    it = _row_topics(flat)
    same_user = np.diff(flat.user) == 0
    rate = np.mean(it[1:][same_user] == it[:-1][same_user])
    assert abs(rate - (0.6 + 0.4 / 10)) < 0.02


def test_popularity_is_zipf_within_topic():
    raw = generate(SynthConfig(users=3000, items=(100, 100), topics=2, popularity=1.0, seed=2))
    topic = np.asarray(raw.item_extra["topic"][0])
    counts = np.bincount(raw.item[raw.domain == 0], minlength=100)
    for t in range(2):
        c = np.sort(counts[topic == t])[::-1]
        # rank 1 vs rank 2 of a Zipf(1) law: ratio 2 (loose bounds for sampling noise)
        assert 1.6 < c[0] / c[1] < 2.5


@pytest.mark.parametrize("field,value", [("items", (5, 5)), ("min_per_domain", 6), ("overlap", 1.5),
                                          ("mean_length", 60.0), ("stickiness", 1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(FedscopeError, match=f"field '{field}'"):
        generate(SynthConfig(**{**SMALL.__dict__, field: value}))


def test_one_domain():
    raw = generate(SynthConfig(users=50, items=(60,), domains=("movie",), topics=3, seed=0))
    assert raw.domains == ("movie",) and (raw.domain == 0).all()


def test_row_categorical_sampler_matches_its_probabilities():
    from scipy import stats

    from fedscope_jax.data.synth import categorical_rows

    probs = np.array([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0], [0.1, 0.6, 0.3, 0.0]])
    owner = np.repeat(np.arange(3), 20000)
    draws = categorical_rows(np.random.default_rng(0), probs, owner)
    assert (draws[owner == 1] == 3).all()
    for u in (0, 2):
        counts = np.bincount(draws[owner == u], minlength=4)
        assert counts[probs[u] == 0].sum() == 0                 # zero-probability topics never drawn
        nz = probs[u] > 0
        assert stats.chisquare(counts[nz], probs[u][nz] * counts.sum()).pvalue > 1e-3


def test_like_copies_a_real_datasets_shape(tmp_path):
    from conftest import real_dataset
    from fedscope_jax.data.formats import prepare

    prepare(real_dataset("llmcdsr-food-kitchen"), tmp_path / "fk")
    real = load_dataset(tmp_path / "fk")
    cfg = SynthConfig.like(real, users=3000, seed=1)
    assert cfg.items == (8661, 27637) and cfg.domains == ("food", "kitchen") and cfg.users == 3000
    assert (cfg.min_length, cfg.max_length) == (5, 156) and abs(cfg.overlap - 9398 / 53061) < 1e-6
    synthesize(cfg, tmp_path / "syn")
    syn = load_dataset(tmp_path / "syn")
    lengths = np.diff(syn.user_offsets())
    assert lengths.min() >= 5 and lengths.max() <= 156
    assert abs(lengths.mean() - cfg.mean_length) < 0.6
    assert abs(syn.meta["overlap_users"] / 3000 - cfg.overlap) < 0.03
