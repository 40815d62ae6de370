"""Simulated secure aggregation (Bonawitz et al. 2017 style), vectorized over the client axis in jnp.

Protocol for one group of n clients (a round's cohort, or one chunk of it), each holding a float vector:

client side (`client_encode`, `client_mask`):
  1. clip every coordinate to [-B, B];
  2. stochastically quantize to integers in [-L, L] (q = floor(y) + 1[u < y - floor(y)] for y = x L/B,
     u ~ U[0, 1): unbiased, |q - y| < 1), stored in the ring Z_{2^32} (two's complement, uint32);
  3. add a self mask PRG(b_i) and pairwise masks: for each pairing offset d, client i adds PRG(s_{i,i+d})
     and client i+d subtracts it (indices mod n). Seeds are jax.random keys derived per pair from the
     round's secagg key (standing in for the Diffie-Hellman key agreement of the real protocol).
  All arithmetic wraps mod 2^32 (uint32), so every masked vector is uniform on the ring.
server side (`server_aggregate`, `dequantize`): receives ONLY the masked vectors of the clients that
  delivered, plus the seeds the survivors reveal: the self seeds of delivered clients and the pair seeds
  shared with dropped clients (never both for one client). It sums mod 2^32, removes the self masks and
  the uncancelled pair masks, reads the result as int32 and rescales by B/L.

Exactness: the pairwise masks cancel exactly; the sum is exact in the ring as long as n L < 2^31, which
`make_params` guarantees. The only error against the plain sum of the clipped vectors is quantization:
at most one step B/L per client and coordinate (plus float32 rounding of the result).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp

from fedscope_jax.errors import FedscopeError

RING_HALF = 2**31
MAX_LEVELS = 2**15  # keeps 2^8 float32 steps of resolution for the rounding probability


@dataclasses.dataclass(frozen=True)
class SecAggParams:
    """bound B (coordinate range), levels L (quantization grid), offsets d (client i pairs with i+-d)."""

    num_clients: int
    bound: float
    levels: int
    offsets: tuple[int, ...]

    @property
    def step(self) -> float:
        """Quantization step B/L."""
        return self.bound / self.levels


def make_params(num_clients: int, bound: float, levels: int | None = None,
                neighbors: int | None = None) -> SecAggParams:
    """Parameters for n clients: L defaults to the finest grid with n L < 2^31 (at most 2^15);
    `neighbors` partners per client (None: every other client). Raises FedscopeError when n L overflows."""
    if num_clients < 1:
        raise FedscopeError(f"secagg: need at least one client, got {num_clients}")
    if not (bound > 0 and math.isfinite(bound)):
        raise FedscopeError(f"secagg: the clipping range bound must be positive and finite, got {bound!r}")
    if levels is None:
        levels = min(MAX_LEVELS, (RING_HALF - 1) // num_clients)
    if levels < 1 or num_clients * levels >= RING_HALF or levels > MAX_LEVELS:
        raise FedscopeError(f"secagg: levels={levels} with {num_clients} clients does not fit the ring "
                            f"(need 1 <= L <= {MAX_LEVELS} and n*L < 2^31)")
    half = num_clients // 2
    if neighbors is None:
        count = half
    else:
        if neighbors < 1:
            raise FedscopeError(f"privacy.secagg_neighbors: expected a positive integer, got {neighbors}")
        count = min(half, -(-neighbors // 2))
    return SecAggParams(int(num_clients), float(bound), int(levels), tuple(range(1, count + 1)))


# --- seeds (the stand-in for key agreement) ---------------------------------------------------------------
def _self_keys(secagg_key: jax.Array, n: int) -> jax.Array:
    base = jax.random.fold_in(secagg_key, 0)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


def _pair_keys(secagg_key: jax.Array, n: int, d: int) -> jax.Array:
    """Seed of the pair (i, (i+d) mod n) for every i: [n] keys, known to both members of the pair."""
    base = jax.random.fold_in(secagg_key, 1)
    i = jnp.arange(n)
    return jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(base, a), b))(i, (i + d) % n)


def _prg(keys: jax.Array, dim: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.bits(k, (dim,), jnp.uint32))(keys)


# --- client side ------------------------------------------------------------------------------------------
def client_encode(values: jax.Array, keys: jax.Array, params: SecAggParams) -> jax.Array:
    """[n, D] floats -> [n, D] uint32 ring elements: clip to [-B, B], stochastic rounding to [-L, L]."""
    scale = params.levels / params.bound
    scaled = jnp.clip(values.astype(jnp.float32), -params.bound, params.bound) * scale
    uniform = jax.vmap(lambda k: jax.random.uniform(k, values.shape[1:], jnp.float32))(keys)
    low = jnp.floor(scaled)
    frac = scaled - low  # exact in floating point: round up with probability frac (unbiased)
    q = jnp.clip(low + (uniform < frac), -params.levels, params.levels).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(q, jnp.uint32)


def client_mask(encoded: jax.Array, secagg_key: jax.Array, params: SecAggParams) -> jax.Array:
    """Adds each client's self mask and pairwise masks (mod 2^32): what a client sends to the server."""
    n, dim = encoded.shape
    _check_n(n, params)
    masked = encoded + _prg(_self_keys(secagg_key, n), dim)

    def add_offset(total: jax.Array, d: jax.Array) -> tuple[jax.Array, None]:
        m = _prg(_pair_keys(secagg_key, n, d), dim)   # row i: mask of pair (i, i+d)
        return total + m - jnp.roll(m, d, axis=0), None  # i adds its pair's mask, i+d subtracts it

    if params.offsets:
        masked, _ = jax.lax.scan(add_offset, masked, jnp.asarray(params.offsets, jnp.int32))
    return masked


