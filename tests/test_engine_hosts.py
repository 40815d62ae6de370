"""Two processes on JAX's own runtime (`jax.distributed`, CPU collectives over localhost) run one round with its
clients laid over the devices of both, and get the single-process round: the server state, every client's
report (gathered with `engine.hosts.fetch`), and a checkpoint both write into one folder and read back.

Each process is a fresh interpreter with 2 CPU devices (4 in all); the reference is the same round in the same
process on one device, without a mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import SETTINGS
from fedscope_jax.cli import main

SCRIPT = textwrap.dedent("""
    import functools, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    from fedscope_jax.engine import hosts
    hosts.initialize(f"localhost:{sys.argv[2]}", 2, int(sys.argv[1]))
    import numpy as np, optax
    from fedscope_jax.engine import reference_model as rm
    from fedscope_jax.engine.checkpoint import Checkpointer
    from fedscope_jax.engine.client import ClientConfig
    from fedscope_jax.engine.cohort import build_cohorts, plan_buckets
    from fedscope_jax.engine.round import EngineConfig, client_mesh, make_round_fn, shard_cohorts
    from fedscope_jax.engine.server import init_server_state, server_optimizer
    me = hosts.process_index()
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    assert hosts.is_primary() == (me == 0)
    from pathlib import Path
    mine = hosts.run_dir("/x/run")   # process 0 writes RUN, process 1 RUN.process1; checkpoints go to RUN's
    assert mine == Path("/x/run" if me == 0 else "/x/run.process1")
    assert hosts.primary_dir(mine) == Path("/x/run")
    cfg = rm.ReferenceConfig(n_items_a=30, n_items_b=20, dim=8, max_len=5)
    rng = np.random.default_rng(0)   # the same clients on both processes, as the loop builds them from (seed, round)
    shards = [rm.synthetic_client(rng, n, cfg, 4, 2) for n in (3, 9, 5, 12, 2, 7, 4)]
    plan = plan_buckets(shards, max_buckets=2)
    ccfg = ClientConfig(functools.partial(rm.loss_fn, config=cfg), optax.sgd(0.5), 1, rm.TABLES)
    opt = server_optimizer("fedadam", 0.05)
    n = len(shards)
    kw = dict(clip=np.full(n, 0.5, np.float32), noise_multiplier=np.full(n, 0.2, np.float32))
    params = rm.init_params(jax.random.key(0), cfg)
    out = {}
    for mesh, chunk in ((None, 1), (client_mesh(), 2)):
        devices = 1 if mesh is None else mesh.size
        cohorts, _ = build_cohorts(shards, range(n), plan, {"a": 31, "b": 21}, multiple=devices * chunk, **kw)
        if mesh is not None:
            assert mesh.size == 4
            cohorts = shard_cohorts(cohorts, mesh)
            assert {d.process_index for d in cohorts[0].weight.sharding.device_set} == {0, 1}
        fn = make_round_fn(ccfg, opt, EngineConfig(chunk_size=chunk, noise_mode="per_client"), mesh=mesh)
        state = init_server_state(params, opt)
        for _ in range(2):
            state, metrics = fn(state, cohorts, jax.random.key(3))
        out[devices] = state, hosts.fetch(state.params), hosts.fetch(metrics)
    state, got, metrics = out[4]
    _, ref, ref_metrics = out[1]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    assert diff < 1e-5, diff
    for r, g in zip(ref_metrics.reports, metrics.reports):   # the padded rows differ: compare the real clients
        real = {int(c): i for i, c in enumerate(r.client_id) if c >= 0}
        for i, c in enumerate(g.client_id):
            if c >= 0:
                assert abs(float(g.loss[i]) - float(r.loss[real[int(c)]])) < 1e-5, (c, g.loss[i])
                assert int(g.steps[i]) == int(r.steps[real[int(c)]])
    assert sorted(int(c) for g in metrics.reports for c in g.client_id if c >= 0) == list(range(n))
    ckpt = Checkpointer(f"{sys.argv[3]}/ckpt")   # one directory, written by both (orbax)
    ckpt.save(state)
    back = ckpt.restore(init_server_state(params, opt))
    ckpt.close()
    assert int(back.round) == 2
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(got)))
    print("HOSTS_OK", me, diff)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two(argv_of, tmp_path: Path, timeout: float = 600) -> list[str]:
    """Starts processes 0 and 1 (`argv_of(i)`), output to files; the first to fail stops the other (which would
    otherwise wait for it in a collective). Returns their stdouts."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", FEDSCOPE_NO_PROGRESS="1")
    env.pop("XLA_FLAGS", None)
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(2)]
    procs = [subprocess.Popen(argv_of(i), env=env, cwd=tmp_path, stdout=open(o, "w"), stderr=open(e, "w"))
             for i, (o, e) in enumerate(logs)]
    t0 = time.monotonic()
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            assert not failed, f"process {failed[0]}: {logs[failed[0]][1].read_text()[-3000:]}"
            assert time.monotonic() - t0 < timeout, "the two processes did not finish in time"
            time.sleep(0.5)
    finally:
        for p in procs:
            p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}: {logs[i][1].read_text()[-3000:]}"
    return [o.read_text() for o, _ in logs]


def test_two_processes_equal_one(tmp_path: Path):
    port = str(_free_port())
    outs = _run_two(lambda i: [sys.executable, "-c", SCRIPT, str(i), port, str(tmp_path)], tmp_path)
    for i, stdout in enumerate(outs):
        assert f"HOSTS_OK {i}" in stdout
    assert (tmp_path / "ckpt" / "2").is_dir()


def test_train_multi_host_cli(tiny_dataset: Path, tmp_path: Path):
    """`fedscope train --multi-host` as two processes: process 1 writes RUN.process1 with the same rounds and
    test metrics as process 0's RUN; the checkpoint is one, in RUN/checkpoints; a second start without
    --force is refused on both processes (each with its own or the other's message), none hangs."""
    port = str(_free_port())
    run = tmp_path / "run"
    argv = lambda i: [sys.executable, "-m", "fedscope_jax", "train", "--mode", "federated",  # noqa: E731
                      "--data", str(tiny_dataset), "--out", f"{run}/", "--clients", "4", "--rounds", "2",
                      "--chunk-size", "1", "--privacy", "off", "--multi-host", "--coordinator", f"localhost:{port}",
                      "--num-processes", "2", "--process-id", str(i)] + [a for s in SETTINGS for a in ("--set", s)]
    _run_two(argv, tmp_path)
    other = tmp_path / "run.process1"
    assert max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == 2
    assert not (other / "checkpoints").exists()
    records = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (run, other)]
    assert [r["round"] for r in records[0]] == [1, 2]
    assert [(r["loss"], r["clients"]) for r in records[0]] == [(r["loss"], r["clients"]) for r in records[1]]
    tests = [json.loads((d / "summary.json").read_text())["test"] for d in (run, other)]
    assert tests[0] == tests[1]
    assert json.loads((run / "summary.json").read_text())["federated"]["devices"] == 4
    port = str(_free_port())
    with pytest.raises(AssertionError, match="output exists|failed a check"):
        _run_two(argv, tmp_path, timeout=300)


def test_multi_host_needs_a_fixed_chunk(tiny_dataset: Path, tmp_path: Path, capsys):
    """Refused before joining anyone: each process timing the chunk candidates could choose differently."""
    rc = main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
               "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "0"])
    assert rc == 2
    assert "--multi-host needs --chunk-size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["centralized", "local"])
def test_multi_host_is_federated_only(tiny_dataset: Path, tmp_path: Path, capsys, mode: str):
    rc = main(["train", "--mode", mode, "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--multi-host",
               "--chunk-size", "2"])
    assert rc == 2
    assert f"only --mode federated runs on several hosts, not --mode {mode}" in capsys.readouterr().err
