"""Next-item prediction losses (pure jnp over arrays; padding positions carry mask 0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp


def masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean of `values` where mask is true; 0 when nothing is (never NaN)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _scores(h: jnp.ndarray, target: jnp.ndarray, target_emb: jnp.ndarray, cand_ids: jnp.ndarray,
            cand_emb: jnp.ndarray, target_bias: jnp.ndarray | None, cand_bias: jnp.ndarray | None
            ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(pos [B, L], neg [B, L, M], keep [B, L, M]): each position's target score, its candidates' scores and
    which candidates count (not the position's target, an accidental hit, and not padding id 0). Candidates
    are shared by the batch (cand_ids [M], cand_emb [M, d], cand_bias [M]) or per user ([B, M], [B, M, d])."""
    pos = jnp.sum(h * target_emb, axis=-1)                          # [B, L]
    if (target_bias is None) != (cand_bias is None):
        raise ValueError("next-item loss: give both target_bias and cand_bias, or neither")
    if cand_ids.ndim == 1:                                          # shared: [M] -> [1, M] after the product
        neg = jnp.einsum("bld,md->blm", h, cand_emb)
        cand_ids, cand_bias = cand_ids[None], None if cand_bias is None else cand_bias[None]
    else:
        neg = jnp.einsum("bld,bmd->blm", h, cand_emb)
    if target_bias is not None:
        pos, neg = pos + target_bias, neg + cand_bias[:, None, :]
    keep = (cand_ids[:, None, :] != target[..., None]) & (cand_ids > 0)[:, None, :]
    return pos, neg, keep


def next_item_loss(h: jnp.ndarray, target: jnp.ndarray, target_emb: jnp.ndarray, cand_ids: jnp.ndarray,
                   cand_emb: jnp.ndarray, target_bias: jnp.ndarray | None = None,
                   cand_bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """Softmax cross-entropy of each position's target against a shared candidate set, averaged over targets.

    h [B, L, d] encoder outputs; target [B, L] shifted ids (0 = no target); target_emb [B, L, d]; cand_ids [M]
    shared candidates with cand_emb [M, d]. A candidate equal to the position's target (an accidental hit) or
    to padding (id 0) is removed, so `cand_ids = all items` gives the full softmax and a sample of ids the
    sampled softmax, with the same code. target_bias [B, L] and cand_bias [M] (both or neither):
    terms added to the scores (`model.item_bias`; minus log q for the logQ correction, `in_batch_log_q`).
    """
    pos, neg, keep = _scores(h, target, target_emb, cand_ids, cand_emb, target_bias, cand_bias)
    neg = jnp.where(keep, neg, -jnp.inf)
    lse = logsumexp(jnp.concatenate([pos[..., None], neg], axis=-1), axis=-1)
    return masked_mean(lse - pos, target > 0)


def full_softmax_loss(h: jnp.ndarray, target: jnp.ndarray, target_emb: jnp.ndarray, item_emb: jnp.ndarray,
                      target_bias: jnp.ndarray | None = None, item_bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """Softmax cross-entropy over every item, averaged over targets: `next_item_loss` with every item a
    candidate (the target among them once), without its per-candidate masks. item_emb [N, d] and item_bias [N]:
    items 1..N (not the padding row); h, target, target_emb, target_bias as there."""
    pos = jnp.sum(h * target_emb, axis=-1)
    logits = jnp.einsum("bld,nd->bln", h, item_emb)
    if (target_bias is None) != (item_bias is None):
        raise ValueError("full softmax: give both target_bias and item_bias, or neither")
    if target_bias is not None:
        pos, logits = pos + target_bias, logits + item_bias
    return masked_mean(logsumexp(logits, axis=-1) - pos, target > 0)


def gbce_beta(num_negatives: int, n_items: jnp.ndarray | int, t: float) -> jnp.ndarray:
    """gSASRec's positive exponent beta = alpha (t (1 - 1/alpha) + 1/alpha) = 1 - t (1 - alpha), where
    alpha = M / (N - 1) is the negative sampling rate (capped at 1: M negatives cannot sample more than the
    catalogue). n_items: the domain's item count N."""
    alpha = jnp.minimum(num_negatives / jnp.maximum(jnp.asarray(n_items, jnp.float32) - 1.0, 1.0), 1.0)
    return 1.0 - t * (1.0 - alpha)


def gbce_loss(h: jnp.ndarray, target: jnp.ndarray, target_emb: jnp.ndarray, cand_ids: jnp.ndarray,
              cand_emb: jnp.ndarray, beta: jnp.ndarray | float, target_bias: jnp.ndarray | None = None,
              cand_bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """gSASRec's generalized binary cross-entropy (Petrov & Macdonald, RecSys 2023), averaged over targets:
    per position, -beta log sigmoid(s+) - sum_j log(1 - sigmoid(s_j)). beta < 1 undoes the overconfidence that
    sampled negatives teach a BCE model (`gbce_beta`). Every score is first shifted by log(beta / M), the
    score that minimizes the loss when all items score alike: the model starts at that optimum and learns only
    relative scores (a shift changes no ranking; without it this model stalled at that optimum, docs/model.md).
    The paper's code averages the 1 + M binary terms instead of summing them: the same direction, but beside
    the contrastive terms (weighted for a softmax loss) that would shrink the next-item gradient 1 + M times.
    Inputs (candidates shared or, as gSASRec draws them, per user) and the removal of accidental hits and
    padding as in `next_item_loss`."""
    pos, neg, keep = _scores(h, target, target_emb, cand_ids, cand_emb, target_bias, cand_bias)
    shift = jnp.log(beta / cand_ids.shape[-1])
    pos, neg = pos + shift, neg + shift
    per = beta * jax.nn.softplus(-pos) + jnp.sum(jnp.where(keep, jax.nn.softplus(neg), 0.0), axis=-1)
    return masked_mean(per, target > 0)


def in_batch_log_q(target: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """float [ids.shape]: log q(id), q = the share of the real targets (> 0) of `target` that equal id, i.e. the
    probability that one in-batch negative draw (a real position, uniformly) picks that item. An id that no
    real target equals (padding) gets log(1 / T), a finite value; such ids are masked by the losses."""
    flat = jnp.sort(target.reshape(-1))
    real = jnp.sum(flat > 0)
    count = jnp.searchsorted(flat, ids, side="right") - jnp.searchsorted(flat, ids, side="left")
    count = jnp.where(ids > 0, count, 0)
    return jnp.log(jnp.maximum(count, 1).astype(jnp.float32)) - jnp.log(jnp.maximum(real, 1).astype(jnp.float32))
