"""Many small clients (one user a client): a client's step holds its own users, not a silo's batch of padding,
and the cohort pads only to its bucket's largest client; results equal the old padded layout."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedscope_jax.engine.cohort import ClientShard, build_cohorts, plan_buckets

TINY = ["model.dim=8", "model.blocks=1", "model.heads=1", "model.max_len=6", "train.batch_size=8",
        "model.loss.num_negatives=10", "eval.num_negatives=20"]


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _widen(shard: ClientShard, width: int) -> ClientShard:
    """The shard padded with all-zero users up to `width` (the layout before per-client batch widths)."""
    pad = lambda v: np.pad(v, [(0, 0), (0, width - v.shape[1])] + [(0, 0)] * (v.ndim - 2))  # noqa: E731
    users = {"seq", "target", "user_mask"}   # the fields with a user axis; gbce's "neg" [S, B, D, M] too (0 pads)
    if shard.batch.get("neg") is not None and shard.batch["neg"].ndim == 4:
        users.add("neg")
    return ClientShard({k: pad(v) if k in users else v for k, v in shard.batch.items()}, shard.vocab,
                       shard.step_mask)


@pytest.fixture(scope="module")
def user_context(tiny_dataset: Path):
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    # SGD: Adam would turn the float noise of gradients that are exactly zero in theory (attention key biases)
    # into whole learning-rate steps, so two equal programs would differ there by ~lr
    cfg = load_config(None, TINY + ["federated.scheme=user", "privacy.mode=off", "federated.client_opt=sgd",
                                    "federated.client_lr=0.5"])
    return seed_context(load_dataset(tiny_dataset), cfg)


def test_a_small_client_steps_with_its_own_users(user_context):
    """One user a client: each step holds that one user (width 1), not the batch size (8)."""
    ctx = user_context
    assert ctx.n_clients == 60
    shards = [ctx.source(0, c) for c in range(ctx.n_clients)]
    trained = [s for s in shards if s.real_steps]
    assert trained and all(s.batch["seq"].shape[1] == 1 and s.batch["user_mask"].all() for s in trained)
    plan = plan_buckets(trained, max_buckets=2)
    assert all(shape["seq"][0] == 1 for shape in plan.shapes)


def test_padding_users_to_the_batch_size_changes_nothing(user_context):
    """The round on one-user steps equals the round on the same users padded to the batch size (all-zero
    users, as before): losses are means over real targets, and dropout draws of the real rows do not depend
    on the rows after them (JAX's partitionable threefry)."""
    from fedscope_jax.engine.round import EngineConfig, make_round_fn
    from fedscope_jax.engine.server import init_server_state, server_optimizer

    ctx = user_context
    ids = np.arange(12)
    narrow = [ctx.source(0, int(c)) for c in ids]
    wide = [_widen(s, 8) for s in narrow]
    opt = server_optimizer("fedavg")
    fn = make_round_fn(ctx.client_cfg, opt, EngineConfig(chunk_size=4), donate=False)
    states = []
    for shards in (narrow, wide):
        cohorts, _ = build_cohorts(shards, range(len(ids)), plan_buckets(shards, 1), {}, multiple=4)
        assert cohorts[0].data.batch["seq"].shape[2] == shards[0].batch["seq"].shape[1]
        states.append(fn(init_server_state(ctx.params, opt), cohorts, jax.random.key(3))[0])
    assert _max_diff(states[0].params, states[1].params) < 1e-6
    assert _max_diff(states[0].params, ctx.params) > 1e-4      # it trained


def test_cohort_pads_every_axis_to_its_bucket(user_context):
    """Clients of different widths in one bucket: the cohort takes the largest, zeros after each client's own."""
    ctx = user_context
    shards = [ctx.source(0, 0), _widen(ctx.source(0, 1), 3)]
    plan = plan_buckets(shards, 1)
    assert plan.shapes[0]["seq"][0] == 3
    (cohort,), _ = build_cohorts(shards, [0, 1], plan, {})
    seq = np.asarray(cohort.data.batch["seq"])
    assert seq.shape[2] == 3
    np.testing.assert_array_equal(seq[0, :, :1], shards[0].batch["seq"])
    assert not seq[0, :, 1:].any() and not np.asarray(cohort.data.batch["user_mask"])[0, :, 1:].any()


def test_cross_device_benchmark_reports_both_workloads(tiny_dataset: Path, tmp_path: Path):
    """`fedscope benchmark --cross-device`: the silo row and a row of one-user clients, each vectorized and
    sequential on the same cohorts (they agree), user-steps counted from the real users of the round."""
    import json

    from fedscope_jax.cli import main

    out = tmp_path / "xd.json"
    # SGD: with Adam, gradients that are zero in theory (attention key biases) differ by float noise between
    # the two programs and Adam turns that into whole learning-rate steps
    sets = [a for s in TINY + ["federated.client_opt=sgd", "federated.client_lr=0.5"] for a in ("--set", s)]
    assert main(["benchmark", "--cross-device", "--data", str(tiny_dataset), "--clients", "6", "--silos", "2",
                 "--repeats", "1", "--out", str(out), *sets]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] and [r["workload"] for r in report["rows"]] == ["silo", "cross-device"]
    silo, cross = report["rows"]
    assert silo["user_steps"] == report["users_with_training_data"] == 60   # one epoch: every user once
    assert cross["clients"] == cross["user_steps"] == 6 and cross["batch_width"] == [1]
    assert set(silo["batch_width"]) == {8}
    for r in (silo, cross):
        assert r["max_abs_diff_vs_sequential"] < 1e-5 and r["speedup"] > 0
        assert r["vmap_user_steps_per_s"] == pytest.approx(r["user_steps"] / min(r["vmap_round_seconds"]))
    assert cross["user_cost_vs_silo"] == pytest.approx(silo["vmap_user_steps_per_s"] / cross["vmap_user_steps_per_s"])


def test_cross_device_benchmark_refuses_more_clients_than_users(tiny_dataset: Path, capsys):
    from fedscope_jax.cli import main

    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["benchmark", "--cross-device", "--data", str(tiny_dataset), "--clients", "61", *sets]) == 2
    assert "60 users with training data (one a client); give counts up to 60" in capsys.readouterr().err
    assert main(["benchmark", "--cross-device", "--sweep", "--data", str(tiny_dataset)]) == 2
    assert "four benchmarks" in capsys.readouterr().err


