"""Checkpoints of the server state with orbax (one step per checkpointed round), for `--resume`.

A checkpoint holds the global params, the server optimizer state and the round counter (and, for a run that
selects its best validated round, that round's params); everything else a round needs (client sampling, local
batches, PRNG keys) is derived from (seed, round), so a resumed run repeats exactly what an uninterrupted one
would have done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedscope_jax.engine.server import ServerState
from fedscope_jax.errors import FedscopeError, ResumeMismatch


class Checkpointer:
    """Saves/restores ServerState under `directory` (keeps the last `keep` rounds)."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        # the handler named up front, so that item_metadata reads what a step holds before restoring it
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())

    def save(self, state: ServerState, best: Any = None) -> None:
        """Writes the state (and `best`: the best validated round's params, if any) as step `state.round` and
        waits until it is on disk."""
        tree = {"params": state.params, "opt_state": state.opt_state, "round": state.round}
        if best is not None:
            tree["best"] = best
        self._manager.save(int(state.round), args=ocp.args.StandardSave(tree))
        self._manager.wait_until_finished()

    def latest_round(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, like: ServerState) -> ServerState:
        """The latest state, restored into the structure of `like` (uncommitted arrays)."""
        return self.restore_with_best(like, with_best=False)[0]

    def restore_with_best(self, like: ServerState, with_best: bool) -> tuple[ServerState, Any]:
        """(latest state, its best params as host arrays, or None unless `with_best`). A checkpoint without
        best params when they are asked for (written before the run selected rounds) is a ResumeMismatch."""
        step = self._manager.latest_step()
        if step is None:
            raise FedscopeError(f"{self.directory}: no checkpoint to resume from (the run stopped before its first "
                                "one); start it again with --force")
        abstract: Any = {"params": like.params, "opt_state": like.opt_state, "round": like.round}
        if with_best:
            stored = self._manager.item_metadata(step)
            if stored is None or "best" not in stored:
                raise ResumeMismatch(f"{self.directory}: the checkpoint of round {step} holds no best-round "
                                     "params (written before federated runs selected their best round); "
                                     "retrain the run without --resume")
            abstract["best"] = like.params
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        best = jax.tree.map(np.asarray, tree["best"]) if with_best else None
        # uncommitted arrays like a fresh state's: the round program lays them on its own devices (a mesh of
        # several devices or hosts) instead of the one device orbax restored them to, and compiles once
        state = {k: tree[k] for k in ("params", "opt_state", "round")}
        tree = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
        return ServerState(tree["params"], tree["opt_state"], tree["round"]), best

    def close(self) -> None:
        self._manager.close()


def latest_round(directory: str | Path) -> int | None:
    """The round of the latest checkpoint under `directory` (None: no folder, or none written yet, e.g. a run
    killed before its first checkpoint), without creating the folder."""
    if not Path(directory).is_dir():
        return None
    ckpt = Checkpointer(directory)
    try:
        return ckpt.latest_round()
    finally:
        ckpt.close()
