"""Simulated secure aggregation: exact up to quantization, uniform masked updates, dropouts handled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy import secagg

secure_sum = jax.jit(secagg.secure_sum, static_argnums=3)
client_encode = jax.jit(secagg.client_encode, static_argnums=2)
client_mask = jax.jit(secagg.client_mask, static_argnums=2)
reveal_seeds = jax.jit(secagg.reveal_seeds, static_argnums=2)
server_aggregate = jax.jit(secagg.server_aggregate, static_argnums=3)


def _values(n, dim, seed=0, spread=1.3):
    return jax.random.uniform(jax.random.key(seed), (n, dim), minval=-spread, maxval=spread)


@pytest.mark.parametrize("n, neighbors, delivered", [
    (1, None, [1]),
    (6, None, [1, 1, 1, 1, 1, 1]),
    (6, None, [1, 0, 1, 1, 0, 1]),
    (9, 2, [1, 1, 0, 0, 1, 1, 1, 0, 1]),
    (9, 2, [0, 0, 0, 0, 1, 0, 0, 0, 0]),   # a lone survivor whose partners all dropped
    (9, 2, [0] * 9),                        # nobody delivered: the sum is empty
])
def test_secure_sum_equals_plain_sum_within_quantization(n, neighbors, delivered):
    dim = 4096
    params = secagg.make_params(n, 1.0, neighbors=neighbors)
    x = _values(n, dim, seed=n)
    mask = jnp.array(delivered, bool)
    out = np.asarray(secure_sum(x, mask, jax.random.key(7), params))
    plain = np.asarray(jnp.sum(jnp.where(mask[:, None], jnp.clip(x, -1.0, 1.0), 0.0), axis=0), np.float64)
    err = np.abs(out - plain)
    bound = secagg.error_bound(int(mask.sum()), params, float(np.abs(plain).max()))
    assert err.max() <= bound
    if mask.sum() == 0:
        assert np.all(out == 0)


def test_quantization_error_is_unbiased_and_small():
    n, dim = 16, 20000
    params = secagg.make_params(n, 0.5, levels=256)  # coarse grid, so the error is measurable
    x = _values(n, dim, seed=3, spread=0.5)
    out = np.asarray(secure_sum(x, jnp.ones(n, bool), jax.random.key(11), params), np.float64)
    err = out - np.asarray(jnp.sum(x, 0), np.float64)
    step = params.step
    assert np.abs(err).max() <= n * step
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(dim)          # unbiased stochastic rounding
    assert err.std() <= np.sqrt(n) * step / 2                       # each client's rounding var <= step^2/4


def test_a_masked_update_is_uniform_and_independent_of_the_raw_update():
    n, dim = 5, 2**15
    params = secagg.make_params(n, 1.0)
    raw = jnp.where(jnp.arange(dim) % 2 == 0, -1.0, 1.0)              # two very different raw values
    x = jnp.zeros((n, dim)).at[2].set(raw)
    encoded = client_encode(x, jax.random.split(jax.random.key(0), n), params)
    masked = np.asarray(client_mask(encoded, jax.random.key(1), params)[2])
    for shift in (28, 0):                                                # top and bottom 4 bits
        bins = (masked >> shift) & 0xF
        counts = np.bincount(bins, minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-3
        table = np.stack([np.bincount(bins[0::2], minlength=16), np.bincount(bins[1::2], minlength=16)])
        assert stats.chi2_contingency(table).pvalue > 1e-3            # masked value independent of raw
    # unmasked, the encoding obviously depends on the raw value (the test above can fail)
    enc = np.asarray(encoded[2])
    assert len(np.unique(enc[0::2])) == 1 and enc[0] != enc[1]


def test_revealed_seeds_never_unmask_a_single_client():
    n = 7
    params = secagg.make_params(n, 1.0, neighbors=4)
    delivered = jnp.array([1, 0, 1, 1, 0, 0, 1], bool)
    revealed = reveal_seeds(jax.random.key(3), delivered, params)
    dummy = np.asarray(jax.random.key_data(jax.random.key(0)))
    self_data = np.asarray(jax.random.key_data(revealed.self_keys))
    for i in range(n):
        assert (revealed.self_coef[i] == 1) == bool(delivered[i])
        if not delivered[i]:
            np.testing.assert_array_equal(self_data[i], dummy)           # dropped: self seed stays secret
    for j, d in enumerate(params.offsets):
        data = np.asarray(jax.random.key_data(revealed.pair_keys[j]))
        for i in range(n):
            both = bool(delivered[i]) and bool(delivered[(i + d) % n])
            neither = not delivered[i] and not delivered[(i + d) % n]
            if both or neither:                                          # never revealed
                assert revealed.pair_coef[j, i] == 0
                np.testing.assert_array_equal(data[i], dummy)
            else:
                assert revealed.pair_coef[j, i] == (1 if delivered[i] else -1)


def test_masks_cancel_without_the_server_knowing_any_pair_seed():
    # With everyone delivering, the server needs only the self seeds: pair masks cancel in the ring sum.
    n, dim = 6, 4096
    params = secagg.make_params(n, 1.0)
    encoded = client_encode(_values(n, dim), jax.random.split(jax.random.key(0), n), params)
    masked = client_mask(encoded, jax.random.key(9), params)
    revealed = reveal_seeds(jax.random.key(9), jnp.ones(n, bool), params)
    assert int(jnp.abs(revealed.pair_coef).sum()) == 0
    total = server_aggregate(masked, jnp.ones(n, bool), revealed, params)
    expected = jnp.sum(jax.lax.bitcast_convert_type(encoded, jnp.int32), axis=0)
    np.testing.assert_array_equal(np.asarray(total), np.asarray(expected))


def test_pytree_and_parameter_checks():
    tree = {"a": _values(3, 10, seed=1) * 0.1, "b": {"c": _values(3, 4, seed=2) * 0.1}}
    params = secagg.make_params(3, 1.0)
    out = jax.jit(secagg.secure_sum_tree, static_argnums=3)(tree, jnp.ones(3, bool), jax.random.key(0), params)
    np.testing.assert_allclose(out["a"], jnp.sum(tree["a"], 0), atol=3 * params.step)
    np.testing.assert_allclose(out["b"]["c"], jnp.sum(tree["b"]["c"], 0), atol=3 * params.step)
    assert secagg.make_params(100_000, 1.0).levels == (2**31 - 1) // 100_000
    with pytest.raises(FedscopeError, match="does not fit the ring"):
        secagg.make_params(2**17, 1.0, levels=2**15)
    with pytest.raises(FedscopeError, match="made for 3 clients"):
        secagg.secure_sum(_values(4, 5), jnp.ones(4, bool), jax.random.key(0), params)


def test_error_report_measures_against_the_plain_sum():
    from fedscope_jax.privacy.secagg_error import measure
    r = measure(6, 4096, 1.0, None, None, dropout=0.3, seed=2, repeats=1)  # same compile as above
    assert 0 < r["delivered"] <= 6
    assert 0 < r["max_abs_error"] <= r["bound"]
    assert r["rms_error"] <= np.sqrt(r["delivered"]) * r["step"] / 2 * 1.1