def _globalized(shard: ClientShard) -> ClientShard:
    """A localized shard back in global item ids (the dense layout of the same data and negatives)."""
    batch = {k: np.array(v, copy=True) for k, v in shard.batch.items()}
    for d in range(batch["seq"].shape[2]):
        ids = shard.vocab[f"domain_{d}"]
        batch["seq"][:, :, d] = ids[batch["seq"][:, :, d]]
        batch["target"][:, :, d] = ids[batch["target"][:, :, d]]
        batch["neg"][..., d, :] = ids[batch["neg"][..., d, :]]
    batch.pop("neg_pool", None)   # dense tables: the loss reads the catalogue's size from the table
    return ClientShard(batch, {}, shard.step_mask)


@pytest.mark.parametrize("semantic,item_bias,loss", [(False, False, "sampled"), (True, False, "sampled"),
                                                     (True, True, "sampled"), (False, True, "gbce")])
def test_local_item_vocabularies_equal_dense_tables(tiny_dataset: Path, semantic: bool, item_bias: bool,
                                                    loss: str):
    """A client trains only the item rows its data and its host-drawn negatives name (train/vocab.py): the round
    equals the one on dense tables with the same negatives in global ids, with and without semantic fusion
    (whose constant tables are read through the vocabulary), with per-item biases (model.item_bias, a second
    table through the same vocabulary), and with the gbce loss (negatives per user; its calibration must read
    the catalogue's item count from the batch, not the local vocabulary's)."""
    import dataclasses

    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.engine.round import EngineConfig, make_round_fn
    from fedscope_jax.engine.server import init_server_state, server_optimizer
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    ds = load_dataset(tiny_dataset)
    tables = None
    if semantic:
        rng = np.random.default_rng(0)
        tables = []
        for n in ds.n_items:
            mask = (rng.random(n + 1) < 0.7).astype(np.float32)
            mask[0] = 0.0
            tables.append({"vectors": jnp.asarray(rng.normal(size=(n + 1, 5)).astype(np.float32) * mask[:, None]),
                           "mask": jnp.asarray(mask)})
    cfg = load_config(None, TINY + ["federated.scheme=user", "privacy.mode=off", "federated.client_opt=sgd",
                                    "federated.client_lr=0.5", "model.fusion_hidden=6",
                                    f"model.item_bias={item_bias}", f"model.loss.rec={loss}"])
    ctx = seed_context(ds, cfg, tables)
    names = ["item_emb", "item_bias"] if item_bias else ["item_emb"]
    assert [t.path for t in ctx.client_cfg.sparse_tables] == [(f"domain_{d}", n) for d in range(2) for n in names]
    sparse = [ctx.source(0, c) for c in range(3)]     # one user each
    n_rows = [n + 1 for n in ds.n_items]
    assert all(len(s.vocab["domain_0"]) < n_rows[0] for s in sparse)       # fewer rows than the table
    assert all(s.batch["neg"].shape[-2:] == (2, 10) for s in sparse)
    assert all(s.batch["neg"].ndim == (4 if loss == "gbce" else 3) for s in sparse)   # [S, (B,) D, M]
    dense = [_globalized(s) for s in sparse]
    dense_cfg = dataclasses.replace(ctx.client_cfg, sparse_tables=())
    opt = server_optimizer("fedavg")
    states = []
    for shards, ccfg in ((sparse, ctx.client_cfg), (dense, dense_cfg)):
        cohorts, _ = build_cohorts(shards, range(3), plan_buckets(shards, 2), {}, multiple=1)
        fn = make_round_fn(ccfg, opt, EngineConfig(chunk_size=1), donate=False)
        states.append(fn(init_server_state(ctx.params, opt), cohorts, jax.random.key(5))[0])
    assert _max_diff(states[0].params, states[1].params) < 1e-5
    assert _max_diff(states[0].params, ctx.params) > 1e-3
    for d in range(2):   # rows nobody's data named are untouched
        named = np.unique(np.concatenate([s.vocab[f"domain_{d}"] for s in sparse]))
        untouched = np.setdiff1d(np.arange(n_rows[d]), named)
        emb = f"domain_{d}"
        for name in names:
            np.testing.assert_array_equal(np.asarray(states[0].params[emb][name])[untouched],
                                          np.asarray(ctx.params[emb][name])[untouched])
        if item_bias:    # the named items' biases trained (from zero)
            assert np.abs(np.asarray(states[0].params[emb]["item_bias"])[named[named < n_rows[d]]]).max() > 1e-4


