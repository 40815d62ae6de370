"""The one Gaussian mechanism (privacy/mechanism.py): the clipping step and its sensitivity, the noise step,
adaptive clipping. The engine's use of it is tested in test_engine_core.py and test_federated_privacy.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedscope_jax.privacy import mechanism


def _updates(key, num_clients=6):
    k1, k2 = jax.random.split(key)
    scales = jnp.array([0.01, 0.5, 1.0, 3.0, 10.0, 100.0])[:num_clients]
    return {"w": jax.random.normal(k1, (num_clients, 7, 5)) * scales[:, None, None],
            "b": {"bias": jax.random.normal(k2, (num_clients, 11)) * scales[:, None]}}


def _scaled(values, scale):
    return jax.tree.map(lambda v: v * scale.reshape((-1,) + (1,) * (v.ndim - 1)), values)


def test_clip_bounds_each_contribution():
    updates = _updates(jax.random.key(0))
    clip = jnp.array([0.1, 0.1, 2.0, 2.0, 5.0, jnp.inf])
    weight = jnp.array([1.0, 1.0, 1.0, 0.5, 1.0, 1.0])
    _, c = jax.jit(mechanism.clip)(updates, clip, weight)
    raw = np.sqrt(np.sum(np.asarray(updates["w"]).reshape(6, -1) ** 2, 1)
                  + np.sum(np.asarray(updates["b"]["bias"]) ** 2, 1))
    np.testing.assert_allclose(c.norm, raw, rtol=1e-5)
    np.testing.assert_allclose(c.factor, np.minimum(1.0, np.asarray(clip) / raw), rtol=1e-6)
    after = np.asarray(jax.vmap(optax.tree.norm)(_scaled(updates, c.scale)))
    np.testing.assert_allclose(after, np.asarray(weight) * np.minimum(raw, np.asarray(clip)), rtol=1e-5)
    assert np.all(after[:5] <= np.asarray(c.bound)[:5] * (1 + 1e-6)) and np.isinf(c.bound[5])
    # under the bound untouched (factor 1), over it scaled (same direction)
    assert float(c.factor[0]) == 1.0 and float(c.factor[5]) == 1.0 and float(c.factor[3]) < 1.0
    np.testing.assert_allclose(c.bound[:5], np.asarray(weight * clip)[:5])


def test_clip_excludes_padding_and_non_finite_contributors():
    updates = _updates(jax.random.key(1), 4)
    updates["w"] = updates["w"].at[1, 0, 0].set(jnp.nan)
    weight = jnp.array([1.0, 1.0, 0.0, 1.0])
    clip = jnp.array([1.0, 1.0, jnp.inf, 1.0])
    values, c = mechanism.clip(updates, clip, weight, finite=jnp.array([True, True, True, False]))
    assert c.included.tolist() == [True, False, False, False]
    assert c.scale.tolist()[1:] == [0.0, 0.0, 0.0] and np.isnan(float(c.norm[1]))
    assert np.all(np.isfinite(np.asarray(values["w"]))) and np.all(np.asarray(values["w"][1]) == 0)
    assert c.bound.tolist() == [1.0, 1.0, 0.0, 1.0]    # padding (w = 0, C = inf) bounds nothing; public inputs only
    assert float(c.sensitivity()) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_sensitivity_bounds_the_change_of_the_sum(seed):
    """Replacing one contributor's value by anything (here 1e3 times larger, or zero = removed) moves the
    clipped, weighted sum by at most 2 x sensitivity (replace), resp. 1 x (add / remove)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    updates = _updates(k1)
    clip = jnp.array([0.5, 1.0, 2.0, 2.0, 0.7, 1.5])
    weight = jnp.array([1.0, 1.0, 1.0, 1.0, 0.5, 1.0])

    def total(values):
        v, c = mechanism.clip(values, clip, weight)
        return jax.tree.map(lambda x: jnp.tensordot(c.scale, x, axes=1), v), c.sensitivity()

    base, sens = total(updates)
    for k in range(6):
        for how, bound in (("replace", 2.0), ("remove", 1.0)):
            other = jax.tree.map(lambda x: x.at[k].set(1e3 * jax.random.normal(k2, x.shape[1:]) if how == "replace"
                                                       else jnp.zeros(x.shape[1:])), updates)
            moved = float(optax.tree.norm(jax.tree.map(jnp.subtract, total(other)[0], base)))
            assert moved <= bound * float(sens) * (1 + 1e-5), (k, how)
    assert float(sens) == 2.0


def test_unclipped_sum_breaks_the_bound():
    """The same check fails without clipping (C = inf): the test above can fail."""
    updates = _updates(jax.random.key(0))
    v, c = mechanism.clip(updates, jnp.full(6, jnp.inf), jnp.ones(6))
    big = jax.tree.map(lambda x: x.at[0].set(1e3 * jnp.ones(x.shape[1:])), updates)
    v2, _ = mechanism.clip(big, jnp.full(6, jnp.inf), jnp.ones(6))
    moved = optax.tree.norm(jax.tree.map(lambda a, b: jnp.tensordot(c.scale, a - b, axes=1), v2, v))
    assert float(moved) > 100.0 and not np.isfinite(float(c.sensitivity()))


