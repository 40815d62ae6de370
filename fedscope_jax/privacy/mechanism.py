"""The per-client Gaussian mechanism as pure jnp functions over pytrees with a leading client axis.

Everything here is jittable and vectorized over the client axis C: clip norms C_k, noise std z_k * C_k,
clipped-bits and participation are all [C] vectors, so the engine fuses them into its one jitted round.
Random keys come in per client (a [C] key array, e.g. `jax.random.split(round_noise_key, C)`), so the
noise a client draws does not depend on how the engine chunks the client axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def per_client_norms(updates: PyTree) -> jax.Array:
    """Global L2 norm of each client's update (over all leaves): [C] float32."""
    leaves = jax.tree_util.tree_leaves(updates)
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves]
    return jnp.sqrt(sum(squares))


def _per_client_scale(leaf: jax.Array, scale: jax.Array) -> jax.Array:
    return leaf * scale.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def clip_per_client(updates: PyTree, clip_norms: jax.Array) -> tuple[PyTree, jax.Array]:
    """Scales client k's update to global norm <= clip_norms[k]; returns (clipped, unclipped norms).

    An infinite clip norm leaves the update unchanged (privacy off).
    """
    norms = per_client_norms(updates)
    clip_norms = jnp.asarray(clip_norms, jnp.float32)
    scale = jnp.minimum(1.0, clip_norms / jnp.maximum(norms, 1e-12))
    return jax.tree_util.tree_map(lambda x: _per_client_scale(x, scale), updates), norms


def add_noise_per_client(updates: PyTree, noise_stds: jax.Array, keys: jax.Array) -> PyTree:
    """Adds N(0, noise_stds[k]^2) to every coordinate of client k's update, with client k's own key."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    noise_stds = jnp.asarray(noise_stds, jnp.float32)

    def one_client(key: jax.Array, std: jax.Array, *client_leaves: jax.Array) -> list[jax.Array]:
        leaf_keys = jax.random.split(key, len(client_leaves))
        return [x + (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                for k, x in zip(leaf_keys, client_leaves)]

    noised = jax.vmap(one_client)(keys, noise_stds, *leaves)
    return jax.tree_util.tree_unflatten(treedef, noised)


def privatize_updates(updates: PyTree, clip_norms: jax.Array, noise_multipliers: jax.Array,
                      keys: jax.Array) -> tuple[PyTree, jax.Array]:
    """Clip each client's update to C_k, then add N(0, (z_k C_k)^2): the local Gaussian mechanism.

    Returns (privatized updates, unclipped norms). Clients with z_k = 0 get no noise; C_k = inf no clipping
    (and must have z_k = 0: privacy off).
    """
    clipped, norms = clip_per_client(updates, clip_norms)
    clip_norms = jnp.asarray(clip_norms, jnp.float32)
    stds = jnp.where(jnp.asarray(noise_multipliers) > 0, jnp.asarray(noise_multipliers, jnp.float32) * clip_norms,
                     0.0)
    return add_noise_per_client(clipped, stds, keys), norms


def adaptive_clip_update(clip_norms: jax.Array, norms: jax.Array, participated: jax.Array, key: jax.Array, *,
                         target_quantile: float, learning_rate: float, bit_noise: jax.Array | float,
                         min_clip: jax.Array | float = 0.0, max_clip: jax.Array | float = jnp.inf) -> jax.Array:
    """One step of per-client quantile clipping (Andrew et al. 2021, geometric update), over the client axis.

    Client k releases the noised bit b_k = 1[norm_k <= C_k] + N(0, bit_noise_k^2) and sets
    C_k <- C_k * exp(-lr * (b_k - target_quantile)), so log C_k drifts toward the target quantile of the
    client's own update-norm history. Clients that did not participate keep C_k (and release nothing).
    The bit's privacy cost is folded into the effective noise multiplier (accounting.effective_noise_multiplier).
    The result is kept within [min_clip, max_clip] (post-processing of released bits: no privacy cost), which
    bounds the random walk the bit noise causes. bit_noise = 0 gives the non-private rule (for tests only).
    """
    clip_norms = jnp.asarray(clip_norms, jnp.float32)
    bits = (norms <= clip_norms).astype(jnp.float32)
    noise = jax.random.normal(key, clip_norms.shape, jnp.float32) * jnp.asarray(bit_noise, jnp.float32)
    noised = bits + noise
    updated = jnp.clip(clip_norms * jnp.exp(-learning_rate * (noised - target_quantile)), min_clip, max_clip)
    return jnp.where(participated, updated, clip_norms)


def sample_participants(key: jax.Array, sampling_rates: jax.Array, eligible: jax.Array) -> jax.Array:
    """Poisson sampling: client k takes part with probability q_k, independently, if still eligible."""
    draws = jax.random.uniform(key, jnp.shape(sampling_rates))
    return (draws < jnp.asarray(sampling_rates)) & jnp.asarray(eligible, bool)


def add_central_noise(aggregate: PyTree, noise_std: float | jax.Array, key: jax.Array) -> PyTree:
    """Central DP-FedAvg: N(0, (z C)^2) added ONCE to the sum of clipped updates (no client axis)."""
    leaves, treedef = jax.tree_util.tree_flatten(aggregate)
    keys = jax.random.split(key, len(leaves))
    noised = [x + (noise_std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
              for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, noised)
