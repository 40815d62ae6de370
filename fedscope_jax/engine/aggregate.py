"""The privacy layer's one mechanism (privacy/mechanism.py: clipping with its bound, Gaussian noise) applied to
chunks of client updates, NaN exclusion, and the weighted sum.

Everything here works on a chunk of clients (a leading client axis [c]) and accumulates into dense sums
shaped like the global parameters, so no [C, params] array ever exists beyond one chunk.

Privacy inputs are vectors over the client axis: `clip` (C_k, inf = no clipping) and `noise_multiplier`
(z_k, 0 = no noise). Noise modes:
  "off": no noise is drawn (z is ignored);
  "per_client": each client adds its own dense N(0, (z_k C_k)^2) to its clipped update (no secure
      aggregation: the server sees every update, so every coordinate of every update is noised);
  "sum": the server only sees the sum (secure aggregation), so the clients' independent noises are drawn
      as one Gaussian with variance sum_k (w_k z_k C_k)^2 over the summed vector: the same distribution
      as "per_client" for the aggregate, at the cost of one draw instead of one per client;
  "central": central DP-FedAvg: no client noise; `finalize` adds N(0, central_std^2) ONCE to the weighted
      sum and divides by a denominator the caller computes from public inputs (round.py).
Secure aggregation (optional, `secagg=(bound, neighbors)`): each chunk's per-client vectors w_k (clip(Δ_k)
[+ noise_k]) are summed with `privacy.secagg.secure_sum` (quantized, pairwise-masked, the chunk's clients
being one secagg group) instead of the plain sum; the difference to the plain sum is kept in `agg_error`.
A client whose delta or loss is not finite is excluded (weight 0, no noise) and reported.
Group means (`group_mean`, without noise only): each top-level subtree of the parameters (a domain's tower, a
shared encoder) is divided by the weight of the clients whose update changed it instead of by every client's,
so a group that only some clients train (one client a domain) is not shrunk by the others' zeros.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedscope_jax.engine.client import SparseTable
from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy import mechanism

PyTree = Any
NOISE_MODES = ("off", "per_client", "sum", "central")


class Accumulator(NamedTuple):
    """Running sums over the clients of a round (dense, shaped like the global params)."""

    delta_sum: PyTree       # sum_k w_k * (clip_k(delta_k) [+ noise_k])
    weight_sum: jax.Array   # sum_k w_k over included clients
    noise_var: jax.Array    # sum_k (w_k z_k C_k)^2 over included clients ("sum" mode draws from it)
    agg_error: PyTree = 0.0  # secure sum - plain sum (dense like delta_sum with secagg; a scalar 0 without)
    group_weight: PyTree = ()  # group means: {top-level key: sum_k w_k over the clients that changed it}


class ClientReport(NamedTuple):
    """Per-client facts of a round (vectors over the client axis)."""

    client_id: jax.Array
    loss: jax.Array
    steps: jax.Array
    norm: jax.Array         # L2 norm of the raw update (NaN/inf when the update is not finite)
    clip_factor: jax.Array  # min(1, C_k / norm): 1 means not clipped
    included: jax.Array     # bool: counted in the aggregate (real client with a finite update)


def zeros_accumulator(params: PyTree, secagg: bool = False, group_mean: bool = False) -> Accumulator:
    """An empty accumulator for `params` (with a dense aggregation-error sum when `secagg`, and a weight per
    top-level key of `params` when `group_mean`)."""
    zero = jnp.zeros((), jnp.float32)
    error = jax.tree.map(jnp.zeros_like, params) if secagg else zero
    groups = {k: zero for k in params} if group_mean else ()
    return Accumulator(jax.tree.map(jnp.zeros_like, params), zero, zero, error, groups)


def _group_weights(acc: Accumulator, deltas: PyTree, weight: jax.Array) -> PyTree:
    """acc.group_weight plus, per top-level key, the weights of the chunk's clients whose delta there is not 0."""
    if not acc.group_weight:
        return acc.group_weight
    out = {}
    for key, total in acc.group_weight.items():
        changed = [jnp.any(x != 0, axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(deltas[key])]
        out[key] = total + jnp.sum(jnp.where(jnp.any(jnp.stack(changed), axis=0), weight, 0.0))
    return out


def add_accumulators(a: Accumulator, b: Accumulator) -> Accumulator:
    """Elementwise sum of two accumulators."""
    return jax.tree.map(jnp.add, a, b)


def _key_path(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def accumulate_chunk(acc: Accumulator, deltas: PyTree, losses: jax.Array, steps: jax.Array,
                     vocab: dict[str, jax.Array], client_id: jax.Array, weight: jax.Array, clip: jax.Array,
                     noise_multiplier: jax.Array, noise_key: jax.Array, tables: tuple[SparseTable, ...],
                     noise_mode: str, secagg: tuple[float, int | None] | None = None
                     ) -> tuple[Accumulator, ClientReport]:
    """Clips, noises and adds a chunk of client deltas (leading axis [c]) into `acc`.

    secagg: (bound B, masking neighbours) to sum the chunk with simulated secure aggregation."""
    deltas, clipped = mechanism.clip(deltas, clip, weight, finite=jnp.isfinite(losses))
    scale, weight = clipped.scale, jnp.where(clipped.included, weight, 0.0)
    sigma = mechanism.noise_std(clip, noise_multiplier) * weight  # std of w_k * noise_k

    sparse = {t.path: t.name for t in tables}
    client_keys = mechanism.contributor_keys(jax.random.fold_in(noise_key, 1), client_id)
    flat, treedef = jax.tree_util.tree_flatten_with_path(acc.delta_sum)
    delta_leaves = jax.tree.leaves(deltas)
    new_leaves = []
    for index, ((path, total), delta) in enumerate(zip(flat, delta_leaves)):
        name = sparse.get(_key_path(path))
        if name is None:
            total = total + jnp.tensordot(scale, delta, axes=1)
        else:
            rows = (scale[:, None, None] * delta).reshape(-1, delta.shape[-1])
            total = total.at[vocab[name].reshape(-1)].add(rows, mode="drop")
        if noise_mode == "per_client":
            noise = mechanism.contributor_noise(client_keys, index, total.shape, total.dtype)
            total = total + jnp.tensordot(sigma, noise, axes=1)
        new_leaves.append(total)
    agg_error = acc.agg_error
    if secagg is None:
        delta_sum = jax.tree_util.tree_unflatten(treedef, new_leaves)
    else:  # the secure sum replaces the plain one (the plain one above is traced but unused: XLA drops it)
        delta_sum, agg_error = _secure_chunk_sum(acc, deltas, scale, sigma, client_keys, client_id,
                                                 clipped.included, noise_key, noise_mode, secagg, bool(sparse))
    noise_var = acc.noise_var + jnp.sum(sigma**2) if noise_mode in ("per_client", "sum") else acc.noise_var
    acc = Accumulator(delta_sum, acc.weight_sum + jnp.sum(weight), noise_var, agg_error,
                      _group_weights(acc, deltas, weight))
    report = ClientReport(client_id=client_id, loss=losses, steps=steps, norm=clipped.norm,
                          clip_factor=clipped.factor, included=clipped.included)
    return acc, report


def _secure_chunk_sum(acc: Accumulator, deltas: PyTree, scale: jax.Array, sigma: jax.Array,
                      client_keys: jax.Array, client_id: jax.Array, included: jax.Array, noise_key: jax.Array,
                      noise_mode: str, secagg: tuple[float, int | None], sparse: bool) -> tuple[PyTree, PyTree]:
    """Adds the secure sum of the chunk's vectors w_k (clip(Δ_k) [+ noise_k]) to acc.delta_sum (whose
    leaves hold nothing of this chunk yet) and (secure - plain) to acc.agg_error. The per-client noise is
    drawn with the same keys as "per_client" mode, so the result differs from it only by quantization."""
    from fedscope_jax.privacy import secagg as sa

    if sparse:
        raise FedscopeError("secure aggregation needs dense client updates (no SparseTable local vocabularies)")
    leaves, treedef = jax.tree.flatten(deltas)
    c = leaves[0].shape[0]
    rows = []
    for index, d in enumerate(leaves):
        expand = (-1,) + (1,) * (d.ndim - 1)
        v = scale.reshape(expand).astype(d.dtype) * d
        if noise_mode == "per_client":
            noise = mechanism.contributor_noise(client_keys, index, d.shape[1:], d.dtype)
            v = v + sigma.reshape(expand).astype(d.dtype) * noise
        rows.append(v.reshape(c, -1).astype(jnp.float32))
    flat = jnp.concatenate(rows, axis=1)
    params = sa.make_params(c, secagg[0], neighbors=secagg[1])
    group_key = jax.random.fold_in(jax.random.fold_in(noise_key, 3), client_id[0])
    secure = sa.secure_sum(flat, included, group_key, params)
    error = secure - jnp.sum(jnp.where(included[:, None], flat, 0.0), axis=0)
    sizes = [int(x[0].size) for x in leaves]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def unflat(vec: jax.Array) -> PyTree:
        return jax.tree.unflatten(treedef, [vec[o:o + n].reshape(x.shape[1:]).astype(x.dtype)
                                            for o, n, x in zip(offsets, sizes, leaves)])
    delta_sum = jax.tree.map(jnp.add, acc.delta_sum, unflat(secure))
    return delta_sum, jax.tree.map(jnp.add, acc.agg_error, unflat(error))


def finalize(acc: Accumulator, noise_key: jax.Array, noise_mode: str, central_std: jax.Array | None = None,
             denominator: jax.Array | None = None) -> tuple[PyTree, jax.Array]:
    """The weighted mean update sum / W (plus the one aggregate draw in "sum" mode), and its noise std / W;
    with group means each top-level group's sum / the weight of the clients that changed it (no noise).

    "central": N(0, central_std^2) is added once to the sum, and W = `denominator` (public inputs only)."""
    total = acc.delta_sum
    std = jnp.sqrt(acc.noise_var)
    sum_key = jax.random.fold_in(noise_key, 2)
    if acc.group_weight:
        if noise_mode != "off":
            raise FedscopeError("group means divide by data-dependent weights: only without noise (noise_mode 'off')")
        return {k: jax.tree.map(lambda t, w=acc.group_weight[k]: t / jnp.maximum(w, 1e-30), v)
                for k, v in total.items()}, jnp.zeros((), jnp.float32)
    if noise_mode == "central":
        if central_std is None or denominator is None:
            raise FedscopeError("noise_mode 'central' needs central_std and denominator (engine/round.py)")
        std = jnp.asarray(central_std, jnp.float32)
        total = mechanism.add_noise(total, std, sum_key)
        denom = jnp.maximum(denominator, 1e-30)
        mean = jax.tree.map(lambda t: t / denom, total)
        return mean, jnp.where(denominator > 0, std / denom, 0.0)
    if noise_mode == "sum":
        total = mechanism.add_noise(total, std, sum_key)
    denom = jnp.maximum(acc.weight_sum, 1e-30)
    mean = jax.tree.map(lambda t: t / denom, total)
    return mean, jnp.where(acc.weight_sum > 0, std / denom, 0.0)
