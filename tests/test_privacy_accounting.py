"""Calibration and accounting against dp-accounting reference values (../shared/notes/dp-accounting.md)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy import accounting

DELTA = 1e-5


@pytest.mark.parametrize("kind, expected", [("rdp", 2.10), ("pld", 1.83)])
def test_reference_epsilon_amplified(kind, expected):
    eps = accounting.epsilon_spent(kind, 1.0, 1000, DELTA, 0.01, True)
    assert eps == pytest.approx(expected, abs=0.006)


@pytest.mark.parametrize("z, rounds, expected", [(1.0, 10, 17.9), (1.0, 40, 46.2), (2.0, 40, 17.9)])
def test_reference_epsilon_full_participation_pld(z, rounds, expected):
    assert accounting.epsilon_spent("pld", z, rounds, DELTA) == pytest.approx(expected, abs=0.06)


@pytest.mark.parametrize("kind, expected", [("rdp", 0.8646), ("pld", 0.8145)])
def test_reference_calibration(kind, expected):
    z = accounting.calibrate_noise_multiplier(3.0, DELTA, 1000, kind, 0.01, True)
    assert z == pytest.approx(expected, rel=2e-3)
    eps = accounting.epsilon_spent(kind, z, 1000, DELTA, 0.01, True)
    assert 3.0 * (1 - 1e-4) <= eps <= 3.0


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize("eps_target, events", [(1.0, 5), (8.0, 40), (20.0, 17)])
def test_calibrated_z_reaches_target_without_amplification(kind, eps_target, events):
    z = accounting.calibrate_noise_multiplier(eps_target, DELTA, events, kind)
    eps = accounting.epsilon_spent(kind, z, events, DELTA)
    assert eps <= eps_target
    assert eps == pytest.approx(eps_target, rel=1e-4)
    # and it is the smallest such z: 0.1% less noise overspends
    assert accounting.epsilon_spent(kind, z * 0.999, events, DELTA) > eps_target
    # the same number from a fresh dp-accounting accountant, composed by hand
    acc = accounting.make_accountant(kind)
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), events))
    assert acc.get_epsilon(DELTA) == pytest.approx(eps, rel=1e-12)


def test_rdp_is_not_tighter_than_pld():
    z_rdp = accounting.calibrate_noise_multiplier(8.0, DELTA, 40, "rdp")
    z_pld = accounting.calibrate_noise_multiplier(8.0, DELTA, 40, "pld")
    exact = math.sqrt(40) * dp_accounting.get_sigma_gaussian(8.0, DELTA)
    assert exact <= z_pld * (1 + 1e-3) and z_pld < z_rdp


def test_one_shot_formula_is_not_what_we_calibrate():
    # sigma = sqrt(2 ln(1.25/delta))/eps per round composes far beyond eps over the run (notes: ~48 at 10 rounds)
    z_one_shot = math.sqrt(2 * math.log(1.25 / DELTA)) / 10.0
    assert accounting.epsilon_spent("pld", z_one_shot, 10, DELTA) > 40
    assert accounting.calibrate_noise_multiplier(10.0, DELTA, 10, "pld") > 3 * z_one_shot


def test_planned_events():
    assert accounting.planned_events(1.0, 40, False) == 40
    assert accounting.planned_events(0.1, 40, True) == 40
    n = accounting.planned_events(0.3, 40, False, 0.95)
    from scipy.stats import binom
    assert n == int(binom.ppf(0.95, 40, 0.3))
    assert accounting.planned_events(0.0, 40, False) == 0
    # a short run at a low rate: the 95% quantile of Binomial(2, 0.01) is 0, but a client that can be sampled
    # plans for one participation (a plan of 0 stopped every client at its first sampling: nothing trained)
    assert accounting.planned_events(0.01, 2, False, 0.95) == 1


def test_max_events_is_the_last_that_fits():
    z = accounting.calibrate_noise_multiplier(8.0, DELTA, 20, "rdp")
    n = accounting.max_events("rdp", z, DELTA, 8.0)
    assert n >= 20
    assert accounting.epsilon_spent("rdp", z, n, DELTA) <= 8.0 < accounting.epsilon_spent("rdp", z, n + 1, DELTA)


def test_effective_noise_multiplier_folds_the_clipped_bit():
    z_eff = 1.3
    z_upd, sigma_b = accounting.split_noise_multiplier(z_eff, 0.1)
    assert z_upd > z_eff and sigma_b == pytest.approx(z_eff / math.sqrt(0.1))
    assert accounting.effective_noise_multiplier(z_upd, sigma_b) == pytest.approx(z_eff, rel=1e-12)
    # the folded multiplier is exactly the joint Gaussian mechanism: same epsilon as composing the two
    acc = accounting.make_accountant("rdp")
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_upd), dp_accounting.GaussianDpEvent(sigma_b)]), 30))
    assert acc.get_epsilon(DELTA) == pytest.approx(accounting.epsilon_spent("rdp", z_eff, 30, DELTA), rel=1e-9)
    assert accounting.split_noise_multiplier(z_eff, 0.0) == (z_eff, math.inf)
    assert accounting.effective_noise_multiplier(z_eff, math.inf) == z_eff


def test_edge_cases():
    assert accounting.epsilon_spent("rdp", 1.0, 0, DELTA) == 0.0
    assert math.isinf(accounting.epsilon_spent("rdp", 0.0, 3, DELTA))
    assert accounting.calibrate_noise_multiplier(1.0, DELTA, 0) == 0.0
    assert np.isfinite(accounting.calibrate_noise_multiplier(0.05, DELTA, 200, "rdp"))


@pytest.mark.parametrize("z, q, n, amp", [(1.1, 1.0, 37, False), (0.9, 0.05, 400, True), (3.0, 0.5, 1, True)])
def test_rdp_fast_path_is_a_fresh_accountant_composition(z, q, n, amp):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(accounting.run_event(z, n, q, amp))
    assert accounting.epsilon_spent("rdp", z, n, DELTA, q, amp) == acc.get_epsilon(DELTA)


def test_skipped_rdp_order_warnings_are_filtered_and_other_messages_pass(caplog):
    """dp-accounting logs one 'failed to converge ... Excluding this order' warning per fractional order it
    drops under Poisson subsampling; the project's calls filter exactly those (the result is unchanged)."""
    import logging

    caplog.set_level(logging.WARNING)
    event = accounting.round_event(2.8517, 0.5, amplification=True)
    raw = dp_accounting.rdp.RdpAccountant()
    raw.compose(event)   # dp-accounting itself, unfiltered: the warnings exist in this version
    skipped = [r for r in caplog.records if "Excluding this order" in r.getMessage()]
    assert skipped, "dp-accounting no longer logs skipped orders here; the filter may be obsolete"
    caplog.clear()
    orders, one = accounting.rdp_of_one_event.__wrapped__(2.8517, 0.5, True)
    z = accounting.calibrate_noise_multiplier(7.9, 1e-5, 20, "rdp", sampling_rate=0.5, amplification=True)
    assert not [r for r in caplog.records if "Excluding this order" in r.getMessage()]
    np.testing.assert_array_equal(one, raw._rdp)   # same RDP vector as the unfiltered composition
    assert accounting.epsilon_spent("rdp", z, 20, 1e-5, 0.5, True) <= 7.9 + 1e-9
    with accounting.SkippedOrders():
        logging.getLogger("absl").warning("another dp-accounting warning")
    assert [r.getMessage() for r in caplog.records] == ["another dp-accounting warning"]
    assert not [f for f in logging.getLogger("absl").filters if isinstance(f, accounting.SkippedOrders)]


def test_an_unreachable_epsilon_is_one_line_naming_the_setting():
    from fedscope_jax.privacy.accounting import calibrate_noise_multiplier

    with pytest.raises(FedscopeError, match=r"privacy\.epsilon=1e-09: no noise multiplier below 1e6 reaches it at "
                                            r"delta=1e-05 over 160 accounted events .* use a larger --epsilon"):
        calibrate_noise_multiplier(1e-9, 1e-5, 160)
