"""Several processes (hosts) running one simulation on JAX's own runtime (`jax.distributed`).

Every process runs the same program on the same inputs: the cohorts are built from (seed, round) on each host
and the client axis of the round is laid over the devices of all hosts (`round.client_mesh`). What a process
reads back from a round (client reports, the server state) may span devices of other hosts; `fetch` gathers
it, so host code (metrics, the privacy ledger, evaluation) sees the same numbers on every process.

Files: process 0 writes the run directory RUN, process I > 0 the same files to RUN.processI (`run_dir`), except
the checkpoints, which orbax writes together into RUN/checkpoints (`primary_dir`): that folder must be one
shared folder for all processes (a shared file system; on one machine it is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["barrier", "fetch", "initialize", "is_primary", "primary_dir", "process_index", "run_dir"]


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the processes of one run (`jax.distributed.initialize`); arguments left as None are read from
    the cluster's environment (SLURM, Open MPI; JAX_COORDINATOR_ADDRESS). Call before any JAX computation."""
    jax.distributed.initialize(coordinator, num_processes, process_id)


def process_index() -> int:
    """This process's index among the run's processes (0 when there is one)."""
    return jax.process_index()


def is_primary() -> bool:
    """Whether this process writes the run's outputs (process 0; the only process of a one-host run)."""
    return jax.process_index() == 0


def _fetch(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)


def fetch(tree: Any) -> Any:
    """`jax.device_get` that also reads arrays spanning other hosts' devices (gathered to every process)."""
    return jax.tree.map(_fetch, tree)



def run_dir(out: str | Path) -> Path:
    """This process's run directory: `out` for process 0, `out.processI` for process I > 0."""
    return Path(out) if is_primary() else Path(f"{out}.process{process_index()}")


def primary_dir(path: str | Path) -> Path:
    """The run directory of process 0 for this process's `run_dir` (where the shared checkpoints live)."""
    suffix = f".process{process_index()}"
    path = Path(path)
    return path.with_name(path.name[:-len(suffix)]) if not is_primary() and path.name.endswith(suffix) else path


def barrier(name: str) -> None:
    """Waits until every process of the run reaches the barrier `name` (nothing to wait for with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
