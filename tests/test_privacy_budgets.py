"""Personalized eps_k allocation: monotone in data size, within bounds, normalised to the nominal eps."""

from __future__ import annotations

import numpy as np
import pytest

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy.budgets import client_epsilons, personalized_epsilons, uniform_epsilons

SIZES = np.array([12, 40, 40, 95, 300, 1_000, 4_000, 25_000], dtype=np.float64)


@pytest.mark.parametrize("normalize", ["geometric", "weighted"])
@pytest.mark.parametrize("exponent", [0.25, 0.5, 1.0])
def test_monotone_bounded_normalised(normalize, exponent):
    eps = personalized_epsilons(SIZES, 4.0, exponent=exponent, eps_min=1.0, eps_max=12.0, normalize=normalize)
    order = np.argsort(SIZES, kind="stable")
    assert np.all(np.diff(eps[order]) >= 0)                   # monotone in data size
    assert eps[1] == eps[2]                                   # equal sizes, equal budgets
    assert np.all(eps >= 1.0) and np.all(eps <= 12.0)          # bounds
    if normalize == "geometric":
        assert np.exp(np.mean(np.log(eps))) == pytest.approx(4.0, rel=1e-9)
    else:
        assert np.sum(SIZES / SIZES.sum() * eps) == pytest.approx(4.0, rel=1e-9)
    assert eps[-1] > eps[0]                                   # actually personalized


def test_unclipped_geometric_is_power_law():
    sizes = np.array([100.0, 400.0, 1600.0])
    eps = personalized_epsilons(sizes, 2.0, exponent=0.5, eps_min=0.1, eps_max=100.0)
    np.testing.assert_allclose(eps, [1.0, 2.0, 4.0], rtol=1e-9)  # eps * (n / geomean)^0.5, geomean = 400


def test_bounds_bind_and_mean_still_holds():
    eps = personalized_epsilons(SIZES, 4.0, exponent=2.0, eps_min=2.0, eps_max=6.0)
    assert eps.min() == 2.0 and eps.max() == 6.0
    assert np.exp(np.mean(np.log(eps))) == pytest.approx(4.0, rel=1e-9)


def test_exponent_zero_and_uniform_give_nominal():
    np.testing.assert_allclose(personalized_epsilons(SIZES, 3.0, exponent=0.0), 3.0, rtol=1e-12)
    np.testing.assert_array_equal(uniform_epsilons(5, 3.0), np.full(5, 3.0))
    np.testing.assert_array_equal(client_epsilons("uniform", SIZES, 3.0), np.full(SIZES.size, 3.0))
    assert np.all(np.isinf(client_epsilons("off", SIZES, 3.0)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps_min=5.0), "eps_min <= epsilon"),
    (dict(eps_max=3.0), "eps_min <= epsilon"),
    (dict(exponent=-1.0), "allocation_exponent"),
    (dict(normalize="median"), "normalize"),
])
def test_invalid_options_raise(kwargs, match):
    with pytest.raises(FedscopeError, match=match):
        personalized_epsilons(SIZES, 4.0, **kwargs)


def test_empty_clients_get_eps_min_and_negative_sizes_are_rejected():
    eps = personalized_epsilons(np.array([3.0, 0.0, 12.0]), 4.0, eps_min=1.0)
    assert eps[1] == 1.0
    assert np.exp(np.mean(np.log(eps[[0, 2]]))) == pytest.approx(4.0, rel=1e-9)
    with pytest.raises(FedscopeError, match="client 1 has size -2"):
        personalized_epsilons(np.array([3.0, -2.0]), 4.0)
    with pytest.raises(FedscopeError, match="every client has size 0"):
        personalized_epsilons(np.zeros(3), 4.0)
