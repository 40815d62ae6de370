"""The user unit of DP in federated training: DP-SGD over users inside every silo, in the one jitted round
(vmapped == sequential), its ledger, resume, and the errors of bad settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from fedscope_jax.cli import main

TINY = ["--set", "model.dim=8", "--set", "model.blocks=1", "--set", "model.heads=1", "--set", "model.max_len=6",
        "--set", "train.batch_size=8", "--set", "model.loss.num_negatives=10", "--set", "eval.num_negatives=20"]
USER = ["--privacy", "personalized", "--privacy-unit", "user", "--epsilon", "4", "--clip-norm", "0.5"]


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--mode", "federated", "--data", str(data), "--out", str(out), "--clients", "3",
                 "--scheme", "powerlaw", "--rounds", "3", "--eval-every", "3", "--chunk-size", "1",
                 "--checkpoint-every", "1", *USER, *TINY, *extra])


def test_user_unit_run_writes_a_recomputable_user_ledger(tiny_dataset: Path, tmp_path: Path):
    from fedscope_jax.privacy.ledger import check_ledger, read_ledger

    run = tmp_path / "run"
    assert _train(tiny_dataset, run) == 0
    rows = read_ledger(run / "privacy_ledger.arrow")
    assert check_ledger(run / "privacy_ledger.arrow") == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["unit"] == "user" and summary["privacy"]["noise_mode"] == "off"
    assert all(r["unit"] == "user" and r["amplification"] for r in rows)
    assert all(r["eps_spent"] <= r["eps_target"] * (1 + 1e-9) for r in rows)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["clients"] == 3 and m["included"] == 3 and np.isfinite(m["loss"]) for m in metrics)
    assert all(m["noise_std"] == 0.0 for m in metrics)    # no noise on the aggregate: it is in the local steps
    for r in rows:   # S_k = ceil(users / batch) steps per round, q_k = batch / users
        users = round(8 / r["sampling_rate"])
        assert r["steps"] == r["rounds_participated"] * -(-users // 8) and r["rounds_participated"] == 3
    assert np.isfinite(summary["test"]["A"]["NDCG@10"])


def test_user_unit_round_equals_its_sequential_oracle(tiny_dataset: Path):
    """The vmapped, chunked round with DP-SGD inside each client equals the clients trained one at a time."""
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.engine.cohort import build_cohorts, plan_buckets
    from fedscope_jax.engine.round import EngineConfig, SequentialRunner, make_round_fn
    from fedscope_jax.engine.server import init_server_state, server_optimizer
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    sets = [s for s in TINY if s != "--set"] + ["privacy.unit=user", "federated.clients=3"]
    cfg = load_config(None, sets)
    ctx = seed_context(load_dataset(tiny_dataset), cfg)
    assert ctx.client_cfg.expected_batch == 8 and ctx.user_batch_cap >= 8
    shards = [ctx.source(0, c) for c in range(3)]
    assert all(s.batch["seq"].shape[1] == ctx.user_batch_cap for s in shards)
    cohorts, _ = build_cohorts(shards, range(3), plan_buckets(shards, 1), {}, clip=np.full(3, 0.5, np.float32),
                               noise_multiplier=np.array([1.0, 1.5, 2.0], np.float32), multiple=2)
    opt = server_optimizer("fedavg", 1.0)
    ecfg = EngineConfig(chunk_size=2)
    state = init_server_state(ctx.params, opt)
    vm, _ = make_round_fn(ctx.client_cfg, opt, ecfg, donate=False)(state, cohorts, jax.random.key(4))
    seq, _ = SequentialRunner(ctx.client_cfg, opt, ecfg)(init_server_state(ctx.params, opt), cohorts,
                                                         jax.random.key(4))
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(vm.params), jax.tree.leaves(seq.params)))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(vm.params), jax.tree.leaves(ctx.params)))
    assert diff < 1e-5 and moved > 1e-3


def test_user_unit_resume_equals_uninterrupted(tiny_dataset: Path, tmp_path: Path):
    from fedscope_jax.privacy.ledger import read_ledger

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train(tiny_dataset, full) == 0
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "3")
    (cut / "summary.json").unlink()
    assert _train(tiny_dataset, cut, "--resume") == 0
    a, b = json.loads((full / "summary.json").read_text()), json.loads((cut / "summary.json").read_text())
    assert a["test"] == b["test"]
    assert read_ledger(full / "privacy_ledger.arrow") == read_ledger(cut / "privacy_ledger.arrow")
    assert (full / "params.msgpack").read_bytes() == (cut / "params.msgpack").read_bytes()


def test_a_silo_too_small_for_its_batch_is_refused_before_anything_is_written(tiny_dataset: Path, tmp_path: Path,
                                                                            capsys):
    run = tmp_path / "run"
    assert _train(tiny_dataset, run, "--set", "train.batch_size=40") == 2
    err = capsys.readouterr().err
    assert "fewer than the expected batch train.batch_size=40" in err and "--set train.batch_size=" in err
    assert not run.exists()


def test_user_unit_refuses_the_sequence_contrastive_term_it_would_zero(tiny_dataset: Path):
    """With the user as the unit every user's loss sees that user alone, so CL4SRec's term has no negatives
    (0, tests/test_privacy_user.py) and FedCL4SRec would train as FedSASRec: refused by name."""
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.errors import FedscopeError
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    sets = [s for s in TINY if s != "--set"] + ["federated.clients=3", "model.loss.seqcl_weight=0.1"]
    ds = load_dataset(tiny_dataset)
    with pytest.raises(FedscopeError, match=r"model.loss.seqcl_weight=0.1 with --privacy-unit user.*"
                                            r"model.loss.seqcl_weight=0"):
        seed_context(ds, load_config(None, sets + ["privacy.unit=user"]))
    assert seed_context(ds, load_config(None, sets)).n_clients == 3   # the client unit keeps the term


def test_local_steps_fix_each_silos_dp_sgd_steps_a_round(tiny_dataset: Path, tmp_path: Path, capsys):
    """federated.local_steps=S: every silo takes S Poisson steps a round (not ceil(n_k / B)); the batches, the
    ledger's events, the recomputed eps and the inventory all follow. Refused with the client unit, with
    distributed noise (one step a round already), beside --local-epochs and by the privacy-unit benchmark,
    before anything is written."""
    from fedscope_jax.bench.privacy_unit import run_unit_benchmark
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.errors import FedscopeError
    from fedscope_jax.experiments.inventory import client_steps
    from fedscope_jax.privacy.ledger import check_ledger, read_ledger
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import seed_context

    sets = [s for s in TINY if s != "--set"] + ["privacy.unit=user", "federated.clients=3"]
    ds = load_dataset(tiny_dataset)
    cfg = load_config(None, sets + ["federated.local_steps=2"])
    ctx = seed_context(ds, cfg)
    assert ctx.user_steps.steps_per_round.tolist() == [2, 2, 2]
    assert all(ctx.source(0, c).batch["seq"].shape[0] == 2 for c in range(3))
    for c in (cfg, load_config(None, sets)):   # the reproduction's inventory prices the steps the engine runs
        assert client_steps(ds, c)[0].tolist() == seed_context(ds, c).user_steps.steps_per_round.tolist()
    with pytest.raises(FedscopeError, match="federated.local_steps=2 would fix the user-level side's steps"):
        run_unit_benchmark(ds, cfg, 8.0, repeats=1)   # its non-private sides would take passes
    run = tmp_path / "run"
    assert _train(tiny_dataset, run, "--set", "federated.local_steps=1") == 0
    rows = read_ledger(run / "privacy_ledger.arrow")
    assert check_ledger(run / "privacy_ledger.arrow") == []
    assert all(r["steps"] == r["rounds_participated"] == 3 for r in rows)   # one Gaussian event a round
    assert _train(tiny_dataset, tmp_path / "default") == 0              # one pass: ceil(n_k / 8) steps a round
    default = read_ledger(tmp_path / "default" / "privacy_ledger.arrow")
    assert all(d["steps"] > 3 for d in default)          # fewer events: a smaller z_k for the same eps_k
    assert all(r["noise_multiplier"] < d["noise_multiplier"] for r, d in zip(rows, default))
    for extra, says in ((["--privacy-unit", "client"], "privacy.unit is 'client'"),
                        (["--privacy", "distributed", "--client-opt", "sgd"], "leave federated.local_steps at 0"),
                        (["--local-epochs", "2"], "both set a silo's steps a round")):
        bad = tmp_path / f"bad{len(says)}"
        assert _train(tiny_dataset, bad, "--set", "federated.local_steps=1", *extra) == 2
        assert says in capsys.readouterr().err and not bad.exists()
