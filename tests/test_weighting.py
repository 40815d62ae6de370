"""federated.weighting: each client's weight w_k in the server's mean sum_k w_k delta_k / sum_k w_k (uniform,
users, inverse_noise), from public inputs; where it is refused; and that the round averages with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from fedscope_jax.errors import FedscopeError

TINY = ["model.dim=8", "model.blocks=1", "model.heads=1", "model.max_len=6", "train.batch_size=8",
        "model.loss.num_negatives=10", "eval.num_negatives=20", "federated.clients=3", "federated.rounds=1",
        "federated.chunk_size=1", "federated.server_opt=fedavg", "federated.server_lr=1.0",
        "federated.client_opt=sgd", "federated.client_lr=0.5", "federated.local_steps=1"]
USER = ["privacy.mode=personalized", "privacy.unit=user", "privacy.epsilon=4", "privacy.clip_norm=0.5"]


def _context(data: Path, *sets: str):
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    cfg = load_config(None, [*TINY, *USER, *sets])
    return cfg, seed_context(load_dataset(data), cfg)


def _round_update(ctx, cfg, out: Path, weights) -> np.ndarray:
    """The server's one-round update (FedAvg, lr 1: the weighted mean of the clients' deltas), flattened."""
    from fedscope_jax.train.loop import Track, run_tracks

    out.mkdir(parents=True)
    track = Track(out, ctx.session(cfg.privacy), weights=weights)
    states, _, _ = run_tracks([track], ctx.source, ctx.n_clients, ctx.params, ctx.client_cfg, cfg.federated)
    new, old = jax.tree.leaves(states[0].params), jax.tree.leaves(ctx.params)
    return np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64)) for a, b in zip(new, old)])


def test_the_round_is_the_weighted_mean_of_the_silos_noised_updates(tiny_dataset: Path, tmp_path: Path):
    """Each silo's update (DP-SGD, its own noise) does not depend on the weights, so the mean under weights w
    satisfies (sum w) m_w = sum_k w_k delta_k: three runs give the deltas, a fourth must match their weighted
    mean. Ignoring the weights (or normalizing by the client count) fails it."""
    cfg, ctx = _context(tiny_dataset)
    runs = {name: _round_update(ctx, cfg, tmp_path / name, np.asarray(w, np.float64))
            for name, w in (("a", (1, 1, 1)), ("b", (2, 1, 1)), ("c", (1, 2, 1)), ("d", (5, 1, 3)))}
    d1 = 4 * runs["b"] - 3 * runs["a"]
    d2 = 4 * runs["c"] - 3 * runs["a"]
    d3 = 3 * runs["a"] - d1 - d2
    assert min(np.abs(d1 - d2).max(), np.abs(d1 - d3).max()) > 1e-4   # the silos' updates differ
    np.testing.assert_allclose(9 * runs["d"], 5 * d1 + d2 + 3 * d3, atol=2e-5 * np.abs(d1).max())


def test_the_weights_are_the_silos_public_sizes_or_inverse_noise_variances(tiny_dataset: Path):
    """users: n_k (the user unit's silo sizes; without DP the partition's); inverse_noise: 1 / (z_k C_k)^2 scaled
    so the largest is 1 (the engine's noise per step of silo k is z_k C_k / B, tests/test_privacy_user.py)."""
    from fedscope_jax.train.federated import aggregation_weights

    cfg, ctx = _context(tiny_dataset, "federated.weighting=users")
    users = ctx.user_steps.users
    assert len(set(users.tolist())) == 3   # power-law silos of different sizes
    np.testing.assert_array_equal(aggregation_weights(ctx, cfg.privacy, ctx.session(cfg.privacy)), users)
    off = aggregation_weights(ctx, dataclasses.replace(cfg.privacy, mode="off"), None)
    np.testing.assert_array_equal(off, ctx.part.sizes(ctx.ds)["users"])
    cfg, ctx = _context(tiny_dataset, "federated.weighting=inverse_noise")
    session = ctx.session(cfg.privacy)
    sigma = np.asarray(session.plan.update_noise_multipliers, np.float64) * session.ledger.clip_norms
    assert len(set(np.round(sigma, 6))) == 3   # personalized: unequal noise, so the weights matter
    np.testing.assert_allclose(aggregation_weights(ctx, cfg.privacy, session), (sigma.min() / sigma) ** 2)
    # a configuration without noise (eps inf in a sweep): every silo's noise is equal, the weights too
    assert aggregation_weights(ctx, dataclasses.replace(cfg.privacy, mode="off"), None) is None


def test_weights_land_on_their_clients_rows():
    from fedscope_jax.engine.cohort import ClientShard, build_cohorts, plan_buckets
    from fedscope_jax.engine.sweep import config_vectors

    shards = [ClientShard({"x": np.ones((n, 2, 1), np.float32)}, step_mask=np.ones(n, bool)) for n in (1, 2, 2)]
    cohorts, _ = build_cohorts(shards, [0, 1, 2], plan_buckets(shards, 1), {}, multiple=4, nice=False)
    ids = np.array([2, 0])
    (cohort,) = config_vectors(cohorts, 3, [(ids, np.inf, 0.0, np.array([3.0, 0.5]))], stacked=False)
    rows = np.asarray(cohort.client_id)
    got = {int(c): float(w) for c, w in zip(rows, np.asarray(cohort.weight)) if c >= 0}
    assert got == {0: 0.5, 1: 0.0, 2: 3.0} and np.all(np.asarray(cohort.weight)[rows < 0] == 0)
    with pytest.raises(FedscopeError, match="finite and > 0"):
        config_vectors(cohorts, 3, [(ids, np.inf, 0.0, np.array([1.0, 0.0]))], stacked=False)


def test_weighting_is_refused_where_the_mechanism_assumes_weight_one(tiny_dataset: Path, tmp_path: Path, capsys):
    from fedscope_jax.cli import main
    from fedscope_jax.train.federated_config import FederatedConfig

    base = ["--data", str(tiny_dataset), "--clients", "3", "--rounds", "1",
            *[a for s in TINY[:7] for a in ("--set", s)]]
    user = ["--privacy-unit", "user", "--set", "federated.local_steps=1", "--client-opt", "sgd"]
    for name, extra, says in (
            ("client", ["--privacy", "personalized", "--weighting", "users"], "with --privacy-unit client"),
            ("distributed", ["--privacy", "distributed", "--privacy-unit", "user", "--client-opt", "sgd",
                             "--weighting", "inverse_noise"], "only in an unweighted sum"),
            ("off", ["--privacy", "off", "--weighting", "inverse_noise"], "but --privacy is off"),
            ("adam", [*user, "--client-opt", "adam", "--weighting", "inverse_noise"], "--client-opt adam"),
            ("passes", ["--privacy-unit", "user", "--client-opt", "sgd", "--weighting", "inverse_noise"],
             "federated.local_steps=0")):
        out = tmp_path / name
        assert main(["train", "--mode", "federated", *base, "--out", str(out), *extra]) == 2
        assert says in capsys.readouterr().err and not out.exists()
    out = tmp_path / "sweep"
    assert main(["sweep", *base, "--out", str(out), *user, "--epsilons", "inf", "--weighting", "inverse_noise"]) == 2
    assert "every epsilon is inf" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "bench"
    assert main(["benchmark", "--sweep", "--data", str(tiny_dataset), "--out", str(out), "--set",
                 "federated.weighting=users"]) == 2
    assert "the benchmarks weigh uniformly" in capsys.readouterr().err and not out.exists()
    with pytest.raises(FedscopeError, match="--weighting median"):
        FederatedConfig(weighting="median")
    with pytest.raises(FedscopeError, match="calibrated for weight 1"):
        FederatedConfig(weighting="users", noise_mode="sum", clip=1.0, noise_multiplier=1.0)
