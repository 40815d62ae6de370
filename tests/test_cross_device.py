"""Many small clients (one user a client): a client's step holds its own users, not a silo's batch of padding,
and the cohort pads only to its bucket's largest client; results equal the old padded layout."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedscope_jax.engine.cohort import ClientShard, build_cohorts, plan_buckets

TINY = ["model.dim=8", "model.blocks=1", "model.heads=1", "model.max_len=6", "train.batch_size=8",
        "model.loss.num_negatives=10", "eval.num_negatives=20"]


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _widen(shard: ClientShard, width: int) -> ClientShard:
    """The shard padded with all-zero users up to `width` (the layout before per-client batch widths)."""
    pad = lambda v: np.pad(v, [(0, 0), (0, width - v.shape[1])] + [(0, 0)] * (v.ndim - 2))  # noqa: E731
    return ClientShard({k: pad(v) for k, v in shard.batch.items()}, shard.vocab, shard.step_mask)


@pytest.fixture(scope="module")
def user_context(tiny_dataset: Path):
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    # SGD: Adam would turn the float noise of gradients that are exactly zero in theory (attention key biases)
    # into whole learning-rate steps, so two equal programs would differ there by ~lr
    cfg = load_config(None, TINY + ["federated.scheme=user", "privacy.mode=off", "federated.client_opt=sgd",
                                    "federated.client_lr=0.5"])
    return seed_context(load_dataset(tiny_dataset), cfg)


def test_a_small_client_steps_with_its_own_users(user_context):
    """One user a client: each step holds that one user (width 1), not the batch size (8)."""
    ctx = user_context
    assert ctx.n_clients == 60
    shards = [ctx.source(0, c) for c in range(ctx.n_clients)]
    trained = [s for s in shards if s.real_steps]
    assert trained and all(s.batch["seq"].shape[1] == 1 and s.batch["user_mask"].all() for s in trained)
    plan = plan_buckets(trained, max_buckets=2)
    assert all(shape["seq"][0] == 1 for shape in plan.shapes)


def test_padding_users_to_the_batch_size_changes_nothing(user_context):
    """The round on one-user steps equals the round on the same users padded to the batch size (all-zero
    users, as before): losses are means over real targets, and dropout draws of the real rows do not depend
    on the rows after them (JAX's partitionable threefry)."""
    from fedscope_jax.engine.round import EngineConfig, make_round_fn
    from fedscope_jax.engine.server import init_server_state, server_optimizer

    ctx = user_context
    ids = np.arange(12)
    narrow = [ctx.source(0, int(c)) for c in ids]
    wide = [_widen(s, 8) for s in narrow]
    opt = server_optimizer("fedavg")
    fn = make_round_fn(ctx.client_cfg, opt, EngineConfig(chunk_size=4), donate=False)
    states = []
    for shards in (narrow, wide):
        cohorts, _ = build_cohorts(shards, range(len(ids)), plan_buckets(shards, 1), {}, multiple=4)
        assert cohorts[0].data.batch["seq"].shape[2] == shards[0].batch["seq"].shape[1]
        states.append(fn(init_server_state(ctx.params, opt), cohorts, jax.random.key(3))[0])
    assert _max_diff(states[0].params, states[1].params) < 1e-6
    assert _max_diff(states[0].params, ctx.params) > 1e-4      # it trained


def test_cohort_pads_every_axis_to_its_bucket(user_context):
    """Clients of different widths in one bucket: the cohort takes the largest, zeros after each client's own."""
    ctx = user_context
    shards = [ctx.source(0, 0), _widen(ctx.source(0, 1), 3)]
    plan = plan_buckets(shards, 1)
    assert plan.shapes[0]["seq"][0] == 3
    (cohort,), _ = build_cohorts(shards, [0, 1], plan, {})
    seq = np.asarray(cohort.data.batch["seq"])
    assert seq.shape[2] == 3
    np.testing.assert_array_equal(seq[0, :, :1], shards[0].batch["seq"])
    assert not seq[0, :, 1:].any() and not np.asarray(cohort.data.batch["user_mask"])[0, :, 1:].any()
