"""Checkpoints of the server state with orbax (one step per finished round), for `--resume`.

A checkpoint holds the global params, the server optimizer state and the round counter; everything else
a round needs (client sampling, local batches, PRNG keys) is derived from (seed, round), so a resumed run
repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedscope_jax.engine.server import ServerState
from fedscope_jax.errors import FedscopeError


class Checkpointer:
    """Saves/restores ServerState under `directory` (keeps the last `keep` rounds)."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state: ServerState) -> None:
        """Writes the state as step `state.round` and waits until it is on disk."""
        tree = {"params": state.params, "opt_state": state.opt_state, "round": state.round}
        self._manager.save(int(state.round), args=ocp.args.StandardSave(tree))
        self._manager.wait_until_finished()

    def latest_round(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, like: ServerState) -> ServerState:
        """The latest state, restored into the structure of `like` (uncommitted arrays)."""
        step = self._manager.latest_step()
        if step is None:
            raise FedscopeError(f"{self.directory}: no checkpoint to resume from")
        abstract: Any = {"params": like.params, "opt_state": like.opt_state, "round": like.round}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        # uncommitted arrays like a fresh state's: the round program lays them on its own devices (a mesh of
        # several devices or hosts) instead of the one device orbax restored them to, and compiles once
        tree = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)
        return ServerState(tree["params"], tree["opt_state"], tree["round"])

    def close(self) -> None:
        self._manager.close()
