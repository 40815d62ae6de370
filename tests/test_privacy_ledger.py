"""Plan + ledger: eps_spent recomputable from the ledger's own columns, budget exhaustion stops a client."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.privacy.ledger import LEDGER_COLUMNS, PrivacyLedger, check_ledger, read_ledger, recompute_eps
from fedscope_jax.privacy.plan import plan_privacy
from fedscope_jax.utils.io import read_arrow

SIZES = np.array([15, 40, 90, 200, 800, 3000])
IDS = np.arange(100, 106)


def _direct_eps(row) -> float:
    """dp-accounting from the row's columns only, written out without the project's helpers."""
    if row["accountant"] == "rdp":
        acc = rdp.RdpAccountant()
    else:
        acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    event = dp_accounting.GaussianDpEvent(row["noise_multiplier"])
    count = row["rounds_participated"]
    if row["amplification"]:
        event = dp_accounting.PoissonSampledDpEvent(row["sampling_rate"], event)
        count = row["rounds_accounted"]
    if count == 0:
        return 0.0
    return acc.compose(dp_accounting.SelfComposedDpEvent(event, count)).get_epsilon(row["delta"])


def _run(config, rounds, rates, run_rounds=None, seed=0, clip_path=None):
    plan = plan_privacy(config, SIZES, rates, rounds)
    ledger = PrivacyLedger(plan, IDS, SIZES)
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(run_rounds or rounds):
        eligible = ledger.begin_round(t)
        participated = eligible & (rng.random(SIZES.size) < plan.sampling_rates)
        clip = None if clip_path is None else clip_path(t)
        rows.append(ledger.end_round(participated, clip))
    return plan, ledger, rows


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("mode", ["personalized", "uniform"])
def test_ledger_eps_equals_direct_dp_accounting(tmp_path, accountant, mode):
    config = PrivacyConfig(mode=mode, epsilon=4.0, accountant=accountant)
    plan, ledger, _ = _run(config, rounds=12, rates=np.array([1.0, 0.5, 0.5, 0.3, 0.8, 1.0]))
    path = ledger.write(tmp_path)
    table = read_arrow(path)
    assert tuple(table.column_names) == LEDGER_COLUMNS
    rows = read_ledger(path)
    assert [r["client_id"] for r in rows] == IDS.tolist()
    for row in rows:
        direct = _direct_eps(row)
        assert row["eps_spent"] == pytest.approx(direct, rel=1e-6)
        assert recompute_eps(row) == pytest.approx(direct, rel=1e-6)
        assert row["eps_spent"] <= row["eps_target"]
        assert row["accountant"] == accountant and row["amplification"] is False and row["delta"] == 1e-5
    assert check_ledger(path) == []
    full = [r for r in rows if r["sampling_rate"] == 1.0]
    for row in full:  # clients in every round spend (almost) exactly their calibrated target
        assert row["rounds_participated"] == 12
        assert row["eps_spent"] == pytest.approx(row["eps_target"], rel=1e-4)
    if mode == "uniform":
        assert all(r["eps_target"] == 4.0 for r in rows)
    else:
        targets = [r["eps_target"] for r in rows]
        assert targets == sorted(targets) and targets[0] < 4.0 < targets[-1]


def test_budget_exhaustion_stops_a_client(tmp_path, caplog):
    config = PrivacyConfig(mode="personalized", epsilon=2.0, accountant="rdp", participation_quantile=0.5)
    plan = plan_privacy(config, SIZES, 0.5, 20)
    assert np.all(plan.planned_events == 10)
    ledger = PrivacyLedger(plan, IDS, SIZES)
    # A client sampled every round (more than planned) must be stopped before it exceeds its target.
    stopped_at = {}
    with caplog.at_level("INFO", logger="fedscope_jax.privacy.ledger"):
        for t in range(20):
            eligible = ledger.begin_round(t)
            row = ledger.end_round(eligible.copy())
            for cid in row["privacy/newly_stopped"]:
                stopped_at[cid] = t
    assert set(stopped_at) == set(IDS.tolist())
    rows = {r["client_id"]: r for r in read_ledger(ledger.write(tmp_path))}
    for k, cid in enumerate(IDS):
        r = rows[cid]
        assert r["rounds_participated"] == stopped_at[cid] >= 10
        assert r["eps_spent"] <= r["eps_target"]
        one_more = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(r["noise_multiplier"]),
                                                     r["rounds_participated"] + 1)
        assert rdp.RdpAccountant().compose(one_more).get_epsilon(r["delta"]) > r["eps_target"]
    assert "stops at round" in caplog.text
    summary = ledger.summary()
    assert {s["client_id"] for s in summary["stopped_clients"]} == set(IDS.tolist())
    assert summary["clients_over_target"] == 0
    # a refused client may not take part
    eligible = ledger.begin_round(20)
    assert not eligible.any()
    with pytest.raises(RuntimeError, match="refused clients"):
        ledger.end_round(np.ones(SIZES.size, bool))


def test_amplification_accounts_every_round_for_every_active_client(tmp_path):
    config = PrivacyConfig(mode="uniform", epsilon=3.0, accountant="rdp", amplification=True)
    plan, ledger, rows = _run(config, rounds=20, rates=0.2)
    assert np.all(plan.planned_events == 20)
    assert ledger.events.tolist() == [20] * SIZES.size
    assert rows[-1]["privacy/eps_spent_max"] == pytest.approx(3.0, rel=1e-4)
    path = ledger.write(tmp_path)
    for row in read_ledger(path):
        assert row["rounds_accounted"] == row["steps"] == 20 and row["rounds_participated"] < 20
        assert row["unit"] == "client" and row["eps_spent"] == pytest.approx(_direct_eps(row), rel=1e-6)
    row = dict(read_ledger(path)[0])
    row.pop("steps")   # a ledger from before the user unit: `rounds_accounted` counts the events
    assert recompute_eps(row) == pytest.approx(row["eps_spent"], rel=1e-6)
    row.pop("rounds_accounted")
    with pytest.raises(FedscopeError, match="steps"):
        recompute_eps(row)
    # amplification makes the noise much smaller than counting every participation in full
    conservative = plan_privacy(PrivacyConfig(mode="uniform", epsilon=3.0, accountant="rdp"), SIZES, 0.2, 20)
    assert plan.noise_multipliers[0] < 0.6 * conservative.noise_multipliers[0]


def test_adaptive_clipping_plan_and_final_clip(tmp_path):
    config = PrivacyConfig(mode="personalized", epsilon=6.0, clipping="adaptive", clip_bit_fraction=0.2)
    plan, ledger, rows = _run(config, rounds=5, rates=1.0, clip_path=lambda t: np.full(SIZES.size, 1.0 + t))
    np.testing.assert_allclose(plan.update_noise_multipliers, plan.noise_multipliers / math.sqrt(0.8))
    np.testing.assert_allclose(plan.bit_noise, plan.noise_multipliers / math.sqrt(0.2))
    assert rows[-1]["privacy/clip_norm_median"] == 5.0
    rows = read_ledger(ledger.write(tmp_path))
    assert [r["clip_norm"] for r in rows] == [5.0] * SIZES.size
    for k, r in enumerate(rows):  # the ledger's noise multiplier is the effective one (bit folded in)
        assert r["noise_multiplier"] == plan.noise_multipliers[k] < plan.update_noise_multipliers[k]
        assert r["eps_spent"] == pytest.approx(r["eps_target"], rel=1e-4)


def test_central_baseline():
    config = PrivacyConfig(mode="central", epsilon=4.0, accountant="pld")
    plan, ledger, _ = _run(config, rounds=10, rates=np.array([1.0, 0.5, 0.5, 0.5, 0.5, 0.5]))
    assert np.all(plan.update_noise_multipliers == 0)  # no local noise
    z = plan.central_noise_multiplier
    assert np.all(plan.noise_multipliers == z) and np.all(plan.eps_targets == 4.0)
    eps = ledger.finalize_eps()
    assert eps[0] == pytest.approx(4.0, rel=1e-4) and np.all(eps <= 4.0)
    with pytest.raises(FedscopeError, match="central DP-FedAvg baseline uses fixed clipping"):
        PrivacyConfig(mode="central", clipping="adaptive")


def test_off_mode(tmp_path):
    plan, ledger, _ = _run(PrivacyConfig(mode="off"), rounds=3, rates=1.0)
    assert np.all(np.isinf(plan.clip_norms)) and np.all(plan.update_noise_multipliers == 0)
    rows = read_ledger(ledger.write(tmp_path))
    assert all(math.isinf(r["eps_spent"]) and r["accountant"] == "none" for r in rows)
    assert all(math.isinf(recompute_eps(r)) for r in rows)


def test_ledger_shape_errors():
    plan = plan_privacy(PrivacyConfig(mode="uniform"), SIZES, 1.0, 3)
    with pytest.raises(FedscopeError, match="must both have shape"):
        PrivacyLedger(plan, IDS[:3], SIZES)
    with pytest.raises(FedscopeError, match="sampling rate 1.5"):
        plan_privacy(PrivacyConfig(mode="uniform"), SIZES, 1.5, 3)


def test_checkpoint_resume_accounts_exactly_as_an_uninterrupted_run(tmp_path):
    config = PrivacyConfig(mode="personalized", epsilon=3.0, participation_quantile=0.5)
    plan = plan_privacy(config, SIZES, 0.6, 16)
    full = PrivacyLedger(plan, IDS, SIZES)
    first = PrivacyLedger(plan, IDS, SIZES)
    rng = np.random.default_rng(5)
    draws = rng.random((16, SIZES.size)) < 0.6
    for t in range(8):
        for ledger in (full, first):
            ledger.end_round(ledger.begin_round(t) & draws[t])
    resumed = PrivacyLedger(plan, IDS, SIZES)
    resumed.load_state({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in first.state().items()})
    for t in range(8, 16):
        for ledger in (full, resumed):
            ledger.end_round(ledger.begin_round(t) & draws[t])
    assert full.to_table().equals(resumed.to_table())
    assert full.summary() == resumed.summary()
    with pytest.raises(FedscopeError, match="`events` has shape"):
        PrivacyLedger(plan, IDS, SIZES).load_state({**full.state(), "events": np.zeros(3)})
