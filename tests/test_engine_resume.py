"""Federated training killed mid-run and resumed ends exactly like an uninterrupted run."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROUNDS = 6
SLOW_FROM = 3  # the child sleeps in rounds >= this, so the kill lands mid-run


def _setup(slow: bool = False):
    import jax
    import optax

    from fedscope_jax.engine import reference_model as rm
    from fedscope_jax.engine.client import ClientConfig
    from fedscope_jax.engine.cohort import ClientShard
    from fedscope_jax.train.federated_config import FederatedConfig

    cfg = rm.ReferenceConfig(n_items_a=30, n_items_b=20, dim=8, max_len=5)
    sizes = (3, 9, 5, 12, 2, 7, 4, 6)

    def source(r: int, c: int) -> ClientShard:
        if slow and r >= SLOW_FROM:
            time.sleep(0.3)
        rng = np.random.default_rng([11, r, c])  # fresh local batches every round, seeded by (round, client)
        return rm.synthetic_client(rng, sizes[c], cfg, 4, 2)

    ccfg = ClientConfig(functools.partial(rm.loss_fn, config=cfg), optax.adam(1e-2), 1, rm.TABLES)
    fcfg = FederatedConfig(clients=len(sizes), sampling="fraction", fraction=0.5, rounds=ROUNDS, chunk_size=2,
                           server_opt="fedadam", server_lr=0.05, clip=0.5, noise_multiplier=0.3,
                           noise_mode="per_client", max_buckets=1, checkpoint_every=1, seed=4)
    params = rm.init_params(jax.random.key(0), cfg)
    return source, len(sizes), params, ccfg, fcfg, {"a": 31, "b": 21}


def child(run_dir: str) -> None:
    from fedscope_jax.train.loop import run_rounds

    source, n, params, ccfg, fcfg, rows = _setup(slow=True)
    run_rounds(run_dir, source, n, params, ccfg, fcfg, rows)


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # wall time differs, nothing else


def test_killed_run_resumes_to_the_same_result(tmp_path: Path):
    import jax

    from fedscope_jax.train.loop import run_rounds

    killed = tmp_path / "killed"
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_engine_resume as t; " \
           f"t.child({str(killed)!r})"
    env = dict(os.environ, JAX_PLATFORMS="cpu", FEDSCOPE_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 500
    ckpt = killed / "checkpoints"
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.is_dir() else []
            if done and max(done) >= SLOW_FROM:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert SLOW_FROM <= len(lines) < ROUNDS  # really killed mid-run

    source, n, params, ccfg, fcfg, rows = _setup()  # one setup: both runs share the compiled round
    resumed_state, resumed, facts = run_rounds(killed, source, n, params, ccfg, fcfg, rows, resume=True)
    assert facts["start_round"] >= SLOW_FROM and facts["start_round"] < ROUNDS
    full_state, full, _ = run_rounds(tmp_path / "full", source, n, params, ccfg, fcfg, rows)

    assert [r["round"] for r in resumed] == list(range(1, ROUNDS + 1))
    a, b = _strip(resumed), _strip(full)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        assert ra["clients"] == rb["clients"] and ra["excluded_nonfinite"] == rb["excluded_nonfinite"]
        for k in ("loss", "update_norm", "client_update_norm_mean", "noise_std", "padding_waste"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), k
    for x, y in zip(jax.tree.leaves(resumed_state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    on_disk = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in on_disk] == list(range(1, ROUNDS + 1))
    assert all(r["clients"] == 4 for r in full)  # a fixed fraction: one cohort shape, one compile per process


def test_existing_checkpoints_need_resume(tmp_path: Path):
    import jax.numpy as jnp
    import optax

    from fedscope_jax.engine.client import ClientConfig
    from fedscope_jax.engine.cohort import ClientShard
    from fedscope_jax.errors import FedscopeError
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import run_rounds

    def loss(params, batch, key):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    rng = np.random.default_rng(0)
    data = [ClientShard({"x": rng.normal(size=(2, 3, 2)).astype(np.float32),
                         "y": rng.normal(size=(2, 3)).astype(np.float32)}) for _ in range(3)]
    ccfg = ClientConfig(loss, optax.sgd(0.1))
    fcfg = FederatedConfig(clients=3, rounds=1, chunk_size=1)
    run_rounds(tmp_path, lambda r, c: data[c], 3, {"w": jnp.zeros(2)}, ccfg, fcfg)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    with pytest.raises(FedscopeError, match="--resume"):
        run_rounds(tmp_path, lambda r, c: data[c], 3, {"w": jnp.zeros(2)}, ccfg, fcfg)


def test_a_setting_added_after_the_run_started_resumes_at_its_default(tmp_path: Path):
    """The stored config.json of a run started before a setting existed lacks its key: resuming with the
    setting at its default (what the older code did) passes; at another value, or any other changed key, not."""
    import json

    from fedscope_jax.errors import ResumeMismatch
    from fedscope_jax.train.config import load_config, to_dict
    from fedscope_jax.train.federated import check_resume_config

    stored = to_dict(load_config(None, []))
    del stored["model"]["item_bias"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stored))
    check_resume_config(path, to_dict(load_config(None, [])))
    with pytest.raises(ResumeMismatch, match="model.item_bias is True here but None"):
        check_resume_config(path, to_dict(load_config(None, ["model.item_bias=true"])))
    with pytest.raises(ResumeMismatch, match="model.dim"):
        check_resume_config(path, to_dict(load_config(None, ["model.dim=16"])))
    # the loss was recorded once there were several; a run from before ran the sampled softmax, not today's gbce
    del stored["model"]["loss"]["rec"]
    path.write_text(json.dumps(stored))
    check_resume_config(path, to_dict(load_config(None, ["model.loss.rec=sampled"])))
    with pytest.raises(ResumeMismatch, match="model.loss.rec is 'gbce' here but 'sampled'"):
        check_resume_config(path, to_dict(load_config(None, [])))


def test_next_round_built_during_the_round_once_and_changes_nothing(tmp_path: Path, monkeypatch):
    """While the device runs round r the loop builds round r + 1's shards (train/loop.py prefetch): each
    (round, client) shard is built once, and the run equals one that builds every round's shards in it."""
    import collections

    import jax

    from fedscope_jax.train import loop
    from fedscope_jax.train.loop import run_rounds

    source, n, params, ccfg, fcfg, rows = _setup()
    calls: collections.Counter = collections.Counter()

    def counted(r: int, c: int):
        calls[(r, c)] += 1
        return source(r, c)

    ahead_state, ahead, _ = run_rounds(tmp_path / "ahead", counted, n, params, ccfg, fcfg, rows)
    assert max(calls.values()) == 1 and {r for r, _ in calls} == set(range(ROUNDS))
    monkeypatch.setattr(loop, "prefetch", lambda *_: (-1, {}))
    in_round_state, in_round, _ = run_rounds(tmp_path / "in-round", source, n, params, ccfg, fcfg, rows)
    assert _strip(ahead) == _strip(in_round)
    for x, y in zip(jax.tree.leaves(ahead_state.params), jax.tree.leaves(in_round_state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_round_whose_data_fails_keeps_the_rounds_before_it(tmp_path: Path):
    """A shard of round r that fails while round r - 1 runs (prefetch) fails the run at round r, after
    round r - 1 is written and checkpointed, as it did before the loop built rounds ahead."""
    from fedscope_jax.errors import FedscopeError
    from fedscope_jax.train.loop import run_rounds

    source, n, params, ccfg, fcfg, rows = _setup()

    def broken(r: int, c: int):
        if r == 3:
            raise FedscopeError("round 3's data is unreadable")
        return source(r, c)

    with pytest.raises(FedscopeError, match="round 3's data"):
        run_rounds(tmp_path / "run", broken, n, params, ccfg, fcfg, rows)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]


def test_checkpoint_cadence():
    """Every N rounds, or (0, the default) once AUTO_CHECKPOINT_SECONDS have passed since the last checkpoint."""
    from fedscope_jax.train.federated_config import AUTO_CHECKPOINT_SECONDS, FederatedConfig
    from fedscope_jax.train.loop import checkpoint_due

    every3 = FederatedConfig(checkpoint_every=3)
    assert [checkpoint_due(every3, r, time.perf_counter()) for r in range(6)] == [False, False, True] * 2
    auto = FederatedConfig()
    assert auto.checkpoint_every == 0
    assert not checkpoint_due(auto, 0, time.perf_counter())
    assert checkpoint_due(auto, 0, time.perf_counter() - AUTO_CHECKPOINT_SECONDS)
