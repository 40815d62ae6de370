"""A shared encoder across the domain towers (`model.shared_encoder`) and group means
(`federated.aggregate=group_mean`): FedDCSR's FedSASRec, one client a domain sharing only its encoder."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedscope_jax.errors import FedscopeError

TINY = ["model.dim=8", "model.blocks=1", "model.heads=1", "model.max_len=6", "train.batch_size=8",
        "model.loss.num_negatives=10", "eval.num_negatives=20"]


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_shared_encoder_is_one_set_of_blocks_read_by_every_tower():
    """The blocks and output LayerNorm live once under "encoder"; a tower with those blocks copied in encodes
    exactly as the shared model does, and changing the shared blocks changes every domain's output."""
    from fedscope_jax.model import ModelConfig, encode, init_params, n_domains

    cfg = ModelConfig(dim=8, blocks=2, heads=2, max_len=6, shared_encoder=True)
    params = init_params(jax.random.key(0), cfg, [30, 40])
    assert n_domains(params) == 2
    assert sorted(params["encoder"]) == ["block_0", "block_1", "ln_out"]
    assert all(not any(k.startswith("block_") or k == "ln_out" for k in params[f"domain_{d}"]) for d in (0, 1))
    seq = jnp.array([[0, 0, 3, 5, 7, 9], [1, 2, 3, 4, 5, 6]], jnp.int32)
    unshared = {f"domain_{d}": {**params[f"domain_{d}"], **params["encoder"]} for d in (0, 1)}
    plain = ModelConfig(dim=8, blocks=2, heads=2, max_len=6)
    for d in (0, 1):
        np.testing.assert_array_equal(encode(params, cfg, d, seq), encode(unshared, plain, d, seq))
    moved = {**params, "encoder": jax.tree.map(lambda x: x + 0.1, params["encoder"])}
    for d in (0, 1):
        assert float(jnp.max(jnp.abs(encode(moved, cfg, d, seq) - encode(params, cfg, d, seq)))) > 1e-3


@pytest.fixture(scope="module")
def domain_context(tiny_dataset: Path):
    """One client a domain (two clients), a shared encoder, client SGD (exact zeros where nothing trains)."""
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    cfg = load_config(None, TINY + ["federated.scheme=domain", "federated.clients=0", "privacy.mode=off",
                                    "model.shared_encoder=true", "federated.client_opt=sgd",
                                    "federated.client_lr=0.5"])
    return seed_context(load_dataset(tiny_dataset), cfg)


@pytest.mark.parametrize("chunk", [1, 2])
def test_group_means_keep_a_domain_clients_own_update(domain_context, chunk):
    """With one client a domain, a group mean gives each tower exactly its one client's update and the shared
    encoder the weighted mean of both; the plain mean shrinks each tower by the other client's zero; the
    vectorized round (one chunk of both clients, or two chunks) equals the sequential reference."""
    from fedscope_jax.engine.client import client_update
    from fedscope_jax.engine.cohort import build_cohorts, plan_buckets
    from fedscope_jax.engine.round import EngineConfig, SequentialRunner, make_round_fn
    from fedscope_jax.engine.server import init_server_state, server_optimizer

    ctx = domain_context
    assert ctx.n_clients == 2
    shards = [ctx.source(0, c) for c in range(2)]
    opt = server_optimizer("fedavg")
    cohorts, _ = build_cohorts(shards, range(2), plan_buckets(shards, 1), {}, multiple=2)
    key = jax.random.key(5)
    rounds = {}
    for group_mean in (False, True):
        engine = EngineConfig(chunk_size=chunk, group_mean=group_mean)
        fn = make_round_fn(ctx.client_cfg, opt, engine, donate=False)
        rounds[group_mean] = fn(init_server_state(ctx.params, opt), cohorts, key)[0].params
        seq = SequentialRunner(ctx.client_cfg, opt, engine)(init_server_state(ctx.params, opt), cohorts, key)[0]
        assert _max_diff(seq.params, rounds[group_mean]) < 1e-5

    # each client's own update (the round's training key, as the engine derives it)
    train_key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
    weight = np.asarray(cohorts[0].weight)
    own = [None, None]
    for row in range(2):
        one = jax.tree.map(lambda x: x[row], cohorts[0])
        delta, _ = client_update(ctx.params, one.data, jax.random.fold_in(train_key, one.client_id), ctx.client_cfg)
        own[int(one.client_id)] = delta
    weight = weight[np.argsort(np.asarray(cohorts[0].client_id))]   # by client id
    # client c holds domain c only; sparse tables arrive as local rows: compare the dense towers' other leaves
    for c in range(2):
        dom = f"domain_{c}"
        assert _max_diff(own[1 - c][dom]["pos_emb"], jnp.zeros_like(own[1 - c][dom]["pos_emb"])) == 0.0
        got = rounds[True][dom]["pos_emb"] - ctx.params[dom]["pos_emb"]
        assert _max_diff(got, own[c][dom]["pos_emb"]) < 1e-5
        shrunk = rounds[False][dom]["pos_emb"] - ctx.params[dom]["pos_emb"]
        assert _max_diff(shrunk, own[c][dom]["pos_emb"] * weight[c] / weight.sum()) < 1e-5
        assert _max_diff(got, shrunk) > 1e-4
    mean_encoder = jax.tree.map(lambda a, b: (weight[0] * a + weight[1] * b) / weight.sum(),
                                own[0]["encoder"], own[1]["encoder"])
    for means in (rounds[True], rounds[False]):
        moved = jax.tree.map(jnp.subtract, means["encoder"], ctx.params["encoder"])
        assert _max_diff(moved, mean_encoder) < 1e-5


def test_group_means_refuse_noise_and_privacy(tiny_dataset: Path):
    """Their denominators depend on which clients trained a group: refused with DP or noise, with the reason."""
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.engine.round import EngineConfig
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    with pytest.raises(FedscopeError, match="only without noise"):
        EngineConfig(noise_mode="sum", group_mean=True)
    with pytest.raises(FedscopeError, match="only without noise"):
        load_config(None, ["federated.aggregate=group_mean", "federated.noise_mode=sum"])
    with pytest.raises(FedscopeError, match="expected one of mean, group_mean"):
        load_config(None, ["federated.aggregate=median"])
    cfg = load_config(None, TINY + ["federated.aggregate=group_mean", "privacy.mode=uniform"])
    with pytest.raises(FedscopeError, match="--aggregate group_mean with --privacy uniform"):
        seed_context(load_dataset(tiny_dataset), cfg)


def test_feddcsr_fedsasrec_trains_and_evaluates(tiny_dataset: Path, tmp_path: Path):
    """The FedDCSR layout end to end: one client a domain, shared encoder, group means, then the test split."""
    import json

    from fedscope_jax.cli import main

    run = tmp_path / "run"
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--scheme",
                 "domain", "--aggregate", "group_mean", "--rounds", "2", "--privacy", "off", "--chunk-size", "1",
                 "--set", "model.shared_encoder=true", "--set", "model.loss.alpha=0"]
                + [x for s in TINY for x in ("--set", s)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["test"]) == {"A", "B"} and all(0 <= m["NDCG@10"] <= 1 for m in summary["test"].values())
    config = json.loads((run / "config.json").read_text())
    assert config["federated"]["aggregate"] == "group_mean" and config["model"]["shared_encoder"] is True
