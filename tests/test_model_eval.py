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


@pytest.mark.parametrize("item_bias", [False, True])
def test_model_ranks_by_brute_force_and_summaries(tiny, item_bias):
    """Ranks against numpy scores; with model.item_bias each item's bias (here drawn at scale 3, so it
    reorders items) is added to its score."""
    ds = tiny
    cfg = ModelConfig(dim=8, blocks=1, heads=2, max_len=5, item_bias=item_bias)
    ecfg = EvalConfig(num_negatives=15, buckets=(2, 4))
    es = eval_set(ds, "test", 5, ecfg)
    params = init_params(jax.random.key(0), cfg, ds.n_items)
    biases = {}
    for d in range(2):
        tower = params[f"domain_{d}"]
        assert ("item_bias" in tower) == item_bias
        if item_bias:
            assert tower["item_bias"].shape == (ds.n_items[d] + 1, 1) and not np.any(tower["item_bias"])
            tower["item_bias"] = jax.random.normal(jax.random.key(d), tower["item_bias"].shape) * 3
        biases[d] = np.asarray(tower["item_bias"])[:, 0] if item_bias else 0.0
    ranks = model_ranks(params, cfg, es, batch_size=7)          # several batches, the last one padded
    for d in range(2):
        sel = np.flatnonzero(es.domain == d)
        h = np.asarray(encode(params, cfg, d, es.history[sel]))[:, -1]
        scores = h @ np.asarray(all_item_repr(params, cfg, d)).T + biases[d]
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


def _hand_dataset(path):
    """Domain A (10 items), train counts: item 0 x3, items 1 and 2 x2, items 3, 4, 6, 7, 8 x1; domain B (8 items)."""
    from fedscope_jax.data.canonical import TEST, TRAIN, VALID, DatasetWriter, items_table, load_dataset

    users = {0: ("A", [0, 1, 2], 3, 5), 1: ("A", [0, 1, 4], 6, 2), 2: ("A", [0, 2, 3], 7, 1),
             3: ("A", [6, 7, 8], 9, 0), 4: ("B", [0, 1], 2, 3)}
    cols = {k: [] for k in ("user", "domain", "item", "position", "split")}
    for u, (dom, train, valid, test) in users.items():
        items = [*train, valid, test]
        cols["user"] += [u] * len(items)
        cols["domain"] += [0 if dom == "A" else 1] * len(items)
        cols["item"] += items
        cols["position"] += list(range(len(items)))
        cols["split"] += [TRAIN] * len(train) + [VALID, TEST]
    path.mkdir(parents=True)
    w = DatasetWriter(path, "hand", "test", ("A", "B"), (10, 8))
    w.add(*(np.asarray(cols[k]) for k in ("user", "domain", "item", "position", "split")))
    dom = np.array([0] * 10 + [1] * 8)
    ids = np.concatenate([np.arange(10), np.arange(8)])
    w.close(items_table(("A", "B"), dom, ids, [f"s{d}{i}" for d, i in zip(dom, ids)], [None] * 18))
    return load_dataset(path)


def test_long_tail_split_hand_computed(tmp_path):
    from fedscope_jax.eval.protocol import head_items, long_tail

    ds = _hand_dataset(tmp_path / "hand")
    heads = head_items(ds, 0.2)
    # A: ceil(0.2 * 10) = 2 head items: item 0 (3) and item 1 (2; tied with item 2, the smaller id wins)
    assert np.flatnonzero(heads[0]).tolist() == [1, 2]                  # shifted ids
    assert np.flatnonzero(heads[1]).tolist() == [1, 2]                  # B: ceil(1.6) = 2, items 0 and 1
    cfg = EvalConfig(num_negatives=3, head_share=0.2)
    es = eval_set(ds, "test", 5, cfg)
    assert es.user.tolist() == [0, 1, 2, 3, 4] and es.target.tolist() == [6, 3, 2, 1, 4]
    ranks = {"sampled": np.array([4, 0, 11, 2, 7]), "full": np.array([50, 3, 0, 9, 1])}
    lt = long_tail(es, ranks, ds, cfg)
    a = lt["sampled"]["A"]
    assert a["targets"] == {"head": 2, "tail": 2} and a["items"] == {"head": 2, "tail": 8}
    assert a["head_train_share"] == pytest.approx(5 / 12)
    # head: users 2 (rank 11) and 3 (rank 2); tail: users 0 (rank 4) and 1 (rank 0)
    assert a["head"]["HR@10"] == 0.5 and a["head"]["NDCG@10"] == pytest.approx(0.5 / 2)
    assert a["head"]["MRR"] == pytest.approx((1 / 12 + 1 / 3) / 2)
    assert a["tail"]["HR@1"] == 0.5 and a["tail"]["HR@10"] == 1.0
    assert a["tail"]["NDCG@10"] == pytest.approx((1 / np.log2(6) + 1) / 2)
    b = lt["full"]["B"]
    assert b["targets"] == {"head": 0, "tail": 1} and np.isnan(b["head"]["HR@10"])
    assert b["tail"]["MRR"] == pytest.approx(1 / 2) and b["head_train_share"] == 1.0
    assert lt["full"]["A"]["head"]["HR@1"] == 0.5                       # user 2's full rank is 0
    with pytest.raises(FedscopeError, match="eval.head_share"):
        EvalConfig(head_share=1.0)


