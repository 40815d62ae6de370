"""The client axis sharded over 4 (forced host) CPU devices gives the same round as one device.

XLA reads --xla_force_host_platform_device_count at import, so the check runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import functools, jax, jax.numpy as jnp, numpy as np, optax
    from fedscope_jax.engine import reference_model as rm
    from fedscope_jax.engine.client import ClientConfig
    from fedscope_jax.engine.cohort import build_cohorts, plan_buckets
    from fedscope_jax.engine.round import EngineConfig, client_mesh, make_round_fn, shard_cohorts
    from fedscope_jax.engine.server import init_server_state, server_optimizer
    assert jax.device_count() == 4, jax.devices()
    cfg = rm.ReferenceConfig(n_items_a=30, n_items_b=20, dim=8, max_len=5)
    rng = np.random.default_rng(0)
    shards = [rm.synthetic_client(rng, n, cfg, 4, 2) for n in (3, 9, 5, 12, 2, 7, 4)]
    plan = plan_buckets(shards, max_buckets=2)
    # Local SGD: local Adam (eps 1e-8) turns float-reordering differences (1e-7) of a rarely touched row's
    # near-zero gradient into 1e-4 after two rounds, which says nothing about the engine.
    ccfg = ClientConfig(functools.partial(rm.loss_fn, config=cfg), optax.sgd(0.5), 1, rm.TABLES)
    opt = server_optimizer("fedadam", 0.05)
    n = len(shards)
    kw = dict(clip=np.full(n, 0.5, np.float32), noise_multiplier=np.full(n, 0.2, np.float32))
    params = rm.init_params(jax.random.key(0), cfg)
    rows = {"a": 31, "b": 21}
    out = {}
    for devices, chunk in ((1, 1), (4, 2)):
        cohorts, _ = build_cohorts(shards, range(n), plan, rows, multiple=devices * chunk, **kw)
        mesh = client_mesh(jax.devices()[:devices]) if devices > 1 else None
        if mesh is not None:
            cohorts = shard_cohorts(cohorts, mesh)
            assert len(cohorts[0].weight.sharding.device_set) == 4
        fn = make_round_fn(ccfg, opt, EngineConfig(chunk_size=chunk, noise_mode="per_client"), mesh=mesh)
        state = init_server_state(params, opt)
        for _ in range(2):
            state, metrics = fn(state, cohorts, jax.random.key(3))
        out[(devices, chunk)] = state.params
    ref = out[(1, 1)]
    for k, v in out.items():
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(ref)))
        print("config", k, "max diff", diff)
        assert diff < 1e-5, (k, diff)
    print("SHARDED_OK")
""")


def test_sharded_equals_unsharded(tmp_path: Path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED_OK" in result.stdout
