"""The vectorized round agrees with the sequential reference; chunking, padding and local vocabularies
change nothing; clipping, noise and NaN exclusion behave per client."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedscope_jax.engine import reference_model as rm
from fedscope_jax.engine.aggregate import accumulate_chunk, finalize, zeros_accumulator
from fedscope_jax.engine.client import ClientConfig, ClientData, client_update
from fedscope_jax.engine.cohort import (BucketPlan, ClientShard, best_boundaries, bucket_capacities, build_cohorts,
                                        localize_batch, nice_ceil, plan_buckets)
from fedscope_jax.engine.round import EngineConfig, SequentialRunner, make_round_fn
from fedscope_jax.engine.sampling import sample_clients
from fedscope_jax.engine.server import init_server_state, server_optimizer
from fedscope_jax.errors import FedscopeError

CFG = rm.ReferenceConfig(n_items_a=40, n_items_b=30, dim=8, max_len=6)
ROWS = {"a": CFG.n_items_a + 1, "b": CFG.n_items_b + 1}
FIELDS, TABLES = rm.FIELDS, rm.TABLES
SIZES = (3, 9, 5, 20, 2, 7)


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def dense_shards():
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(SIZES):
        domains = "a" if i == 4 else "ab"  # one client holds only domain A
        out.append(ClientShard(rm.synthetic_user_batches(rng, n, CFG, batch_size=4, n_neg=3, domains=domains)))
    return out


@pytest.fixture(scope="module")
def sparse_shards(dense_shards):
    return [ClientShard(*localize_batch(s.batch, FIELDS)) for s in dense_shards]


def _client_cfg(sparse: bool) -> ClientConfig:
    return ClientConfig(loss_fn=functools.partial(rm.loss_fn, config=CFG), optimizer=optax.adam(1e-2),
                        local_epochs=2, sparse_tables=TABLES if sparse else ())


def _run(fn, cohorts, rounds=2, opt=None):
    opt = opt or server_optimizer("fedadam", 0.05)
    state = init_server_state(rm.init_params(jax.random.key(0), CFG), opt)
    for _ in range(rounds):
        state, metrics = fn(state, cohorts, jax.random.key(7))
    return state, metrics


@pytest.fixture(scope="module")
def privacy():
    n = len(SIZES)
    return np.full(n, 0.5, np.float32), np.full(n, 0.3, np.float32)


@pytest.fixture(scope="module")
def reference_round(sparse_shards, privacy):
    """Sequential reference: fedadam, 2 local epochs, clipping + per-client noise, local vocabularies."""
    plan = plan_buckets(sparse_shards, max_buckets=2)
    cohorts, _ = build_cohorts(sparse_shards, range(len(SIZES)), plan, ROWS, clip=privacy[0],
                               noise_multiplier=privacy[1], multiple=1, nice=False)
    ecfg = EngineConfig(chunk_size=1, noise_mode="per_client")
    opt = server_optimizer("fedadam", 0.05)
    return _run(SequentialRunner(_client_cfg(True), opt, ecfg), cohorts, opt=opt)


def test_vmapped_chunked_padded_equals_sequential(sparse_shards, privacy, reference_round):
    ref_state, ref_metrics = reference_round
    plan = plan_buckets(sparse_shards, max_buckets=2)
    assert plan.steps == (2, 5)
    opt = server_optimizer("fedadam", 0.05)
    for chunk in (1, 4):  # chunk 4: vmap over 4 clients, cohorts padded with weight-0 clients
        cohorts, pad = build_cohorts(sparse_shards, range(len(SIZES)), plan, ROWS, clip=privacy[0],
                                     noise_multiplier=privacy[1], multiple=chunk)
        fn = make_round_fn(_client_cfg(True), opt, EngineConfig(chunk_size=chunk, noise_mode="per_client"))
        state, metrics = _run(fn, cohorts, opt=opt)
        assert _max_diff(state.params, ref_state.params) < 1e-5
        assert int(state.round) == 2
        np.testing.assert_allclose(float(metrics.update_norm), float(ref_metrics.update_norm), rtol=1e-5)
        ids = np.concatenate([np.asarray(r.client_id) for r in metrics.reports])
        norms = np.concatenate([np.asarray(r.norm) for r in metrics.reports])
        ref_norms = dict(zip(np.concatenate([np.asarray(r.client_id) for r in ref_metrics.reports]),
                             np.concatenate([np.asarray(r.norm) for r in ref_metrics.reports])))
        for cid, norm in zip(ids, norms):
            if cid >= 0:
                np.testing.assert_allclose(norm, ref_norms[cid], rtol=1e-4)
        factors = np.concatenate([np.asarray(r.clip_factor) for r in metrics.reports])[ids >= 0]
        np.testing.assert_allclose(factors, np.minimum(1.0, 0.5 / norms[ids >= 0]), rtol=1e-5)
        assert np.sum(factors < 1.0) >= 4  # clipping is active in this test
    assert pad.slot_steps > pad.real_steps  # chunk 4 padded clients: the waste is counted


def test_secure_aggregation_round_equals_its_sequential_oracle(dense_shards, privacy):
    """With secure aggregation (each chunk one secagg group, padding rows undelivered), the vmapped round and
    the sequential runner (clients trained one at a time, summed securely over the same chunks) agree; so does
    the aggregation error each reports."""
    plan = plan_buckets(dense_shards, max_buckets=2)
    cohorts, _ = build_cohorts(dense_shards, range(len(SIZES)), plan, ROWS, clip=privacy[0],
                               noise_multiplier=privacy[1], multiple=4)   # padded rows in the secagg groups
    assert any(np.any(np.asarray(c.weight) == 0) for c in cohorts)
    opt = server_optimizer("fedadam", 0.05)
    ecfg = EngineConfig(chunk_size=4, noise_mode="per_client", secagg_bound=4.0, secagg_neighbors=2)
    ref_state, ref_metrics = _run(SequentialRunner(_client_cfg(False), opt, ecfg), cohorts, opt=opt)
    state, metrics = _run(make_round_fn(_client_cfg(False), opt, ecfg, donate=False), cohorts, opt=opt)
    assert _max_diff(state.params, ref_state.params) < 1e-5
    assert float(metrics.secagg_error) == pytest.approx(float(ref_metrics.secagg_error), rel=1e-3, abs=1e-6)
    assert 0 < float(ref_metrics.secagg_error) < 1e-2      # quantized: not the plain sum, but close to it
    plain = _run(make_round_fn(_client_cfg(False), opt, EngineConfig(chunk_size=4, noise_mode="per_client")),
                 cohorts, opt=opt)[0]
    assert 0 < _max_diff(plain.params, ref_state.params) < 1e-1   # the oracle did aggregate securely


def test_extra_step_padding_and_one_bucket_change_nothing(sparse_shards, privacy, reference_round):
    ref_state, _ = reference_round
    plan = plan_buckets(sparse_shards, max_buckets=1)  # everything padded to 5 steps, bigger vocabularies
    assert plan.steps == (5,)
    cohorts, pad = build_cohorts(sparse_shards, range(len(SIZES)), plan, ROWS, clip=privacy[0],
                                 noise_multiplier=privacy[1], multiple=2)
    assert pad.real_steps == sum(s.n_steps for s in sparse_shards) and pad.slot_steps == 6 * 5
    opt = server_optimizer("fedadam", 0.05)
    fn = make_round_fn(_client_cfg(True), opt, EngineConfig(chunk_size=2, noise_mode="per_client"))
    state, _ = _run(fn, cohorts, opt=opt)
    assert _max_diff(state.params, ref_state.params) < 1e-5


@pytest.mark.parametrize("capacity", [(1, 2), (0, 1), (4, 4)])
def test_fixed_bucket_slots_change_nothing(sparse_shards, privacy, reference_round, capacity):
    """Fixed slots per bucket: clients overflowing a bucket move up, the top bucket grows, empty slots are
    weight-0 padding; the round equals the sequential reference either way."""
    ref_state, _ = reference_round
    plan = plan_buckets(sparse_shards, max_buckets=2)
    small = sum(plan.bucket_of(s.n_steps) == 0 for s in sparse_shards)
    assert small == 4
    cohorts, pad = build_cohorts(sparse_shards, range(len(SIZES)), plan, ROWS, clip=privacy[0],
                                 noise_multiplier=privacy[1], capacity=capacity)
    rows = [len(c.client_id) for c in cohorts]
    top = max(capacity[1], nice_ceil(6 - min(capacity[0], small), 1))   # grown when it overflows
    assert rows == ([capacity[0]] if capacity[0] else []) + [top]
    assert sorted(np.concatenate([np.asarray(c.client_id) for c in cohorts]).tolist()) == (
        [-1] * (sum(rows) - 6) + list(range(6)))
    assert pad.real_steps == sum(s.n_steps for s in sparse_shards)
    opt = server_optimizer("fedadam", 0.05)
    fn = make_round_fn(_client_cfg(True), opt, EngineConfig(chunk_size=1, noise_mode="per_client"))
    state, _ = _run(fn, cohorts, opt=opt)
    assert _max_diff(state.params, ref_state.params) < 1e-5


def test_fixed_bucket_slots_keep_the_shapes_of_sampled_rounds(sparse_shards):
    """Sampled subsets of clients give the same cohort shapes round after round (one compiled program)."""
    plan = plan_buckets(sparse_shards, max_buckets=2)
    steps = [s.n_steps for s in sparse_shards]
    capacity = bucket_capacities(plan, steps, len(SIZES), "fraction", 0.5)
    shapes = set()
    for r in range(12):
        ids = sample_clients(0, r, len(SIZES), "fraction", 0.5)
        cohorts, _ = build_cohorts(sparse_shards, ids, plan, ROWS, capacity=capacity)
        shapes.add(tuple((c.client_id.shape, tuple(v.shape for v in c.data.vocab.values())) for c in cohorts))
    assert len(shapes) == 1
    # without fixed slots the per-bucket counts of these rounds give several shapes
    loose = {tuple(c.client_id.shape for c in build_cohorts(sparse_shards, sample_clients(0, r, 6, "fraction",
                                                                                            0.5), plan, ROWS)[0])
             for r in range(12)}
    assert len(loose) > 1


def test_bucket_capacities():
    plan = BucketPlan((2, 5, 9), ({}, {}, {}))
    steps = [1] * 30 + [4] * 15 + [9] * 5          # 30 / 15 / 5 trainable clients of 60
    # everybody every round: exactly each bucket's clients
    assert bucket_capacities(plan, steps, 60, "fraction", 1.0) == (30, 15, 5)
    assert bucket_capacities(plan, steps, 50, "poisson", 1.0) == (30, 15, 5)
    caps = bucket_capacities(plan, steps, 60, "fraction", 0.2)   # 12 sampled, ~10 of them trainable
    assert all(c >= 0 for c in caps) and sum(caps) <= 12
    tail = stats.hypergeom(60, 5, 12)       # clients sampled from the top bucket: slots at its 95% quantile
    assert caps[2] == int(tail.ppf(0.95))
    assert bucket_capacities(plan, steps, 60, "poisson", 0.2)[2] == int(stats.binom(5, 0.2).ppf(0.95))
    loose = bucket_capacities(plan, steps, 60, "fraction", 0.2, quantile=0.5)
    assert loose[2] <= caps[2] and sum(loose) <= sum(caps)
    with pytest.raises(FedscopeError, match="quantile"):
        bucket_capacities(plan, steps, 60, "fraction", 0.2, quantile=0.0)


def test_local_vocabulary_equals_dense_tables(dense_shards, sparse_shards):
    opt = server_optimizer("fedavg")
    results = []
    for shards, sparse in ((dense_shards, False), (sparse_shards, True)):
        plan = plan_buckets(shards, max_buckets=2)
        cohorts, _ = build_cohorts(shards, range(len(SIZES)), plan, ROWS, clip=np.full(6, 0.5, np.float32))
        fn = make_round_fn(_client_cfg(sparse), opt, EngineConfig(chunk_size=2))
        results.append(_run(fn, cohorts, rounds=1, opt=opt)[0])
    assert _max_diff(results[0].params, results[1].params) < 1e-5
    # the untouched rows of the tables did not move
    touched = np.unique(np.concatenate([s.vocab["a"] for s in sparse_shards]))
    untouched = np.setdiff1d(np.arange(ROWS["a"]), touched)
    start = rm.init_params(jax.random.key(0), CFG)["item_emb_a"]
    if len(untouched):
        np.testing.assert_array_equal(np.asarray(results[1].params["item_emb_a"])[untouched],
                                      np.asarray(start)[untouched])


# ---- clipping, noise, NaN on a small linear model (fast to compile) --------------------------------------

def _linear_loss(params, batch, key):
    del key
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2) * batch["scale"], {}


def _linear_shards(scales, steps=(2, 3, 1, 2)):
    rng = np.random.default_rng(1)
    out = []
    for scale, s in zip(scales, steps):
        x = rng.normal(size=(s, 4, 3)).astype(np.float32)
        y = rng.normal(size=(s, 4)).astype(np.float32)
        out.append(ClientShard({"x": x, "y": y, "scale": np.full((s,), scale, np.float32)}))
    return out


LIN_PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(())}


def _linear_round(shards, ids, clip=None, chunk=2, opt_name="fedavg"):
    plan = plan_buckets(shards, max_buckets=2)
    cohorts, _ = build_cohorts(shards, ids, plan, {}, clip=clip, multiple=chunk)
    opt = server_optimizer(opt_name)
    cfg = ClientConfig(loss_fn=_linear_loss, optimizer=optax.sgd(0.1))
    fn = make_round_fn(cfg, opt, EngineConfig(chunk_size=chunk), donate=False)
    return fn(init_server_state(LIN_PARAMS, opt), cohorts, jax.random.key(0))


def test_clipping_bounds_each_client():
    shards = _linear_shards([1.0, 1e6, 1.0, 1.0])  # client 1 has a huge update
    clip = np.array([0.1, 0.1, 0.1, 0.1], np.float32)
    state, metrics = _linear_round(shards, [1], clip=clip[:1])
    # FedAvg lr 1 with one client: the global change is that client's clipped update.
    assert float(optax.tree.norm(state.params)) == pytest.approx(0.1, rel=1e-5)
    report = metrics.reports[0]
    assert float(report.norm[0]) > 1e3 and float(report.clip_factor[0]) < 1e-3
    # with all four clients the mean update is at most the mean of the bounds
    state, metrics = _linear_round(shards, range(4), clip=clip)
    assert float(optax.tree.norm(state.params)) <= 0.1 + 1e-6


def test_nan_client_is_excluded_and_reported():
    good = _linear_shards([1.0, 1.0, 1.0, 1.0])
    bad = list(good)
    batch = dict(bad[2].batch)
    batch["x"] = batch["x"].copy()
    batch["x"][0, 0, 0] = np.nan
    bad[2] = ClientShard(batch)
    state_bad, metrics = _linear_round(bad, range(4))
    state_ref, _ = _linear_round(good, [0, 1, 3])
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state_bad.params))
    assert _max_diff(state_bad.params, state_ref.params) < 1e-6
    ids = np.concatenate([np.asarray(r.client_id) for r in metrics.reports])
    included = np.concatenate([np.asarray(r.included) for r in metrics.reports])
    assert not included[ids == 2].any() and included[(ids >= 0) & (ids != 2)].all()
    assert float(metrics.weight_sum) == 3.0


def test_noise_has_the_right_std_per_client_and_summed():
    params = {"w": jnp.zeros((4000,))}
    deltas = {"w": jnp.zeros((3, 4000))}
    weight = jnp.array([1.0, 2.0, 1.0])
    clip = jnp.array([0.5, 1.0, 2.0])
    z = jnp.array([1.0, 0.5, 0.25])
    key = jax.random.key(3)
    zeros3 = jnp.zeros(3)
    ids = jnp.arange(3, dtype=jnp.int32)
    expected = float(np.sqrt(np.sum((np.array([1, 2, 1]) * np.array([0.5, 0.5, 0.5])) ** 2)) / 4.0)
    samples = {}
    for mode in ("per_client", "sum"):
        acc, _ = accumulate_chunk(zeros_accumulator(params), deltas, zeros3, zeros3, {}, ids, weight, clip, z,
                                  key, (), mode)
        mean, std = finalize(acc, key, mode)
        assert float(std) == pytest.approx(expected, rel=1e-6)
        samples[mode] = np.asarray(mean["w"])
        assert stats.kstest(samples[mode] / expected, "norm").pvalue > 1e-3
        assert np.std(samples[mode]) == pytest.approx(expected, rel=0.05)
    # one client alone: its noise has std z*C exactly, and a different client id gives independent noise
    acc, _ = accumulate_chunk(zeros_accumulator(params), {"w": deltas["w"][:1]}, zeros3[:1], zeros3[:1], {},
                              ids[:1], weight[:1], clip[:1], z[:1], key, (), "per_client")
    single = np.asarray(finalize(acc, key, "per_client")[0]["w"])
    assert np.std(single) == pytest.approx(0.5, rel=0.05)
    assert stats.kstest(samples["per_client"] / expected, samples["sum"] / expected).pvalue > 1e-3
    assert abs(np.corrcoef(samples["per_client"], samples["sum"])[0, 1]) < 0.1
    # z = 0 with C = inf: no noise at all
    acc, _ = accumulate_chunk(zeros_accumulator(params), deltas, zeros3, zeros3, {}, ids, weight,
                              jnp.full(3, jnp.inf), jnp.zeros(3), key, (), "per_client")
    assert float(jnp.max(jnp.abs(finalize(acc, key, "per_client")[0]["w"]))) == 0.0


def test_noise_without_finite_clip_is_refused():
    shards = _linear_shards([1.0, 1.0, 1.0, 1.0])
    plan = plan_buckets(shards)
    with pytest.raises(FedscopeError, match="noise_multiplier"):
        build_cohorts(shards, range(4), plan, {}, noise_multiplier=np.ones(4, np.float32))


def test_sampling_rate_is_honoured_and_seeded():
    n, q, rounds = 200, 0.1, 200
    counts = np.array([len(sample_clients(5, r, n, "poisson", q)) for r in range(rounds)])
    # total participations ~ Binomial(n * rounds, q): within 4 standard deviations
    total, mean = counts.sum(), n * rounds * q
    assert abs(total - mean) < 4 * np.sqrt(mean * (1 - q))
    assert counts.std() > 0  # cohort size varies under Poisson sampling
    np.testing.assert_array_equal(sample_clients(5, 3, n, "poisson", q), sample_clients(5, 3, n, "poisson", q))
    assert not np.array_equal(sample_clients(5, 3, n, "poisson", q), sample_clients(5, 4, n, "poisson", q))
    fixed = [sample_clients(1, r, n, "fraction", 0.25) for r in range(20)]
    assert all(len(f) == 50 and len(np.unique(f)) == 50 for f in fixed)
    hits = np.bincount(np.concatenate(fixed), minlength=n)
    assert hits.sum() == 1000 and hits.max() < 20
    with pytest.raises(FedscopeError, match="rate"):
        sample_clients(0, 0, n, "poisson", 0.0)


def test_bucket_plan_is_optimal_and_padding_small():
    rng = np.random.default_rng(0)
    sizes = np.maximum(1, (rng.pareto(1.2, size=60) * 3).astype(int))[:60]
    best = best_boundaries(sizes, 3)
    cost = lambda bounds: sum(min(b for b in bounds if b >= s) for s in sizes)  # noqa: E731
    values = np.unique(sizes)
    brute = min(cost(sorted({int(a), int(b), int(values[-1])})) for a in values for b in values)
    assert cost(best) == brute and len(best) <= 3
    assert cost(best) <= cost([int(values[-1])])
    assert [nice_ceil(n, 4) for n in (1, 5, 9, 13, 17, 25, 33)] == [4, 8, 12, 16, 24, 32, 48]


def test_padding_steps_are_skipped_outside_vmap():
    """A client trained on its own (a chunk of one: skip_padding) does not compute its padding steps; vmapped,
    every step is computed and the padding masked, with the same delta. Counted by a callback in the loss: 2
    real steps of 5."""
    calls = []

    def loss(params, batch, key):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    cfg = ClientConfig(loss_fn=loss, optimizer=optax.sgd(0.1))
    params = {"w": jnp.ones((3,))}
    mask = np.array([True, True, False, False, False])
    data = ClientData({"x": np.ones((5, 4, 3), np.float32), "y": np.zeros((5, 4), np.float32)}, mask, {})
    one = jax.jit(lambda p, d: client_update(p, d, jax.random.key(0), cfg, skip_padding=True))
    delta, stats = one(params, data)
    jax.effects_barrier()
    assert len(calls) == 2 and int(stats.steps) == 2
    calls.clear()
    both = jax.tree.map(lambda x: np.stack([x, x]), data)
    vmapped = jax.jit(jax.vmap(lambda d: client_update(params, d, jax.random.key(0), cfg)))
    deltas, _ = vmapped(both)
    jax.effects_barrier()
    assert len(calls) == 5   # a callback without arguments runs once per vmapped step: every slot is computed
    np.testing.assert_allclose(np.asarray(deltas["w"][0]), np.asarray(delta["w"]), rtol=1e-6)


@pytest.mark.parametrize("config_chunk", [0, 1])
def test_sweep_at_a_client_chunk_of_one_skips_padding_steps(config_chunk):
    """The sweep program shares the cohorts' data over its configs, so a client's step mask is not batched and
    a chunk of one client keeps its padding steps skipped: 8 real steps of 12 slots per config. Counted by a
    callback in the loss (once per vmapped step: configs vmapped, or once per config in a loop)."""
    from fedscope_jax.engine.sweep import config_vectors, make_sweep_round_fn, stack_states

    calls = []

    def loss(params, batch, key):
        jax.debug.callback(lambda: calls.append(1))
        return _linear_loss(params, batch, key)

    shards = _linear_shards([1.0, 2.0, 1.0, 1.0])               # 2, 3, 1, 2 steps: one bucket of 3 steps
    cohorts, pad = build_cohorts(shards, range(4), plan_buckets(shards, max_buckets=1), {}, nice=False)
    assert (pad.real_steps, pad.slot_steps) == (8, 12)
    opt = server_optimizer("fedavg")
    cfg = ClientConfig(loss_fn=loss, optimizer=optax.sgd(0.1))
    states = stack_states([init_server_state(LIN_PARAMS, opt)] * 2)
    ids = np.arange(4)
    vectors = config_vectors(cohorts, 4, [(ids, np.inf, 0.0, 1.0), (ids[:2], np.inf, 0.0, 1.0)], stacked=True)
    # a vmapped chunk of two computes every slot: 2 chunks x 3 steps, a callback each (once per vmapped step)
    for chunk, per_config in ((1, 8), (2, 6)):
        calls.clear()
        fn = make_sweep_round_fn(cfg, opt, EngineConfig(chunk_size=chunk), donate=False, config_chunk=config_chunk)
        new, _ = fn(states, vectors, jax.random.key(0))
        jax.effects_barrier()
        assert len(calls) == per_config * (2 if config_chunk == 1 else 1)
        if chunk == 1:
            skipped = new
    np.testing.assert_allclose(np.asarray(skipped.params["w"]), np.asarray(new.params["w"]), rtol=1e-5)
