"""The project's one Gaussian mechanism: a clipping step that carries its sensitivity, and a noise step.

Contributors sit on a leading axis [c] (the clients of a chunk). The clipping step scales contributor k's
value x_k by s_k = w_k min(1, C_k / ||x_k||), so that s_k x_k has norm <= w_k C_k, and reports that bound:
adding or removing one contributor moves the sum sum_k s_k x_k by at most max_k w_k C_k in L2 (its
sensitivity). The noise step draws N(0, std^2) on every coordinate, leaf i of a pytree from
fold_in(key, i), so a draw depends on its key alone, never on how the contributors are chunked, sharded or
padded. The Gaussian mechanism is then x + N(0, (z * sensitivity)^2): the engine adds it per contributor
(each its own key), once on the sum of contributors (as the same distribution, one draw), or once on the sum
with a central noise multiplier. The habit is jax_privacy's BoundedSensitivityCallable and optax's DP
transforms; everything is a pure, jittable function over pytrees.

The user unit clips per user inside a client's local step (`clipped_user_sum`, jax_privacy's `clipped_grad`; or
engine/client.py `user_rows_sum`, which takes each user's gradient on its own item rows and clips with `clip`):
the sum over a Poisson-sampled batch of each user's clipped gradient has sensitivity C (add or remove one user;
2C to replace one), and the step adds N(0, (z C)^2) to it (`add_noise`) before dividing by the expected batch.

Also here: per-client quantile clipping (its noised bit is the other Gaussian mechanism a client releases).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jax_privacy
import optax
from jax_privacy import sharding_utils

PyTree = Any


def clip_factor(norm: jax.Array, clip: jax.Array) -> jax.Array:
    """min(1, C / norm); 1 for a zero update or C = inf."""
    return jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))


def noise_std(clip: jax.Array, noise_multiplier: jax.Array) -> jax.Array:
    """z * C, with z = 0 meaning no noise even when C = inf."""
    return jnp.where(noise_multiplier > 0, noise_multiplier * clip, 0.0)


def contribution_bounds(weight: jax.Array, clip: jax.Array) -> jax.Array:
    """w_k C_k: the most contributor k's clipped, weighted value can move a sum (0 where w_k = 0, e.g. padding
    with C = inf). From public inputs only, never from the values."""
    return jnp.where(weight > 0, weight * clip, 0.0)


def sum_noise_std(weight: jax.Array, clip: jax.Array, noise_multiplier: jax.Array) -> jax.Array:
    """Std of ONE Gaussian draw on a weighted sum of clipped contributions: z x sensitivity, i.e.
    max_k w_k z_k C_k (contributors with w_k = 0 bound nothing). From public inputs only."""
    return jnp.max(weight * noise_std(clip, noise_multiplier))


class Clipped(NamedTuple):
    """The clipping step's output over the contributor axis [c] (the values themselves are not materialized:
    the caller multiplies contributor k's value by `scale[k]` where it sums)."""

    scale: jax.Array     # w_k min(1, C_k / ||x_k||) for included contributors, else 0
    norm: jax.Array      # raw L2 norm of x_k (NaN / inf when x_k is not finite)
    factor: jax.Array    # min(1, C_k / ||x_k||): 1 means not clipped
    included: jax.Array  # bool: w_k > 0 and x_k finite
    bound: jax.Array     # w_k C_k (`contribution_bounds`): ||scale_k x_k|| <= bound_k

    def sensitivity(self) -> jax.Array:
        """L2 sensitivity of sum_k scale_k x_k to adding or removing one contributor."""
        return jnp.max(self.bound)


def clip(values: PyTree, clip_norms: jax.Array, weight: jax.Array,
         finite: jax.Array | None = None) -> tuple[PyTree, Clipped]:
    """The clipping step. values: a pytree whose leaves have the contributor axis [c].

    Returns (values with non-finite contributors zeroed, Clipped). A contributor is excluded (scale 0) when
    w_k = 0 or its value (or `finite[k]` False, e.g. its loss) is not finite; C_k = inf means no clipping."""
    ok = jnp.ones(weight.shape, bool) if finite is None else finite
    for leaf in jax.tree.leaves(values):
        ok &= jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    norm = jax.vmap(optax.tree.norm)(values)
    values = jax.tree.map(lambda v: jnp.where(ok.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0.0), values)
    factor = clip_factor(jnp.where(ok, norm, 0.0), clip_norms)
    included = ok & (weight > 0)
    scale = jnp.where(included, weight, 0.0) * factor
    return values, Clipped(scale, norm, factor, included, contribution_bounds(weight, clip_norms))


