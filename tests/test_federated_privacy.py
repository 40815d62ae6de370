"""Privacy wired into federated training: ledger, budget stops, central DP-FedAvg, resume, secure aggregation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedscope_jax.errors import FedscopeError

from conftest import SETTINGS, linear_setup as _linear_setup


def _session(mode: str, sizes, fcfg, **kw):
    from fedscope_jax.privacy.config import PrivacyConfig
    from fedscope_jax.privacy.session import PrivacySession

    return PrivacySession(PrivacyConfig(mode=mode, **kw), sizes, fcfg.sampling, fcfg.fraction, fcfg.rounds,
                          fcfg.seed)


def test_cli_personalized_run_writes_a_recomputable_ledger(tmp_path: Path):
    from fedscope_jax.cli import main
    from fedscope_jax.privacy.ledger import check_ledger, read_ledger
    from model_helpers import write_tiny

    ds = write_tiny(tmp_path / "ds", users=40)
    run = tmp_path / "run"
    args = ["train", "--mode", "federated", "--data", str(ds.path), "--out", str(run), "--clients", "4",
            "--rounds", "3", "--chunk-size", "2", "--eval-every", "3", "--privacy", "personalized",
            "--epsilon", "4"]
    assert main(args + [a for s in SETTINGS for a in ("--set", s)]) == 0
    path = run / "privacy_ledger.arrow"
    assert check_ledger(path, rtol=1e-6) == []
    rows = read_ledger(path)
    assert len(rows) == 4 and all(r["accountant"] == "rdp" and r["delta"] == 1e-5 for r in rows)
    assert all(r["rounds_participated"] == 3 for r in rows)  # fraction 1: every client every round
    assert all(r["rounds_accounted"] == r["rounds_participated"] for r in rows)  # no amplification
    eps = np.array([r["eps_spent"] for r in rows])
    assert np.all(eps <= np.array([r["eps_target"] for r in rows]) * (1 + 1e-9))
    sizes = np.array([r["n_examples"] for r in rows])
    assert np.all(np.diff(np.array([r["eps_target"] for r in rows])[np.argsort(sizes)]) >= -1e-12)  # monotone
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["mode"] == "personalized" and summary["privacy"]["clients_over_target"] == 0
    assert summary["privacy"]["eps_spent_max"] == pytest.approx(eps.max())
    # a private run tests its final round (no selection on the clients' held-out data)
    tr = summary["training"]
    assert (tr["selection"], tr["rounds_run"], tr["best_round"], tr["stopped_early"]) == ("final", 3, None, False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["privacy/participants"] for x in lines] == [4, 4, 4]
    assert lines[-1]["privacy/eps_spent_max"] == pytest.approx(eps.max(), rel=1e-9)
    # noise of the mean update: sqrt(sum_k (z_k C_k)^2) / K with C_k = 1 (the sum mode's one draw)
    z = np.array([r["noise_multiplier"] for r in rows])
    assert lines[0]["noise_std"] == pytest.approx(math.sqrt(np.sum(z**2)) / 4, rel=1e-5)


def test_cli_refuses_conflicting_engine_knobs(tmp_path: Path):
    from fedscope_jax.cli import main
    from model_helpers import write_tiny

    ds = write_tiny(tmp_path / "ds", users=12)
    base = ["train", "--mode", "federated", "--data", str(ds.path), "--clients", "2", "--rounds", "1"]
    assert main(base + ["--out", str(tmp_path / "a"), "--noise-multiplier", "0.5", "--clip", "1",
                        "--noise-mode", "sum"]) == 2  # personalized is the default: z comes from the plan
    assert main(base + ["--out", str(tmp_path / "b"), "--privacy", "uniform", "--clip", "1"]) == 2
    assert main(base + ["--out", str(tmp_path / "c"), "--privacy", "personalized", "--amplification"]) == 2


def test_amplification_needs_poisson_sampling():
    from fedscope_jax.train.federated_config import FederatedConfig

    sizes = np.array([10, 20, 40])
    with pytest.raises(FedscopeError, match="--sampling poisson"):
        _session("personalized", sizes, FederatedConfig(clients=3, fraction=0.5), amplification=True)
    session = _session("personalized", sizes, FederatedConfig(clients=3, fraction=0.5, sampling="poisson", rounds=3),
                       amplification=True)
    assert session.plan.amplification and np.all(session.plan.sampling_rates == 0.5)


def test_a_client_out_of_budget_stops_participating(tmp_path: Path):
    from fedscope_jax.privacy.ledger import check_ledger, read_ledger
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import run_rounds

    source, params, ccfg, sizes = _linear_setup(n_clients=6)
    fcfg = FederatedConfig(clients=6, sampling="poisson", fraction=0.5, rounds=10, chunk_size=2, max_buckets=1,
                           seed=3)
    # calibrated for the median number of participations: clients sampled more often must be stopped
    session = _session("uniform", sizes, fcfg, epsilon=3.0, participation_quantile=0.5)
    _, records, facts = run_rounds(tmp_path, source, 6, params, ccfg, fcfg, privacy=session)
    stopped = facts["privacy"]["stopped_clients"]
    assert stopped, "with participation_quantile 0.5 some client must exhaust its budget in 10 rounds"
    rows = {r["client_id"]: r for r in read_ledger(tmp_path / "privacy_ledger.arrow")}
    planned = session.plan.planned_events
    for s in stopped:
        k, t = s["client_id"], s["round"]
        assert rows[k]["rounds_participated"] == planned[k]  # exactly its calibrated events, then no more
        assert all(k not in r["participant_ids"] for r in records if r["round"] >= t)
        assert any(k in r["privacy/newly_stopped"] for r in records if r["round"] == t)
    assert all(r["eps_spent"] <= r["eps_target"] * (1 + 1e-9) for r in rows.values())
    assert check_ledger(tmp_path / "privacy_ledger.arrow") == []
    assert facts["privacy"]["clients_over_target"] == 0


def test_central_dp_fedavg_adds_one_noise_draw_with_public_denominator(tmp_path: Path):
    import jax

    from fedscope_jax.privacy.ledger import check_ledger
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import run_rounds

    source, params, ccfg, sizes = _linear_setup(n_clients=6)
    fcfg = FederatedConfig(clients=6, fraction=0.5, rounds=3, chunk_size=3, max_buckets=1, seed=1)
    session = _session("central", sizes, fcfg, epsilon=5.0, clip_norm=0.3)
    assert session.noise_mode == "central"
    z = session.plan.central_noise_multiplier
    assert z > 0 and np.all(session.plan.update_noise_multipliers == 0)
    state, records, facts = run_rounds(tmp_path, source, 6, params, ccfg, fcfg, privacy=session)
    assert all(r["clients"] == 3 for r in records)
    # one draw of std z * C * max_k w_k (w = 1) on the sum, divided by the sampled weight 3
    assert all(r["noise_std"] == pytest.approx(z * 0.3 / 3, rel=1e-6) for r in records)
    assert check_ledger(tmp_path / "privacy_ledger.arrow") == []
    assert facts["privacy"]["central_noise_multiplier"] == pytest.approx(z)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_central_noise_std_of_the_aggregate():
    # zero updates: the mean update is pure central noise with std z C max_k w_k / sum_k w_k
    import jax
    import jax.numpy as jnp
    import optax

    from fedscope_jax.engine.aggregate import finalize, zeros_accumulator
    from fedscope_jax.engine.cohort import Cohort
    from fedscope_jax.engine.round import central_inputs

    w = jnp.array([1.0, 2.0, 0.5, 0.0])
    cohort = Cohort(None, jnp.arange(4), w, jnp.full(4, 0.7), jnp.full(4, 1.3))
    std, denom = central_inputs((cohort,))
    assert float(std) == pytest.approx(1.3 * 0.7 * 2.0) and float(denom) == pytest.approx(3.5)
    acc = zeros_accumulator({"w": jnp.zeros(200_000)})
    mean, reported = finalize(acc, jax.random.key(0), "central", std, denom)
    assert float(np.std(np.asarray(mean["w"]))) == pytest.approx(1.3 * 0.7 * 2.0 / 3.5, rel=0.01)
    assert float(reported) == pytest.approx(1.3 * 0.7 * 2.0 / 3.5, rel=1e-6)
    del optax


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_private_resume_equals_uninterrupted(tmp_path: Path, clipping: str):
    import jax

    from fedscope_jax.privacy.ledger import read_ledger
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import run_rounds

    source, params, ccfg, sizes = _linear_setup(n_clients=6)
    fcfg = FederatedConfig(clients=6, sampling="poisson", fraction=0.6, rounds=5, chunk_size=2, max_buckets=1,
                           checkpoint_every=1, seed=7)
    kw = dict(epsilon=6.0, participation_quantile=0.5, clipping=clipping, clip_norm=0.5)
    full_state, full, _ = run_rounds(tmp_path / "full", source, 6, params, ccfg, fcfg,
                                     privacy=_session("personalized", sizes, fcfg, **kw))
    # an interrupted run: the same run with its last checkpoint (round 5) removed, resumed from round 4
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "checkpoints" / "5")
    (cut / "privacy_ledger.arrow").unlink()
    state, resumed, facts = run_rounds(cut, source, 6, params, ccfg, fcfg, resume=True,
                                       privacy=_session("personalized", sizes, fcfg, **kw))
    assert facts["start_round"] == 4
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(full)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert read_ledger(cut / "privacy_ledger.arrow") == read_ledger(tmp_path / "full" / "privacy_ledger.arrow")
    if clipping == "adaptive":
        clips = [r["clip_norm"] for r in read_ledger(cut / "privacy_ledger.arrow")]
        assert not np.allclose(clips, 0.5)  # adaptive clipping moved C_k, and the resumed run agrees


def test_resume_without_privacy_state_is_an_error(tmp_path: Path):
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import run_rounds

    source, params, ccfg, sizes = _linear_setup(n_clients=4)
    fcfg = FederatedConfig(clients=4, rounds=2, chunk_size=2, max_buckets=1)
    run_rounds(tmp_path, source, 4, params, ccfg, fcfg, privacy=_session("uniform", sizes, fcfg))
    (tmp_path / "privacy_state.json").unlink()
    with pytest.raises(FedscopeError, match="privacy ledger state"):
        run_rounds(tmp_path, source, 4, params, ccfg, fcfg, resume=True, privacy=_session("uniform", sizes, fcfg))


@pytest.mark.parametrize("noise_mode", ["off", "per_client", "central"])
def test_secagg_round_equals_plain_round_within_the_quantization_bound(noise_mode: str):
    import jax
    import jax.numpy as jnp
    import optax

    from fedscope_jax.engine.cohort import build_cohorts, plan_buckets
    from fedscope_jax.engine.round import EngineConfig, make_round_fn
    from fedscope_jax.engine.server import init_server_state, server_optimizer
    from fedscope_jax.privacy import secagg

    source, params, ccfg, _ = _linear_setup(n_clients=8, dim=300)
    shards = {c: source(0, c) for c in range(8)}
    plan = plan_buckets(list(shards.values()), 2)
    ids = np.array([0, 1, 2, 4, 5, 6, 7])
    clip = np.full(7, 0.4, np.float32)
    clip[2] = 0.05
    z = np.full(7, 0.0 if noise_mode == "off" else 0.8, np.float32)
    cohorts, _ = build_cohorts(shards, ids, plan, {}, clip=clip, noise_multiplier=z, multiple=4)
    opt = server_optimizer("fedavg", 1.0)
    bound = 0.4 * (1 + 6 * 0.8)
    key = jax.random.key(5)
    plain_state, plain = make_round_fn(ccfg, opt, EngineConfig(4, noise_mode), donate=False)(
        init_server_state(params, opt), cohorts, key)
    sec_state, sec = make_round_fn(ccfg, opt, EngineConfig(4, noise_mode, bound, 2), donate=False)(
        init_server_state(params, opt), cohorts, key)
    assert plain.secagg_error is None
    # per chunk of 4 clients: at most one quantization step B/L per delivered client and coordinate
    step = secagg.make_params(4, bound).step
    per_coord = 7 * step + 1e-5
    err = float(sec.secagg_error)
    assert 0 < err <= per_coord
    for a, b in zip(jax.tree.leaves(sec_state.params), jax.tree.leaves(plain_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=per_coord / 7 + 1e-6, rtol=0)
    assert float(sec.noise_std) == pytest.approx(float(plain.noise_std))
    for ra, rb in zip(sec.reports, plain.reports):
        np.testing.assert_array_equal(np.asarray(ra.included), np.asarray(rb.included))
    del jnp, optax


def test_secagg_run_reports_the_aggregation_error(tmp_path: Path):
    from fedscope_jax.privacy.ledger import check_ledger
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import run_rounds

    source, params, ccfg, sizes = _linear_setup(n_clients=4, dim=50)
    fcfg = FederatedConfig(clients=4, rounds=2, chunk_size=2, max_buckets=1)
    session = _session("uniform", sizes, fcfg, epsilon=8.0, secagg=True)
    assert session.noise_mode == "per_client" and session.secagg_bound() > 0
    _, records, facts = run_rounds(tmp_path, source, 4, params, ccfg, fcfg, privacy=session)
    step = facts["privacy"]["secagg_bound"] / 32768
    assert all(0 < r["secagg_max_abs_error"] <= 4 * step * 1.001 + 1e-6 for r in records)  # one step per client
    assert check_ledger(tmp_path / "privacy_ledger.arrow") == []
    one = FederatedConfig(clients=4, rounds=2, chunk_size=1, max_buckets=1)
    with pytest.raises(FedscopeError, match="--chunk-size 1"):
        run_rounds(tmp_path / "one", source, 4, params, ccfg, one,
                   privacy=_session("uniform", sizes, one, secagg=True))


def test_privacy_config_file_and_flags(tmp_path: Path):
    import argparse

    from fedscope_jax.cli.flags import add_federated_arguments, apply_flags
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import check_privacy_knobs

    parser = argparse.ArgumentParser()
    add_federated_arguments(parser)

    def resolve(path, *argv, overrides=()):
        cfg = apply_flags(load_config(path, overrides), parser.parse_args(list(argv)))
        check_privacy_knobs(cfg)
        return cfg

    cfg_file = tmp_path / "p.json"
    cfg_file.write_text(json.dumps({"privacy": {"mode": "uniform", "epsilon": 3, "clipping": "adaptive"},
                                    "federated": {"rounds": 7}}))
    cfg = resolve(cfg_file, "--epsilon", "5")
    p = cfg.privacy
    assert (p.mode, p.epsilon, p.clipping, p.secagg, cfg.federated.rounds) == ("uniform", 5.0, "adaptive", False, 7)
    assert resolve(cfg_file, "--rounds", "2").federated.rounds == 2
    assert resolve(cfg_file, overrides=["privacy.eps_max=null", "privacy.eps_min=1"]).privacy.eps_min == 1.0
    assert resolve(None).privacy.mode == "personalized"
    raw = resolve(None, "--privacy", "off", "--clip", "1", "--noise-multiplier", "0.5", "--noise-mode", "sum")
    assert raw.privacy.mode == "off" and raw.federated.noise_mode == "sum"
    with pytest.raises(FedscopeError, match="--noise-multiplier"):
        resolve(None, "--privacy", "central", "--noise-multiplier", "0.5")
    with pytest.raises(FedscopeError, match="--noise-mode"):
        resolve(None, "--noise-mode", "per_client")
    cfg_file.write_text(json.dumps({"privacy": {"epsilon": -1}}))
    with pytest.raises(FedscopeError, match="p.json: privacy.epsilon"):
        resolve(cfg_file)
    cfg_file.write_text(json.dumps({"federated": {"seed": 3}}))
    with pytest.raises(FedscopeError, match="train.seed"):
        resolve(cfg_file)
    assert resolve(None, overrides=["train.seed=4"]).federated.seed == 4
