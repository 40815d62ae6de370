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

from fedscope_jax.errors import FedscopeError

__all__ = ["agree", "all_ok", "fetch", "initialize", "is_primary", "primary_dir", "process_index", "run_dir"]


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the processes of one run (`jax.distributed.initialize`); arguments left as None are read from
    the cluster's environment (SLURM, Open MPI; JAX_COORDINATOR_ADDRESS). Call before any JAX computation."""
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise FedscopeError(f"--multi-host: cannot join the run's processes (--coordinator {coordinator}, "
                            f"--num-processes {num_processes}, --process-id {process_id}; unset ones come from "
                            f"SLURM, Open MPI or JAX_COORDINATOR_ADDRESS): {exc}") from None


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
    """This process's run directory: `out` for process 0, `out.processI` (a sibling) for process I > 0."""
    out = Path(out)
    return out if is_primary() else out.with_name(f"{out.name}.process{process_index()}")


def primary_dir(path: str | Path) -> Path:
    """The run directory of process 0 for this process's `run_dir` (where the shared checkpoints live)."""
    suffix = f".process{process_index()}"
    path = Path(path)
    return path.with_name(path.name[:-len(suffix)]) if not is_primary() and path.name.endswith(suffix) else path


def all_ok(error: Exception | None) -> None:
    """Raises on every process when a check failed on any of them (`error`: this process's failure, re-raised
    here, or None), so that no process waits forever in a collective the failed one never reaches."""
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
    if error is not None:
        raise error
    if jax.process_count() > 1 and np.any(failed):
        bad = [int(i) for i in np.flatnonzero(failed)]
        raise FedscopeError(f"process(es) {bad} of the run failed a check (their own error says which); "
                            "this process stops with them")


def agree(flag: bool) -> bool:
    """Process 0's `flag`, on every process: a decision taken on one clock (when to checkpoint) that every
    process must follow, since they write the shared checkpoints together."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))