def standard_normal(key: jax.Array, index: int, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The one draw: N(0, 1) of `shape` for leaf `index`, from fold_in(key, index)."""
    return jax.random.normal(jax.random.fold_in(key, index), shape, dtype)


def add_noise(tree: PyTree, std: jax.Array, key: jax.Array) -> PyTree:
    """The noise step: tree + N(0, std^2) on every coordinate (leaf i drawn with `standard_normal(key, i)`)."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [x + std * standard_normal(key, i, x.shape, x.dtype)
                                        for i, x in enumerate(leaves)])


def contributor_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
    """[c] keys fold_in(key, id_k): contributor k's own noise key, whatever chunk it sits in."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids)


def contributor_noise(keys: jax.Array, index: int, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """[c, *shape]: each contributor's own `standard_normal` draw for leaf `index`, from its key."""
    return jax.vmap(standard_normal, in_axes=(0, None, None, None))(keys, index, shape, dtype)


def clipped_user_sum(loss_fn: Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Any]], params: PyTree,
                     batch: PyTree, key: jax.Array, user_mask: jax.Array, clip: jax.Array,
                     microbatch: int | None = None) -> tuple[PyTree, jax.Array]:
    """(sum over the real users of `batch` of each user's gradient clipped to L2 norm `clip`, each user's loss).

    batch: a pytree whose leaves have the user axis first; `loss_fn(params, one_user_batch, key)` sees one
    user at a time (a batch axis of size 1, its own key from `jax.random.split(key, users)`), so no user's
    term can read another user's data. Padding users (user_mask False) add exactly zero. The clip norm may be
    a traced per-client value: the loss is scaled by 1 / clip and clipped to norm 1 (jax_privacy's
    `clipped_grad`), then scaled back, which is clip_C(g) = C clip_1(g / C). clip = inf (a non-private
    configuration, or a padding row) is a clip at 2^20 (a power of two: the scaling is exact), above any
    gradient of these models. Sensitivity of the sum: `clip` (add or remove one user), 2 clip (replace one).
    microbatch: users whose per-user gradients are computed at once (a loop over the rest; the batch size must
    be a multiple). jax_privacy groups users i, i + m, i + 2m, ... into each of the m microbatches and skips
    only microbatches without a real user, so the users are first put in its early-stopping order
    (`sharding_utils.compute_early_stopping_order`): microbatch j then holds users j s, ..., j s + s - 1, and a
    Poisson batch (real users first) computes only its microbatches up to the last real user. Each user keeps
    its key, `jax.random.split(key, users)[u]`, whatever the order. None: all at once. engine/client.py
    `user_rows_sum` gives the same sum more cheaply where the loss reads only the item rows each user names."""
    c = jnp.where(jnp.isfinite(clip), clip, 2.0 ** 20)
    users = user_mask.shape[0]
    impl = jax.random.key_impl(key)   # the keys travel as raw data: optax's microbatch reshape takes no key arrays
    keyed, mask = (batch, jax.random.key_data(jax.random.split(key, users))), user_mask
    order = None if not microbatch or microbatch >= users else sharding_utils.compute_early_stopping_order(
        users, microbatch)
    if order is not None:
        keyed, mask = jax.tree.map(lambda x: x[order], (keyed, mask))

    def scaled(p: PyTree, b: tuple[PyTree, jax.Array]) -> tuple[jax.Array, jax.Array]:
        user, k = b
        loss, _ = loss_fn(p, user, jax.random.wrap_key_data(k[0], impl=impl))
        return loss / c, loss

    grad_fn = jax_privacy.clipped_grad(scaled, has_aux=True, l2_clip_norm=1.0, batch_argnums=1,
                                       keep_batch_dim=True, microbatch_size=microbatch or None)
    grads, out = grad_fn(params, keyed, is_padding_example=~mask)
    losses = out.aux if order is None else jnp.zeros_like(out.aux).at[order].set(out.aux)   # the batch's order
    return jax.tree.map(lambda g: g * c.astype(g.dtype), grads), losses


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
