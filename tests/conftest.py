"""Shared fixtures: where the real datasets live (../shared/data), skipped with a reason when absent, and a tiny
synthetic dataset for the federated CLI tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FEDSCOPE_NO_PROGRESS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDSCOPE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set FEDSCOPE_SHARED_DATA)")
    return SHARED_DATA


def real_dataset(name: str) -> Path:
    """Path of one real dataset folder, skipping the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _release_programs_near_the_map_limit():
    """After each test, every compiled program is dropped once this process maps over a quarter of
    vm.max_map_count memory regions (`train.programs.PROGRAMS.release_near_map_limit`: ours and JAX's caches).

    One pytest process compiles the whole suite's programs, many outside `PROGRAMS` (the tests' own jitted
    functions); kept, they reach the limit and LLVM crashes the process in a compile (CI, 2026-12-06: a
    segmentation fault in tests/test_privacy_user.py at 63,815 maps). A quarter, below the half at which
    `PROGRAMS.get` clears by itself, so that no test starts near that point and loses its programs midway
    (tests that count compiles or compare program objects)."""
    yield
    from fedscope_jax.train.programs import PROGRAMS

    PROGRAMS.release_near_map_limit(share=0.25)


# Tiny FedSCOPE settings (`--set` strings) and a toy client population, shared by the federated tests.
SETTINGS = ["model.dim=8", "model.blocks=1", "model.max_len=6", "model.fusion_hidden=8",
            "model.loss.num_negatives=5", "train.batch_size=16", "eval.num_negatives=20", "eval.buckets=2,4"]


def linear_setup(n_clients: int = 6, dim: int = 5, seed: int = 0):
    """A dense linear-regression client population: (source, params, client config, sizes)."""
    import jax.numpy as jnp
    import optax

    from fedscope_jax.engine.client import ClientConfig
    from fedscope_jax.engine.cohort import ClientShard

    rng = np.random.default_rng(seed)
    steps = [1 + (c % 3) for c in range(n_clients)]
    data = {c: ClientShard({"x": rng.normal(size=(steps[c], 4, dim)).astype(np.float32),
                            "y": rng.normal(size=(steps[c], 4)).astype(np.float32)}) for c in range(n_clients)}

    def loss(params, batch, key):
        return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2), {}

    params = {"w": jnp.zeros(dim), "b": jnp.zeros(())}
    return (lambda r, c: data[c]), params, ClientConfig(loss, optax.sgd(0.5)), np.array(steps) * 40


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A synthetic two-domain dataset of 60 users (80 / 90 items, histories of 10-12), made once per session;
    tests read it and write their runs elsewhere."""
    from fedscope_jax.cli import main

    out = tmp_path_factory.mktemp("data") / "syn"
    assert main(["data", "synth", "--out", str(out), "--users", "60", "--items-a", "80", "--items-b", "90",
                 "--max-length", "12", "--mean-length", "10", "--min-length", "10"]) == 0
    return out
