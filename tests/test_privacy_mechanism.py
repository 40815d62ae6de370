"""The per-client Gaussian mechanism over the client axis: clipping bound, noise std, adaptive clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedscope_jax.privacy import mechanism


def _updates(key, num_clients=6):
    k1, k2 = jax.random.split(key)
    scales = jnp.array([0.01, 0.5, 1.0, 3.0, 10.0, 100.0])[:num_clients]
    return {"w": jax.random.normal(k1, (num_clients, 7, 5)) * scales[:, None, None],
            "b": {"bias": jax.random.normal(k2, (num_clients, 11)) * scales[:, None]}}


def test_clip_bound_per_client():
    updates = _updates(jax.random.key(0))
    clip = jnp.array([0.1, 0.1, 2.0, 2.0, 5.0, jnp.inf])
    clipped, norms = jax.jit(mechanism.clip_per_client)(updates, clip)
    raw = np.sqrt(np.sum(np.asarray(updates["w"]).reshape(6, -1) ** 2, 1)
                  + np.sum(np.asarray(updates["b"]["bias"]) ** 2, 1))
    np.testing.assert_allclose(norms, raw, rtol=1e-5)
    after = np.asarray(mechanism.per_client_norms(clipped))
    np.testing.assert_allclose(after, np.minimum(raw, np.asarray(clip)), rtol=1e-5)
    assert np.all(after <= np.asarray(clip) * (1 + 1e-6))
    # under the bound: untouched; over it: same direction
    np.testing.assert_allclose(clipped["w"][0], updates["w"][0], rtol=1e-6)
    np.testing.assert_allclose(clipped["w"][5], updates["w"][5], rtol=1e-6)
    cos = np.sum(np.asarray(clipped["w"][3]) * np.asarray(updates["w"][3])) / (
        np.linalg.norm(clipped["w"][3]) * np.linalg.norm(updates["w"][3]))
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_noise_std_matches_z_times_c():
    c = 4
    zeros = {"a": jnp.zeros((c, 200, 50)), "b": jnp.zeros((c, 3000))}
    clip = jnp.array([0.5, 1.0, 2.0, 1.0])
    z = jnp.array([0.7, 1.3, 2.1, 0.0])
    keys = jax.random.split(jax.random.key(42), c)
    noised, _ = jax.jit(mechanism.privatize_updates)(zeros, clip, z, keys)
    for k in range(c):
        sample = np.concatenate([np.asarray(noised["a"][k]).ravel(), np.asarray(noised["b"][k]).ravel()])
        expected = float(z[k] * clip[k])
        if expected == 0:
            assert np.all(sample == 0)
            continue
        assert sample.std() == pytest.approx(expected, rel=0.02)
        assert abs(sample.mean()) < 4 * expected / np.sqrt(sample.size)
        assert stats.normaltest(sample).pvalue > 1e-3  # Gaussian, fixed seed
    # clients draw independent noise
    assert abs(np.corrcoef(np.asarray(noised["b"][0]), np.asarray(noised["b"][1]))[0, 1]) < 0.1


def test_noise_of_a_client_does_not_depend_on_chunking():
    zeros = {"a": jnp.zeros((4, 10))}
    keys = jax.random.split(jax.random.key(1), 4)
    stds = jnp.ones(4)
    full = mechanism.add_noise_per_client(zeros, stds, keys)["a"]
    half = mechanism.add_noise_per_client({"a": zeros["a"][2:]}, stds[2:], keys[2:])["a"]
    np.testing.assert_array_equal(full[2:], half)


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


def test_poisson_sampling_rate_and_eligibility():
    rates = jnp.array([0.1, 0.5, 0.9, 1.0])
    eligible = jnp.array([True, True, True, False])
    draws = jax.vmap(lambda k: mechanism.sample_participants(k, rates, eligible))(
        jax.random.split(jax.random.key(0), 4000))
    freq = np.asarray(draws).mean(0)
    np.testing.assert_allclose(freq[:3], [0.1, 0.5, 0.9], atol=0.03)
    assert freq[3] == 0.0


def test_central_noise_once_on_the_aggregate():
    agg = {"w": jnp.zeros((300, 100))}
    noised = mechanism.add_central_noise(agg, 0.8 * 2.0, jax.random.key(5))
    assert float(jnp.std(noised["w"])) == pytest.approx(1.6, rel=0.02)
