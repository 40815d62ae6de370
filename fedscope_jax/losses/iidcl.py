"""Intra- and inter-domain decoupled contrastive learning (IIDCL): InfoNCE with cosine similarity.

Every function takes user representations z [B, d] with a validity mask [B] (a padded row, or a user with no
history in that domain, is invalid) and returns a scalar that is finite whatever the mask, and 0 when no user
qualifies, so it can be vmapped over clients of any size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from fedscope_jax.losses.rec import masked_mean

_NEG = -1e9   # finite "minus infinity": keeps rows without any candidate finite (and their gradients zero)


def cosine(a: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    """[Ba, Bb] cosine similarities."""
    a = a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + eps)
    b = b / jnp.sqrt(jnp.sum(b * b, -1, keepdims=True) + eps)
    return a @ b.T


def intra_loss(z: jnp.ndarray, valid: jnp.ndarray, tau: float, rho: float, k_max: int) -> jnp.ndarray:
    """Within one domain: each user is pulled toward its K most similar users and pushed from the others.

    K = min(ceil(rho * N), k_max, N - 1) with N the number of valid users; the neighbours are chosen on
    stop-gradient similarities. Per anchor i: mean over positives p of
    -log(exp(s_ip / tau) / sum_{j != i, valid} exp(s_ij / tau)).
    """
    b = z.shape[0]
    kk = min(k_max, b - 1)
    if kk < 1:
        return jnp.zeros((), z.dtype)
    s = cosine(z, z) / tau
    pair = valid[:, None] & valid[None, :] & ~jnp.eye(b, dtype=bool)
    n = jnp.sum(valid)
    k = jnp.clip(jnp.ceil(rho * n).astype(jnp.int32), 1, jnp.minimum(k_max, n - 1))
    _, idx = jax.lax.top_k(jnp.where(pair, jax.lax.stop_gradient(s), _NEG), kk)      # [B, kk]
    pos_ok = (jnp.arange(kk)[None, :] < k) & jnp.take_along_axis(pair, idx, axis=1)
    lse = logsumexp(jnp.where(pair, s, _NEG), axis=1)                                 # [B]
    per_pos = lse[:, None] - jnp.take_along_axis(s, idx, axis=1)
    n_pos = jnp.sum(pos_ok, axis=1)
    per_anchor = jnp.sum(jnp.where(pos_ok, per_pos, 0.0), axis=1) / jnp.maximum(n_pos, 1)
    return masked_mean(per_anchor, valid & (n_pos > 0))


def inter_loss(za: jnp.ndarray, zb: jnp.ndarray, va: jnp.ndarray, vb: jnp.ndarray, tau: float) -> jnp.ndarray:
    """Across two domains: a user's two representations are positives, other users' are negatives.

    Symmetric InfoNCE (a -> b and b -> a, averaged) over users valid in both domains; users present in one
    domain only contribute no term (but still serve as negatives for the others).
    """
    s = cosine(za, zb) / tau                                       # row: anchor in a, column: candidate in b
    diag = jnp.diagonal(s)
    a_to_b = logsumexp(jnp.where(vb[None, :], s, _NEG), axis=1) - diag
    b_to_a = logsumexp(jnp.where(va[:, None], s, _NEG), axis=0) - diag
    return masked_mean(0.5 * (a_to_b + b_to_a), va & vb)


def inter_item_loss(za: jnp.ndarray, zb: jnp.ndarray, items_a: jnp.ndarray, items_b: jnp.ndarray,
                    va: jnp.ndarray, vb: jnp.ndarray, tau: float) -> jnp.ndarray:
    """Across two domains without other users: a user's two representations are positives, the negatives are
    item representations of the other domain (items_a [M, d], items_b [M, d]: sampled items, public randomness).

    Symmetric InfoNCE over users valid in both domains. Each user's term reads only that user's data and the
    parameters, so it keeps a per-user sensitivity bound (the user unit of DP); `inter_loss` reads other users.
    """
    pos = jnp.sum(_unit(za) * _unit(zb), axis=-1) / tau                # [B]
    to_b = cosine(za, items_b) / tau                                    # [B, M]
    to_a = cosine(zb, items_a) / tau
    a_to_b = logsumexp(jnp.concatenate([pos[:, None], to_b], axis=1), axis=1) - pos
    b_to_a = logsumexp(jnp.concatenate([pos[:, None], to_a], axis=1), axis=1) - pos
    return masked_mean(0.5 * (a_to_b + b_to_a), va & vb)


def _unit(z: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    return z / jnp.sqrt(jnp.sum(z * z, -1, keepdims=True) + eps)
