"""Server optimizers (optax) applied to the pseudo-gradient -mean_delta, and the server state."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedscope_jax.errors import FedscopeError

PyTree = Any
SERVER_OPTIMIZERS = ("fedavg", "fedadam")


class ServerState(NamedTuple):
    """Global model, server optimizer state and the number of rounds done."""

    params: PyTree
    opt_state: PyTree
    round: jax.Array  # int32 scalar


@functools.lru_cache(maxsize=32)
def server_optimizer(name: str, learning_rate: float = 1.0, b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation:
    """FedAvg = SGD on -mean_delta (lr 1 gives params + mean_delta); FedAdam = Adam on it (Reddi et al. 2021).

    Cached, so equal settings give the same object and `make_round_fn` reuses its compiled round."""
    if name == "fedavg":
        return optax.sgd(learning_rate)
    if name == "fedadam":
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    raise FedscopeError(f"server optimizer: expected one of {', '.join(SERVER_OPTIMIZERS)}, got {name!r}")


def init_server_state(params: PyTree, optimizer: optax.GradientTransformation) -> ServerState:
    """Round 0 state (on a copy of `params`: the round function donates the state's buffers)."""
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    return ServerState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def server_step(state: ServerState, mean_delta: PyTree,
                optimizer: optax.GradientTransformation) -> ServerState:
    """One server update with the pseudo-gradient -mean_delta."""
    grads = jax.tree.map(jnp.negative, mean_delta)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return ServerState(optax.apply_updates(state.params, updates), opt_state, state.round + 1)
