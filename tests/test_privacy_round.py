"""The privacy pieces wired the way the engine uses them, in one jitted round over the client axis."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedscope_jax.privacy import mechanism, secagg
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.privacy.ledger import PrivacyLedger, check_ledger
from fedscope_jax.privacy.plan import plan_privacy, secagg_bound

SIZES = np.array([30, 60, 120, 240, 480, 960, 1920, 3840])
DIM = 3000


def privatize(updates, clip, z, key):
    """Each client's clipped update plus its own N(0, (z_k C_k)^2) (the mechanism's two steps); raw norms."""
    n = updates.shape[0]
    values, clipped = mechanism.clip({"w": updates}, clip, jnp.ones(n))
    noise = mechanism.contributor_noise(mechanism.contributor_keys(key, jnp.arange(n)), 0, updates.shape[1:])
    return clipped.scale[:, None] * values["w"] + mechanism.noise_std(clip, z)[:, None] * noise, clipped.norm


@functools.partial(jax.jit, static_argnums=(0,))
def private_round(params, updates, clip, z, participated, key, bit_noise, clip_min, clip_max):
    """Clip + local noise per client, secure sum of the participants, adaptive clip step."""
    k_noise, k_sum, k_clip = jax.random.split(key, 3)
    noised, norms = privatize(updates, clip, z, k_noise)
    total = secagg.secure_sum(noised, participated, k_sum, params)
    new_clip = mechanism.adaptive_clip_update(clip, norms, participated, k_clip, target_quantile=0.5,
                                              learning_rate=0.2, bit_noise=bit_noise, min_clip=clip_min,
                                              max_clip=clip_max)
    return total, new_clip


def test_jitted_private_round_with_ledger(tmp_path):
    config = PrivacyConfig(mode="personalized", epsilon=6.0, clipping="adaptive", clip_norm=1.0)
    rounds = 6
    plan = plan_privacy(config, SIZES, 0.75, rounds)
    ledger = PrivacyLedger(plan, np.arange(SIZES.size), SIZES)
    c = SIZES.size
    bound = secagg_bound(plan)
    params = secagg.make_params(c, bound, neighbors=config.secagg_neighbors)
    clip = jnp.asarray(plan.clip_norms, jnp.float32)
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    totals = []
    for t in range(rounds):
        key, k_upd, k_round = jax.random.split(key, 3)
        eligible = ledger.begin_round(t)
        participated = jnp.asarray((rng.random(c) < plan.sampling_rates) & eligible)   # Poisson sampling
        updates = jax.random.normal(k_upd, (c, DIM)) * 0.05  # norms ~2.7, above the initial C = 1
        total, clip = private_round(params, updates, clip, jnp.asarray(plan.update_noise_multipliers, jnp.float32),
                                    participated, k_round, jnp.asarray(plan.bit_noise, jnp.float32),
                                    jnp.asarray(plan.clip_min, jnp.float32), jnp.asarray(plan.clip_max, jnp.float32))
        row = ledger.end_round(np.asarray(participated), np.asarray(clip))
        assert row["privacy/participants"] == int(participated.sum())
        totals.append((np.asarray(total), np.asarray(participated), np.asarray(updates)))
    assert np.all(np.asarray(clip) >= plan.clip_min * (1 - 1e-6)) and np.all(np.asarray(clip) <= plan.clip_max)
    path = ledger.write(tmp_path)
    assert check_ledger(path) == []
    assert np.all(ledger.eps_spent <= plan.eps_targets)
    assert not np.allclose(ledger.clip_norms, 1.0)  # adaptive clipping moved C_k


def test_secure_sum_of_noised_updates_has_the_summed_noise_std():
    # zero updates: the secure sum is pure noise with std sqrt(sum_k (z_k C_k)^2) over the participants
    c = 6
    clip = jnp.array([0.5, 1.0, 1.0, 2.0, 2.0, 4.0])
    z = jnp.array([2.0, 1.5, 1.0, 1.0, 0.8, 0.5])
    participated = jnp.array([1, 1, 0, 1, 1, 1], bool)
    params = secagg.make_params(c, 12.0)
    updates = jnp.zeros((c, 40000))
    noised, _ = privatize(updates, clip, z, jax.random.key(3))
    total = np.asarray(jax.jit(secagg.secure_sum, static_argnums=3)(noised, participated, jax.random.key(4),
                                                                    params))
    expected = float(np.sqrt(np.sum(np.where(participated, (z * clip) ** 2, 0.0))))
    assert total.std() == pytest.approx(expected, rel=0.02)


def test_secagg_bound_covers_the_noise():
    plan = plan_privacy(PrivacyConfig(mode="uniform", epsilon=4.0, clip_norm=2.0), SIZES, 1.0, 10)
    assert secagg_bound(plan) == pytest.approx(2.0 * (1 + 6 * plan.update_noise_multipliers[0]))
    with pytest.raises(Exception, match="finite clip norms"):
        secagg_bound(plan_privacy(PrivacyConfig(mode="off"), SIZES, 1.0, 10))