def test_contributor_noise_std_is_z_times_c():
    c = 4
    shape = (200, 50)
    clip = jnp.array([0.5, 1.0, 2.0, 1.0])
    z = jnp.array([0.7, 1.3, 2.1, 0.0])
    keys = mechanism.contributor_keys(jax.random.key(42), jnp.arange(c))
    std = mechanism.noise_std(clip, z)
    noise = std[:, None, None] * mechanism.contributor_noise(keys, 0, shape)
    for k in range(c):
        sample = np.asarray(noise[k]).ravel()
        expected = float(z[k] * clip[k])
        if expected == 0:
            assert np.all(sample == 0)
            continue
        assert sample.std() == pytest.approx(expected, rel=0.02)
        assert abs(sample.mean()) < 4 * expected / np.sqrt(sample.size)
        assert stats.normaltest(sample).pvalue > 1e-3  # Gaussian, fixed seed
    assert abs(np.corrcoef(np.asarray(noise[0]).ravel(), np.asarray(noise[1]).ravel())[0, 1]) < 0.05


def test_noise_of_a_contributor_does_not_depend_on_chunking():
    ids = jnp.array([3, 9, 4, 12])
    key = jax.random.key(1)
    full = mechanism.contributor_noise(mechanism.contributor_keys(key, ids), 2, (10,))
    half = mechanism.contributor_noise(mechanism.contributor_keys(key, ids[2:]), 2, (10,))
    np.testing.assert_array_equal(full[2:], half)
    # and is the contributor's own standard_normal draw (the one draw the aggregate noise uses too)
    np.testing.assert_array_equal(full[1], mechanism.standard_normal(jax.random.fold_in(key, 9), 2, (10,)))


def test_add_noise_once_on_the_aggregate():
    agg = {"w": jnp.zeros((300, 100)), "b": jnp.zeros(20000)}
    noised = mechanism.add_noise(agg, 0.8 * 2.0, jax.random.key(5))
    assert float(jnp.std(noised["w"])) == pytest.approx(1.6, rel=0.02)
    assert float(jnp.std(noised["b"])) == pytest.approx(1.6, rel=0.03)
    # leaves draw independently (leaf i from fold_in(key, i))
    assert abs(np.corrcoef(np.asarray(noised["w"]).ravel()[:20000], np.asarray(noised["b"]))[0, 1]) < 0.05


def test_adaptive_clip_tracks_quantile_without_noise():
    # Non-private rule (bit_noise=0): C_k converges to the target quantile of client k's norm distribution.
    scales = jnp.array([0.1, 1.0, 10.0])

    def step(clip, key):
        k1, k2 = jax.random.split(key)
        norms = scales * jnp.exp(0.5 * jax.random.normal(k1, (3,)))  # log-normal norms, median = scale
        new = mechanism.adaptive_clip_update(clip, norms, jnp.ones(3, bool), k2, target_quantile=0.5,
                                             learning_rate=0.05, bit_noise=0.0)
        return new, new

    _, path = jax.lax.scan(step, jnp.ones(3), jax.random.split(jax.random.key(0), 3000))
    late = np.exp(np.mean(np.log(np.asarray(path[1000:])), axis=0))
    np.testing.assert_allclose(late, np.asarray(scales), rtol=0.15)


def test_adaptive_clip_with_noised_bit():
    # With the noised bit (bit_noise=3, as a 10% share of z~1 gives) log C still drifts to the right quantile.
    def step(clip, key):
        k1, k2 = jax.random.split(key)
        norms = jnp.exp(0.3 * jax.random.normal(k1, (2,))) * jnp.array([1.0, 4.0])
        new = mechanism.adaptive_clip_update(clip, norms, jnp.ones(2, bool), k2, target_quantile=0.8,
                                             learning_rate=0.01, bit_noise=3.0)
        return new, new

    _, path = jax.lax.scan(step, jnp.ones(2), jax.random.split(jax.random.key(3), 20000))
    late = np.exp(np.mean(np.log(np.asarray(path[5000:])), axis=0))
    q80 = np.exp(0.3 * stats.norm.ppf(0.8)) * np.array([1.0, 4.0])
    np.testing.assert_allclose(late, q80, rtol=0.15)


def test_adaptive_clip_only_moves_participants():
    clip = jnp.array([1.0, 1.0])
    new = mechanism.adaptive_clip_update(clip, jnp.array([5.0, 5.0]), jnp.array([True, False]), jax.random.key(0),
                                         target_quantile=0.5, learning_rate=0.2, bit_noise=0.0)
    assert float(new[0]) == pytest.approx(np.exp(0.1))  # bit 0: C grows by exp(lr * 0.5)
    assert float(new[1]) == 1.0
    capped = mechanism.adaptive_clip_update(clip, jnp.array([5.0, 0.0]), jnp.array([True, True]), jax.random.key(0),
                                            target_quantile=0.5, learning_rate=0.2, bit_noise=0.0,
                                            min_clip=0.95, max_clip=1.05)
    np.testing.assert_allclose(capped, [1.05, 0.95])