def test_final_metrics_sections(tiny):
    from fedscope_jax.train.config import RunConfig
    from fedscope_jax.train.final_eval import final_metrics

    cfg = RunConfig(model=ModelConfig(dim=8, blocks=1, heads=2, max_len=5),
                    eval=EvalConfig(num_negatives=15, buckets=(2, 4)))
    params = init_params(jax.random.key(0), cfg.model, tiny.n_items)
    m = final_metrics(params, tiny, cfg)
    assert {"valid", "valid_full", "test", "test_full", "baselines", "cold_start", "long_tail",
            "protocol"} <= set(m)
    es = eval_set(tiny, "test", 5, cfg.eval)
    ranks = model_ranks(params, cfg.model, es)
    assert m["test"] == summarize(es, ranks, tiny.domains, cfg.eval.ks)["sampled"]
    for proto, key in (("sampled", "test"), ("full", "test_full")):
        for d in tiny.domains:
            lt = m["long_tail"][proto][d]
            assert lt["targets"]["head"] + lt["targets"]["tail"] == m[key][d]["targets"]
            # the pooled metric is the targets-weighted mean of the head and tail ones
            parts = [(lt[g]["HR@10"], lt["targets"][g]) for g in ("head", "tail") if lt["targets"][g]]
            assert sum(v * n for v, n in parts) / m[key][d]["targets"] == pytest.approx(m[key][d]["HR@10"])


def test_feddcsr_protocol_draws_with_replacement_and_counts_ties_for_the_target(tiny):
    """eval.protocol=feddcsr (the peer's code): negatives uniform with replacement over the domain but the
    target (the user's other items included), full ranking over every item but the target, rank = candidates
    strictly above; the fedscope protocol counts ties against the target."""
    ds = tiny
    es = eval_set(ds, "test", 5, EvalConfig(num_negatives=300, seed=1, protocol="feddcsr"))
    assert es.strict and es.seen.shape == (len(es), 1) and not es.seen.any()
    drawn = {d: set() for d in range(2)}
    drew_seen = False
    for e in range(len(es)):
        d, u, neg = es.domain[e], es.user[e], es.negatives[e]
        assert es.target[e] not in neg and neg.min() >= 1 and neg.max() <= ds.n_items[d]
        assert len(set(neg)) < neg.size                       # 300 draws over <= 49 items: with replacement
        drew_seen |= bool(set(ds.item[(ds.user == u) & (ds.domain == d)] + 1) - {es.target[e]} & set(neg))
        drawn[d] |= set(neg)
    assert drew_seen and all(drawn[d] == set(range(1, ds.n_items[d] + 1)) for d in range(2))
    again = eval_set(ds, "test", 5, EvalConfig(num_negatives=300, seed=1, protocol="feddcsr"))
    np.testing.assert_array_equal(again.negatives, es.negatives)
    pop = popularity_scores(ds)
    ranks = popularity_ranks(es, pop)
    for e in range(len(es)):
        s = pop[es.domain[e]]
        t = s[es.target[e]]
        assert ranks["sampled"][e] == sum(s[c] > t for c in es.negatives[e])
        assert ranks["full"][e] == sum(s[i] > t for i in range(1, len(s)) if i != es.target[e])
    # a model that scores every item alike: the peer's rule ranks each target first, ours last
    cfg = ModelConfig(dim=8, blocks=1, heads=2, max_len=5)
    flat = jax.tree.map(np.zeros_like, init_params(jax.random.key(0), cfg, ds.n_items))
    peer = model_ranks(flat, cfg, es, batch_size=16)
    assert not peer["sampled"].any() and not peer["full"].any()
    ours_es = eval_set(ds, "test", 5, EvalConfig(num_negatives=10))
    ours = model_ranks(flat, cfg, ours_es, batch_size=16)
    assert (ours["sampled"] == 10).all()
    with pytest.raises(FedscopeError, match="eval.protocol='peer'; expected one of fedscope, feddcsr"):
        EvalConfig(protocol="peer")
