"""Next-item prediction losses (pure jnp over arrays; padding positions carry mask 0)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import logsumexp


def masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean of `values` where mask is true; 0 when nothing is (never NaN)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_item_loss(h: jnp.ndarray, target: jnp.ndarray, target_emb: jnp.ndarray, cand_ids: jnp.ndarray,
                   cand_emb: jnp.ndarray, target_bias: jnp.ndarray | None = None,
                   cand_bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """Softmax cross-entropy of each position's target against a shared candidate set, averaged over targets.

    h [B, L, d] encoder outputs; target [B, L] shifted ids (0 = no target); target_emb [B, L, d]; cand_ids [M]
    shared candidates with cand_emb [M, d]. A candidate equal to the position's target (an accidental hit) or
    to padding (id 0) is removed, so `cand_ids = all items` gives the full softmax and a sample of ids the
    sampled softmax, with the same code. target_bias [B, L] and cand_bias [M] (both or neither): per-item
    score biases (`model.item_bias`), added to the scores.
    """
    pos = jnp.sum(h * target_emb, axis=-1)                          # [B, L]
    neg = jnp.einsum("bld,md->blm", h, cand_emb)                    # [B, L, M]
    if (target_bias is None) != (cand_bias is None):
        raise ValueError("next_item_loss: give both target_bias and cand_bias, or neither")
    if target_bias is not None:
        pos, neg = pos + target_bias, neg + cand_bias
    keep = (cand_ids[None, None, :] != target[..., None]) & (cand_ids > 0)[None, None, :]
    neg = jnp.where(keep, neg, -jnp.inf)
    lse = logsumexp(jnp.concatenate([pos[..., None], neg], axis=-1), axis=-1)
    return masked_mean(lse - pos, target > 0)