def test_only_the_full_softmax_trains_dense_tables():
    """Local vocabularies wherever a client's step names few rows: the sampled and in-batch softmax and gbce
    (its per-user negatives drawn on the host), not the full softmax (every item is a candidate)."""
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.vocab import uses_local_vocab

    got = {rec: uses_local_vocab(load_config(None, [f"model.loss.rec={rec}"]))
           for rec in ("sampled", "in_batch", "full", "gbce")}
    assert got == {"sampled": True, "in_batch": True, "full": False, "gbce": True}


def test_local_vocabularies_keep_one_shape_across_rounds(user_context):
    """A client's vocabulary is padded to a bound that does not depend on the round's negatives."""
    ctx = user_context
    sizes = {tuple(len(v) for v in ctx.source(r, 5).vocab.values()) for r in range(6)}
    assert len(sizes) == 1


def test_in_batch_negatives_are_real_targets_whatever_the_padding():
    """in_batch negatives are drawn among the real targets only, and padding users after the real ones (a
    wider bucket) leave the draw unchanged."""
    from fedscope_jax.model.objective import in_batch_negatives

    key = jax.random.key(4)
    target = jnp.array([[0, 3, 5], [0, 0, 7]])
    wide = jnp.concatenate([target, jnp.zeros((6, 3), target.dtype)])
    a, b = in_batch_negatives(target, key, 60), in_batch_negatives(wide, key, 60)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(np.asarray(a).tolist()) == {3, 5, 7}
    assert not np.asarray(in_batch_negatives(jnp.zeros((2, 3), jnp.int32), key, 4)).any()


