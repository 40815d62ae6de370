"""Distributed noise under secure aggregation (privacy.mode distributed, user unit): the silos' noise shares sum
to central DP-SGD's noise, the plan and its two epsilons, the secure round against its sequential oracle, and
the settings that would break the central equivalence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from fedscope_jax.cli import main
from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy import accounting, budgets
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.privacy.ledger import PrivacyLedger, check_ledger, read_ledger
from fedscope_jax.privacy.plan import UserSteps, distributed_secagg_bound, plan_privacy
from fedscope_jax.utils.io import read_arrow, write_arrow

TINY = ["--set", "model.dim=8", "--set", "model.blocks=1", "--set", "model.heads=1", "--set", "model.max_len=6",
        "--set", "train.batch_size=8", "--set", "model.loss.num_negatives=10", "--set", "eval.num_negatives=20"]
DIST = ["--privacy", "distributed", "--privacy-unit", "user", "--epsilon", "4", "--clip-norm", "0.5",
        "--client-opt", "sgd", "--client-lr", "0.5"]


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--mode", "federated", "--data", str(data), "--out", str(out), "--clients", "3",
                 "--scheme", "powerlaw", "--rounds", "3", "--eval-every", "3", *DIST, *TINY, *extra])


def _accounted(plan, sizes: np.ndarray, rounds: int, out: Path) -> Path:
    """The ledger of `plan` after `rounds` rounds in which every client took part, written to `out`."""
    ledger = PrivacyLedger(plan, np.arange(sizes.size), sizes)
    for t in range(1, rounds + 1):
        ledger.begin_round(t)
        ledger.end_round(np.ones(sizes.size, bool))
    return ledger.write(out)


def test_distributed_plan_one_rate_one_z_and_the_shares(tmp_path):
    users = np.array([400, 200, 100, 64])
    config = PrivacyConfig(mode="distributed", unit="user", epsilon=4.0, clip_norm=0.5)
    plan = plan_privacy(config, users * 10, 1.0, 30, UserSteps(users, np.ones(4, np.int64), 16, pooled=True))
    q = 4 * 16 / users.sum()
    np.testing.assert_allclose(plan.sampling_rates, q)              # every user at one rate: K B / N
    z = float(plan.noise_multipliers[0])
    assert np.all(plan.noise_multipliers == z) and plan.planned_events.tolist() == [30] * 4
    spent = accounting.epsilon_spent("rdp", z, 30, 1e-5, q, True)
    assert spent <= 4.0 * (1 + 1e-6) and spent == pytest.approx(4.0, rel=1e-2)
    np.testing.assert_allclose(plan.update_noise_multipliers, z / 2)   # each of K = 4 silos: variance z^2 / 4
    np.testing.assert_allclose(plan.colluding_noise_multipliers, z / 2)
    path = _accounted(plan, users * 10, 30, tmp_path)
    rows = read_ledger(path)
    assert check_ledger(path) == []
    colluding = accounting.epsilon_spent("rdp", z / 2, 30, 1e-5, q, True)
    assert all(r["eps_colluding"] == pytest.approx(colluding, rel=1e-9) and r["eps_colluding"] > 3 * r["eps_spent"]
               for r in rows)
    table = read_arrow(path)            # a tampered second epsilon is caught like the first
    forged = table.set_column(table.schema.get_field_index("eps_colluding"), "eps_colluding",
                              [[r["eps_spent"] for r in rows]])
    write_arrow(forged, tmp_path / "forged.arrow")
    assert check_ledger(tmp_path / "forged.arrow") == [0, 1, 2, 3]


def test_personalized_distributed_budgets_clip_each_silo_under_the_one_noise(tmp_path):
    """distributed_budgets personalized: silo k's users get eps_k (mode personalized's allocation) through
    their own clip norm C_k = C z_min / z_k under one noise std sigma = z_min C, so each silo's users are
    protected by sigma / C_k = z_k, calibrated to eps_k at the pooled rate; uniform keeps C for every silo."""
    users = np.array([400, 200, 100, 64])
    steps = UserSteps(users, np.ones(4, np.int64), 16, pooled=True)
    config = PrivacyConfig(mode="distributed", unit="user", epsilon=4.0, clip_norm=0.5,
                           distributed_budgets="personalized")
    plan = plan_privacy(config, users * 10, 1.0, 30, steps)
    eps = budgets.personalized_epsilons(users * 10, 4.0)
    np.testing.assert_allclose(plan.eps_targets, eps)
    assert eps[0] > eps[1] > eps[2] > eps[3]
    q = 4 * 16 / users.sum()
    z = np.asarray(plan.noise_multipliers)
    for k in range(4):
        spent = accounting.epsilon_spent("rdp", float(z[k]), 30, 1e-5, q, True)
        assert spent <= eps[k] * (1 + 1e-6) and spent == pytest.approx(eps[k], rel=1e-2)
    clip = np.asarray(plan.clip_norms)
    assert clip[0] == pytest.approx(0.5) and np.all(np.diff(clip) < 0)      # the largest budget clips at C
    np.testing.assert_allclose(clip * z, 0.5 * z[0])                         # one sigma for every silo
    np.testing.assert_allclose(clip * plan.update_noise_multipliers, 0.5 * z[0] / 2)   # K = 4 shares of it
    np.testing.assert_allclose(plan.colluding_noise_multipliers, z / 2)
    # the secure sum's range: lr C max(2 cap, cap + 6 sigma / (sqrt(K) C)), sigma from z_min, not z_max
    assert distributed_secagg_bound(plan, 0.5, 1, 16) == pytest.approx(0.5 * 0.5 * (1 + 6 * z[0] / 2) / 16)
    path = _accounted(plan, users * 10, 30, tmp_path)
    rows = read_ledger(path)
    assert check_ledger(path) == []
    assert [r["clip_norm"] for r in rows] == pytest.approx(clip.tolist())
    assert [r["eps_spent"] for r in rows] == pytest.approx(eps.tolist(), rel=1e-2)
    uniform = plan_privacy(PrivacyConfig(mode="distributed", unit="user", epsilon=4.0, clip_norm=0.5),
                           users * 10, 1.0, 30, steps)
    np.testing.assert_allclose(uniform.clip_norms, 0.5)
    np.testing.assert_allclose(uniform.noise_multipliers, uniform.noise_multipliers[0])
    with pytest.raises(FedscopeError, match=r"privacy.distributed_budgets: 'personalized' allocates the budgets "
                                            r"of mode distributed; got mode 'uniform'"):
        PrivacyConfig(mode="uniform", unit="user", distributed_budgets="personalized")


def test_other_modes_have_eps_colluding_equal_to_eps_spent(tmp_path):
    users = np.array([100, 64])
    plan = plan_privacy(PrivacyConfig(mode="uniform", unit="user", epsilon=2.0), users, 1.0, 3,
                        UserSteps(users, np.array([7, 4]), 16))
    ledger = PrivacyLedger(plan, np.arange(2), users)
    ledger.begin_round(1)
    ledger.end_round(np.ones(2, bool))
    rows = read_ledger(ledger.write(tmp_path))
    assert all(r["eps_colluding"] == r["eps_spent"] and r["noise_multiplier_colluding"] == r["noise_multiplier"]
               for r in rows)


def test_distributed_refuses_what_breaks_the_central_equivalence():
    with pytest.raises(FedscopeError, match=r"privacy.mode: .*use --privacy-unit user"):
        PrivacyConfig(mode="distributed")
    with pytest.raises(FedscopeError, match=r"4 silos x train.batch_size=64 .* exceed the 200 users"):
        UserSteps(np.array([50, 50, 50, 50]), np.ones(4, np.int64), 64, pooled=True).rates()
    users = np.array([100, 64])
    with pytest.raises(FedscopeError, match=r"every silo takes part in every round"):
        plan_privacy(PrivacyConfig(mode="distributed", unit="user"), users, 0.5, 3,
                     UserSteps(users, np.ones(2, np.int64), 16, pooled=True))


@pytest.mark.parametrize("flags, message", [
    (["--client-opt", "adam"], "must be linear in its noised gradient"),
    (["--local-epochs", "2"], "got --local-epochs 2"),
    (["--fraction", "0.5"], "every silo adds its noise share every round"),
    (["--chunk-size", "2"], "secure sum of all 3 silos in one chunk"),
])
def test_bad_distributed_settings_are_refused_before_anything_is_written(tiny_dataset, tmp_path, capsys, flags,
                                                                         message):
    run = tmp_path / "run"
    assert _train(tiny_dataset, run, *flags) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def _context(tiny_dataset: Path, *sets: str):
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    base = [s for s in TINY if s != "--set"] + ["privacy.unit=user", "privacy.mode=distributed",
                                                 "privacy.clip_norm=0.5", "federated.clients=3",
                                                 "federated.client_opt=sgd", "federated.client_lr=0.5"]
    cfg = load_config(None, base + list(sets))
    return cfg, seed_context(load_dataset(tiny_dataset), cfg)


def _round(ctx, cohorts, secagg_bound: float, sequential: bool = False, mapped: bool = False):
    """One round: the vmapped chunk, the chunk's silos one after another in the program (`mapped`:
    EngineConfig.sequential), or the sequential oracle (SequentialRunner)."""
    from fedscope_jax.engine.round import EngineConfig, SequentialRunner, make_round_fn
    from fedscope_jax.engine.server import init_server_state, server_optimizer

    opt = server_optimizer("fedavg", 1.0)
    ecfg = EngineConfig(chunk_size=4, secagg_bound=secagg_bound, secagg_neighbors=None, sequential=mapped)
    state = init_server_state(ctx.params, opt)
    runner = SequentialRunner(ctx.client_cfg, opt, ecfg) if sequential else make_round_fn(ctx.client_cfg, opt,
                                                                                          ecfg, donate=False)
    return runner(state, cohorts, jax.random.key(4))


def _cohorts(ctx, session, shards, noise: bool = True):
    """The three silos' cohort with the session's C_k and z_k (z_k zeroed without `noise`)."""
    from fedscope_jax.engine.cohort import build_cohorts, plan_buckets

    clip, z = session.round_vectors(np.arange(3))
    cohorts, _ = build_cohorts(shards, range(3), plan_buckets(shards, 1), {}, clip=clip,
                               noise_multiplier=z if noise else 0 * z, multiple=4)
    return cohorts


def _leaves_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                     jax.tree.leaves(b)))


@pytest.mark.parametrize("budgets_", ["uniform", "personalized"])
def test_the_silos_shares_sum_to_the_central_noise(tiny_dataset, budgets_):
    """With every sampled user removed, a round's update is pure noise: the mean of K silos' one-step updates
    -lr n_k / B with n_k ~ N(0, z^2 C^2 / K) has std lr z C / (K B), central DP-SGD's noise over the union's
    expected batch K B; the secure sum changes it by quantization only. With personalized budgets each silo
    applies z_k / sqrt(K) to its own C_k, and the shares still sum to the one sigma = z_min C."""
    cfg, ctx = _context(tiny_dataset, f"privacy.distributed_budgets={budgets_}")
    session = ctx.session(cfg.privacy)
    if budgets_ == "personalized":   # the silos' z_k differ enough that noise on C instead of C_k would show
        zk = np.asarray(session.plan.noise_multipliers)
        assert np.sqrt(np.mean(zk ** 2)) > 1.2 * zk.min()
    shards = [ctx.source(0, c) for c in range(3)]
    for s in shards:
        s.batch["user_mask"][:] = False
    state, metrics = _round(ctx, _cohorts(ctx, session, shards), session.secagg_bound())
    flat = np.concatenate([(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ctx.params))])
    z = float(np.min(session.plan.noise_multipliers))
    assert flat.size > 2000   # the std of 2,000 draws is within 6% with probability > 1 - 1e-4
    assert flat.std() == pytest.approx(0.5 * z * 0.5 / (3 * 8), rel=0.06)
    assert flat.std() != pytest.approx(0.5 * z * 0.5 / (math.sqrt(3) * 8), rel=0.3)   # not one silo's share
    from fedscope_jax.privacy import secagg

    params = secagg.make_params(4, session.secagg_bound(), neighbors=None)   # one group: the chunk of 4 rows
    error = float(metrics.secagg_error)          # on the sum of the 3 silos' updates, whose noise std is 3 x
    assert 0 < error <= secagg.error_bound(3, params, 1.0) and error < 0.01 * 3 * flat.std()


@pytest.mark.parametrize("budgets_", ["uniform", "personalized"])
def test_distributed_round_equals_its_sequential_oracle(tiny_dataset, budgets_):
    cfg, ctx = _context(tiny_dataset, f"privacy.distributed_budgets={budgets_}")
    session = ctx.session(cfg.privacy)
    assert session.noise_mode == "off" and session.secagg_bound() > 0
    assert ctx.user_steps.pooled and ctx.user_steps.steps_per_round.tolist() == [1, 1, 1]
    cohorts = _cohorts(ctx, session, [ctx.source(0, c) for c in range(3)])
    vm, _ = _round(ctx, cohorts, session.secagg_bound())
    seq, _ = _round(ctx, cohorts, session.secagg_bound(), sequential=True)
    assert _leaves_diff(vm.params, seq.params) < 1e-6 and _leaves_diff(vm.params, ctx.params) > 1e-3
    # the one chunk of every silo run one silo after another (what the round loop compiles for distributed
    # noise: each silo computes its own users only) is the same round
    mapped, _ = _round(ctx, cohorts, session.secagg_bound(), mapped=True)
    assert _leaves_diff(mapped.params, vm.params) < 1e-6
    from fedscope_jax.train.loop import Track, make_groups

    (dist,) = make_groups([Track(Path("unused"), session)], cfg.federated, devices=1)
    (plain,) = make_groups([Track(Path("unused"))], cfg.federated, devices=1)
    assert dist.engine_config(3).sequential and not plain.engine_config(3).sequential
    # a distributed sweep's eps-inf point trains on the pooled batches without noise: one silo after another too
    (inf,) = make_groups([Track(Path("unused"))], cfg.federated, devices=1, pooled=True)
    assert inf.engine_config(3).sequential


def test_each_silo_clips_its_users_to_its_own_clip_norm(tiny_dataset):
    """Personalized budgets: silo k's update, without noise and with one sampled user whose gradient is longer
    than any C_k, is -lr C_k u / B with |u| = 1, so its norm is lr C_k / B: the engine applies each silo's C_k
    (with one C for every silo, as with uniform budgets, the three norms would be equal)."""
    cfg, ctx = _context(tiny_dataset, "privacy.distributed_budgets=personalized", "privacy.clip_norm=0.1")
    session = ctx.session(cfg.privacy)
    shards = [ctx.source(0, c) for c in range(3)]
    for s in shards:
        first = s.batch["user_mask"][:, :1].copy()
        assert first.all()                        # every silo drew a user into the first slot
        s.batch["user_mask"][:] = False
        s.batch["user_mask"][:, :1] = first
    clip, _ = session.round_vectors(np.arange(3))
    _, metrics = _round(ctx, _cohorts(ctx, session, shards, noise=False), session.secagg_bound())
    report = metrics.reports[0]
    norms = {int(i): float(n) for i, n, ok in zip(report.client_id, report.norm, report.included) if ok}
    assert sorted(norms) == [0, 1, 2] and np.min(np.diff(np.sort(clip))) > 0.01 * np.max(clip)
    for k in range(3):
        assert norms[k] == pytest.approx(0.5 * float(clip[k]) / 8, rel=1e-3)   # float32: new - old params


def test_distributed_run_writes_both_epsilons(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert _train(tiny_dataset, run) == 0
    summary = json.loads((run / "summary.json").read_text())["privacy"]
    assert summary["mode"] == "distributed" and summary["silos"] == 3 and summary["secagg_bound"] > 0
    rows = read_ledger(run / "privacy_ledger.arrow")
    assert check_ledger(run / "privacy_ledger.arrow") == []
    z = rows[0]["noise_multiplier"]
    assert all(r["steps"] == 3 and r["noise_multiplier"] == z for r in rows)
    assert all(r["noise_multiplier_colluding"] == pytest.approx(z / math.sqrt(3)) for r in rows)
    assert summary["eps_colluding_max"] == pytest.approx(rows[0]["eps_colluding"])
    assert rows[0]["eps_colluding"] > rows[0]["eps_spent"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["clients"] == 3 and m["real_steps"] == 3 and "secagg_max_abs_error" in m for m in metrics)


def test_a_distributed_sweep_takes_personalized_budgets(tiny_dataset, tmp_path, capsys):
    """`fedscope sweep --privacy distributed --distributed-budgets personalized`: the vmapped program of two
    epsilons trains each as its single run does (the same C_k applied), and writes each silo's eps_k and C_k in
    its ledger; the eps-inf point drops the option; with other modes it is refused before anything is
    written."""
    from flax import serialization

    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.sweep import sweep_points

    out = tmp_path / "sweep"
    common = ["--data", str(tiny_dataset), "--clients", "3", "--scheme", "powerlaw", "--rounds", "2",
              "--eval-every", "2", "--privacy-unit", "user", "--client-opt", "sgd", "--client-lr", "0.5",
              "--clip-norm", "0.5", "--distributed-budgets", "personalized", *TINY]
    args = ["sweep", "--out", str(out), "--epsilons", "2,4", *common]
    assert main(args + ["--privacy", "personalized,uniform"]) == 2
    assert "allocates the budgets of mode distributed; got mode 'personalized'" in capsys.readouterr().err
    assert not out.exists()
    assert main(args + ["--privacy", "distributed"]) == 0
    ledger = out / "distributed-eps4-seed0" / "privacy_ledger.arrow"
    rows = read_ledger(ledger)
    assert check_ledger(ledger) == []
    assert len({r["eps_target"] for r in rows}) == 3 and all(r["steps"] == 2 for r in rows)
    assert max(r["clip_norm"] for r in rows) == pytest.approx(0.5) and min(r["clip_norm"] for r in rows) < 0.45
    assert len({round(r["clip_norm"] * r["noise_multiplier"], 9) for r in rows}) == 1   # one sigma
    single = tmp_path / "single"
    assert main(["train", "--mode", "federated", "--out", str(single), "--privacy", "distributed", "--epsilon",
                 "4", *common]) == 0
    a = serialization.msgpack_restore((out / "distributed-eps4-seed0" / "params.msgpack").read_bytes())
    b = serialization.msgpack_restore((single / "params.msgpack").read_bytes())
    assert _leaves_diff(a, b) < 1e-5
    assert [r["clip_norm"] for r in read_ledger(single / "privacy_ledger.arrow")] == pytest.approx(
        [r["clip_norm"] for r in rows])
    cfg = load_config(None, [s for s in TINY if s != "--set"] + ["privacy.unit=user", "privacy.mode=distributed",
                                                                 "privacy.distributed_budgets=personalized",
                                                                 "federated.client_opt=sgd"])
    off = sweep_points(cfg, ["distributed"], [4.0, math.inf], [0])[1].cfg.privacy
    assert (off.mode, off.distributed_budgets) == ("off", "uniform")
    with pytest.raises(FedscopeError, match="got mode 'off'"):
        PrivacyConfig(mode="off", distributed_budgets="personalized")


def test_the_eps_inf_point_of_a_distributed_sweep_trains_its_batches_alone_too(tiny_dataset, tmp_path):
    """`--privacy distributed --epsilons inf` alone trains what the eps-inf point of a distributed sweep with a
    finite epsilon trains: one pooled step a round in every silo without clipping or noise (not a local epoch)."""
    from flax import serialization

    common = ["--data", str(tiny_dataset), "--clients", "3", "--scheme", "powerlaw", "--rounds", "2",
              "--eval-every", "2", "--privacy-unit", "user", "--client-opt", "sgd", "--client-lr", "0.5",
              "--privacy", "distributed", *TINY]
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert main(["sweep", "--out", str(both), "--epsilons", "4,inf", *common]) == 0
    assert main(["sweep", "--out", str(alone), "--epsilons", "inf", *common]) == 0
    runs = [d / "distributed-epsinf-seed0" for d in (both, alone)]
    for run in runs:
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["real_steps"] for m in metrics] == [3, 3]   # one step a round in each of the 3 silos
        # its silos run one after another, as the private point's do: vmapped, each would compute the padded
        # batch of the largest silo's pooled draw
        program = json.loads((run / "summary.json").read_text())["federated"]["program"]
        assert program["sequential"] and program["noise_mode"] == "off"
    a, b = (serialization.msgpack_restore((run / "params.msgpack").read_bytes()) for run in runs)
    assert _leaves_diff(a, b) < 1e-6


def test_an_eps_inf_distributed_sweep_is_refused_what_the_variant_refuses():
    """Its eps-inf point trains the variant's batches, so the variant's settings are checked for it too, before
    anything is written (sweep_points)."""
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.sweep import sweep_points

    base = [s for s in TINY if s != "--set"] + ["privacy.unit=user", "privacy.mode=distributed",
                                                 "federated.clients=3", "federated.client_lr=0.5"]
    assert len(sweep_points(load_config(None, base + ["federated.client_opt=sgd"]), ["distributed"],
                            [math.inf], [0])) == 1
    with pytest.raises(FedscopeError, match="must be linear in its noised gradient"):
        sweep_points(load_config(None, base + ["federated.client_opt=adam"]), ["distributed"], [math.inf], [0])