class RevealedSeeds(NamedTuple):
    """What the surviving clients reveal to the server after the dropouts are known.

    self_keys/self_coef: self seeds of delivered clients (coef 1; 0 and a dummy key otherwise).
    pair_keys/pair_coef: [offsets, n] seeds of pairs (i, i+d) with exactly one member delivered;
      coef +1 when i delivered (its +mask is in the sum), -1 when i+d delivered, 0 (dummy key) otherwise.
    """

    self_keys: jax.Array
    self_coef: jax.Array
    pair_keys: jax.Array
    pair_coef: jax.Array


def reveal_seeds(secagg_key: jax.Array, delivered: jax.Array, params: SecAggParams) -> RevealedSeeds:
    """The survivors' answer to the server's unmasking request, for the `delivered` bool [n] pattern."""
    n = delivered.shape[0]
    _check_n(n, params)
    dummy = jax.random.key_data(jax.random.key(0))

    def hide(keys: jax.Array, show: jax.Array) -> jax.Array:
        return jax.random.wrap_key_data(jnp.where(show[:, None], jax.random.key_data(keys), dummy[None]))

    def pairs(d: jax.Array) -> tuple[jax.Array, jax.Array]:
        partner = jnp.roll(delivered, -d)           # partner[i] = delivered[(i + d) % n]
        coef = delivered.astype(jnp.int32) - partner.astype(jnp.int32)
        return hide(_pair_keys(secagg_key, n, d), coef != 0), coef

    pair_keys, pair_coef = jax.vmap(pairs)(jnp.asarray(params.offsets, jnp.int32).reshape(-1))
    return RevealedSeeds(hide(_self_keys(secagg_key, n), delivered), delivered.astype(jnp.int32), pair_keys,
                         pair_coef)


# --- server side: only masked vectors and revealed seeds come in ------------------------------------------
def server_aggregate(masked: jax.Array, delivered: jax.Array, revealed: RevealedSeeds,
                     params: SecAggParams) -> jax.Array:
    """Sum (mod 2^32) of the delivered masked vectors, unmasked: int32 [D] sum of the quantized updates."""
    n, dim = masked.shape
    _check_n(n, params)
    total = jnp.sum(jnp.where(delivered[:, None], masked, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
    zero = jnp.uint32(0)
    self_masks = jnp.where(revealed.self_coef[:, None] == 1, _prg(revealed.self_keys, dim), zero)
    total = total - jnp.sum(self_masks, axis=0, dtype=jnp.uint32)

    def remove_offset(total: jax.Array, pair: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        keys, coef = pair
        m = _prg(keys, dim)
        total = total - jnp.sum(jnp.where(coef[:, None] == 1, m, zero), axis=0, dtype=jnp.uint32)  # +m in sum
        total = total + jnp.sum(jnp.where(coef[:, None] == -1, m, zero), axis=0, dtype=jnp.uint32)  # -m in sum
        return total, None

    if params.offsets:
        total, _ = jax.lax.scan(remove_offset, total, (revealed.pair_keys, revealed.pair_coef))
    return jax.lax.bitcast_convert_type(total, jnp.int32)


def dequantize(total: jax.Array, params: SecAggParams) -> jax.Array:
    """int32 sum of quantized values -> float32 sum (x B/L)."""
    return total.astype(jnp.float32) * jnp.float32(params.step)


# --- the whole protocol, for the engine --------------------------------------------------------------------
def secure_sum(values: jax.Array, delivered: jax.Array, key: jax.Array, params: SecAggParams) -> jax.Array:
    """Secure sum of the delivered rows of `values` [n, D] (float32 [D]); jittable with static params.

    key: this group's secagg key for the round (split here into quantization and masking keys).
    """
    quant_key, mask_key = jax.random.split(key)
    n = values.shape[0]
    encoded = client_encode(values, jax.random.split(quant_key, n), params)
    masked = client_mask(encoded, mask_key, params)
    revealed = reveal_seeds(mask_key, delivered, params)
    return dequantize(server_aggregate(masked, delivered, revealed, params), params)


def secure_sum_tree(updates, delivered: jax.Array, key: jax.Array, params: SecAggParams):
    """secure_sum over a pytree whose leaves have a leading client axis; returns the summed pytree."""
    flat = jax.vmap(lambda tree: jax.flatten_util.ravel_pytree(tree)[0])(updates)
    _, unravel = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], updates))
    return unravel(secure_sum(flat, delivered, key, params))


def error_bound(num_delivered: int, params: SecAggParams, plain_abs_sum: float = 0.0) -> float:
    """Worst-case |secure - plain| per coordinate for values within [-B, B]: one step per client, plus
    float32 rounding of the decoded sum (relative 2^-23 of its magnitude)."""
    return num_delivered * params.step + 2.0 ** -23 * (plain_abs_sum + num_delivered * params.step)


def _check_n(n: int, params: SecAggParams) -> None:
    if n != params.num_clients:
        raise FedscopeError(f"secagg: params were made for {params.num_clients} clients, got {n}")