def test_peer_benchmark_times_each_domain_client_beside_the_peer(tiny_dataset: Path, tmp_path: Path, capsys,
                                                                 monkeypatch):
    """`fedscope benchmark --peer feddcsr`: one row per domain client and the round of both, each vectorized
    and sequential on the same truncated clients (they agree), seconds a step beside the peer's figures of the
    same catalogues (the round's: their mean). The peer's settings are shrunk here (the published ones, checked
    below, compile for minutes on this CPU); figures for other catalogues, or flags that would change the
    workload, are refused."""
    import json

    from fedscope_jax.bench import peer
    from fedscope_jax.cli import main

    published = peer.peer_config("feddcsr")
    assert (published.federated.scheme, published.model.dim, published.model.max_len, published.train.batch_size,
            published.model.loss.rec, published.model.loss.alpha, published.federated.local_epochs) == (
                "domain", 256, 16, 256, "full", 0.0, 3)
    monkeypatch.setitem(peer.PEERS, "feddcsr", ("federated.scheme=domain", "federated.clients=2",
                                                "federated.client_opt=sgd", "federated.client_lr=0.5",
                                                "model.loss.rec=full", "model.loss.alpha=0", "privacy.mode=off",
                                                *TINY))
    result = tmp_path / "peer.json"
    result.write_text(json.dumps({"torch": "x", "domains": [{"items": 80, "median_seconds": 0.5},
                                                            {"items": 90, "median_seconds": 1.0}]}))
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--peer", "feddcsr", "--data", str(tiny_dataset), "--steps", "2", "--repeats", "1",
                 "--peer-result", str(result), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] and [r["row"] for r in report["rows"]][-1] == "round"
    assert [r["steps"] for r in report["rows"]] == [2, 2, 4]
    assert [r["peer_seconds_per_step"] for r in report["rows"]] == [0.5, 1.0, 0.75]
    for r in report["rows"]:
        assert r["max_abs_diff_vs_sequential"] < 1e-5
        assert r["seconds_per_step"] == pytest.approx(min(r["vmap_round_seconds"]) / r["steps"])
        assert r["speed_vs_peer"] == pytest.approx(r["peer_seconds_per_step"] / r["seconds_per_step"])
    assert "measured: " in capsys.readouterr().out
    # the recorded figures are for abxi-food-kitchen's catalogues, not this dataset's
    assert main(["benchmark", "--peer", "feddcsr", "--data", str(tiny_dataset)]) == 2
    assert "--items 80,90" in capsys.readouterr().err
    assert main(["benchmark", "--peer", "feddcsr", "--data", str(tiny_dataset), "--dim", "8"]) == 2
    assert "--dim: not with --peer" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "2", "--chunk-size", "4"], "--rounds, --chunk-size: only with --sweep or --privacy-unit"),
    (["--config", "c.toml"], "--config: only with --sweep, --privacy-unit or --cross-device"),
    (["--cross-device", "--data", "D", "--fraction", "0.5"], "--fraction: not with --cross-device"),
    (["--peer", "feddcsr", "--data", "D", "--seed", "1", "--set", "model.dim=8"], "--seed, --set: not with --peer"),
])
def test_benchmark_names_every_flag_it_does_not_take(argv, message, capsys, tmp_path):
    from fedscope_jax.cli import main

    out = tmp_path / "b.json"
    assert main(["benchmark", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()
