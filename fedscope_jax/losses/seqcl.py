"""Sequence-level contrastive learning (CL4SRec, Xie et al. 2022): the FedCL4SRec-style baseline term.

Each user's in-domain sequence gets two random augmentations, each one of: item crop (keep a random contiguous
run of max(1, floor(eta * n)) of its n items), item mask (replace floor(gamma * n) random items by a mask token) and
item reorder (shuffle a random contiguous run of floor(beta * n) items). Both views go through the same domain
encoder; their user representations (output at the last position) are the positive pair of an NT-Xent / InfoNCE
loss over the batch's users (cosine similarity / tau; the other 2N - 2 views of the batch are the negatives).

Sequences are left-padded [B, L] shifted ids (0 = padding). Every augmentation returns a left-padded sequence of
real items plus a `keep` mask [B, L]: False where an item is masked. The mask token is the zero item vector
(the position embedding alone), so the model needs no extra parameter row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from fedscope_jax.losses.iidcl import cosine
from fedscope_jax.losses.rec import masked_mean

_NEG = -1e9
CROP, MASK, REORDER = 0, 1, 2


def _lengths(seq: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(seq > 0, axis=-1).astype(jnp.int32)


def _start(u: jnp.ndarray, choices: jnp.ndarray) -> jnp.ndarray:
    """Uniform integer in [0, choices) from a uniform [0, 1) draw (choices >= 1)."""
    return jnp.minimum(jnp.floor(u * choices).astype(jnp.int32), choices - 1)


def _crop(seq: jnp.ndarray, u_start: jnp.ndarray, eta: float) -> jnp.ndarray:
    length = seq.shape[1]
    n = _lengths(seq)
    c = jnp.minimum(jnp.maximum(jnp.floor(eta * n).astype(jnp.int32), 1), n)
    start = _start(u_start, jnp.maximum(n - c + 1, 1))                              # within the n real items
    j = jnp.arange(length)[None, :]
    src = j - n[:, None] + start[:, None] + c[:, None]       # item start + (j - (L - c)) sits at L - n + that
    out = jnp.take_along_axis(seq, jnp.clip(src, 0, length - 1), axis=1)
    return jnp.where(j >= length - c[:, None], out, 0)


def _mask(seq: jnp.ndarray, u_pos: jnp.ndarray, gamma: float) -> jnp.ndarray:
    k = jnp.floor(gamma * _lengths(seq)).astype(jnp.int32)
    u = jnp.where(seq > 0, u_pos, 2.0)
    rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)        # 0 = smallest draw; padding ranks last
    return (seq > 0) & ~(rank < k[:, None])


def _reorder(seq: jnp.ndarray, u_start: jnp.ndarray, u_pos: jnp.ndarray, beta: float) -> jnp.ndarray:
    length = seq.shape[1]
    n = _lengths(seq)
    r = jnp.floor(beta * n).astype(jnp.int32)
    start = length - n + _start(u_start, jnp.maximum(n - r + 1, 1))
    j = jnp.arange(length)[None, :]
    inside = (j >= start[:, None]) & (j < (start + r)[:, None])
    # inside keys in [start, start + r - 1] (never crossing an outside integer key), so only the run moves
    sort_key = jnp.where(inside, start[:, None] + u_pos * jnp.maximum(r - 1, 0)[:, None], j.astype(u_pos.dtype))
    return jnp.take_along_axis(seq, jnp.argsort(sort_key, axis=1), axis=1)


def crop(seq: jnp.ndarray, key: jax.Array, eta: float) -> jnp.ndarray:
    """Keeps a uniformly placed contiguous run of c = max(1, floor(eta * n)) of each row's n items (left-padded)."""
    return _crop(seq, jax.random.uniform(key, seq.shape[:1]), eta)


def mask(seq: jnp.ndarray, key: jax.Array, gamma: float) -> jnp.ndarray:
    """bool [B, L] keep mask: exactly floor(gamma * n) of each row's real items, chosen uniformly, are masked."""
    return _mask(seq, jax.random.uniform(key, seq.shape), gamma)


def reorder(seq: jnp.ndarray, key: jax.Array, beta: float) -> jnp.ndarray:
    """Shuffles a uniformly placed contiguous run of r = floor(beta * n) of each row's n items."""
    u = jax.random.uniform(key, (seq.shape[0], seq.shape[1] + 1))
    return _reorder(seq, u[:, 0], u[:, 1:], beta)


def augment(seq: jnp.ndarray, key: jax.Array, eta: float, gamma: float,
            beta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(augmented seq [B, L], keep [B, L]): each row gets one of crop / mask / reorder, chosen uniformly.

    One uniform draw per row feeds everything (a row uses one augmentation, so mask and reorder may share
    their per-position draws): one random-bits call keeps the compiled program small.
    """
    u = jax.random.uniform(key, (seq.shape[0], seq.shape[1] + 2))
    op = jnp.minimum(jnp.floor(u[:, :1] * 3).astype(jnp.int32), 2)
    u_start, u_pos = u[:, 1], u[:, 2:]
    cropped = _crop(seq, u_start, eta)
    reordered = _reorder(seq, u_start, u_pos, beta)
    out = jnp.where(op == CROP, cropped, jnp.where(op == REORDER, reordered, seq))
    keep = jnp.where(op == MASK, _mask(seq, u_pos, gamma), out > 0)
    return out, keep


def nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, valid: jnp.ndarray, tau: float) -> jnp.ndarray:
    """InfoNCE over 2N views: view i's positive is the same user's other view, the other valid views are negatives.

    loss_i = -log(exp(s(i, i+) / tau) / sum_{j != i, valid} exp(s(i, j) / tau)), averaged over the 2N views of
    the N valid users; 0 when no user is valid (finite whatever the mask).
    """
    b = z1.shape[0]
    z = jnp.concatenate([z1, z2], axis=0)
    v = jnp.concatenate([valid, valid], axis=0)
    s = cosine(z, z) / tau
    pair = v[:, None] & v[None, :] & ~jnp.eye(2 * b, dtype=bool)
    partner = jnp.concatenate([jnp.arange(b) + b, jnp.arange(b)])
    pos = jnp.take_along_axis(s, partner[:, None], axis=1)[:, 0]
    lse = logsumexp(jnp.where(pair, s, _NEG), axis=1)
    return masked_mean(lse - pos, v)
