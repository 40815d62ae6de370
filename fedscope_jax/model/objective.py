"""The training objective of one mini-batch: L_rec + alpha * (lambda_intra * L_intra + lambda_inter * L_inter)
+ seqcl_weight * L_seqcl (the CL4SRec-style baseline term; off, i.e. absent from the program, by default).

batch = {"seq": int32 [B, D, L], "target": int32 [B, D, L], ...}: per user and domain, the left-padded input
sequence of shifted item ids and, at each position, the next item (0 = none); optional "neg" [D, M] or
[B, D, M] and "neg_pool" [D] or [B, D] (host-drawn uniform negatives and the item counts they come from) and "vocab" (a
client's local item ids; train/vocab.py). Other keys (masks) are ignored: a padding user is an all-zero row
and contributes nothing. Terms are summed over domains (and domain pairs).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedscope_jax.losses.iidcl import inter_item_loss, inter_loss, intra_loss
from fedscope_jax.losses.rec import full_softmax_loss, gbce_beta, gbce_loss, in_batch_log_q, next_item_loss
from fedscope_jax.losses.seqcl import augment, nt_xent
from fedscope_jax.model.config import UNIFORM_NEGATIVES, ModelConfig
from fedscope_jax.model.functional import (Params, Semantic, domain_key, encode, item_bias, item_count,
                                           item_lookup)


def _candidates(params: Params, config: ModelConfig, d: int, target: jnp.ndarray, key: jax.Array,
                semantic: Semantic, neg: jnp.ndarray | None = None) -> jnp.ndarray:
    """Candidate ids for domain d's next-item loss: [M] shared by the batch, or (gbce) [B, M] per user; every
    item, padding row 0 first, for the full softmax. neg: the step's negatives drawn on the host ([D, M], or
    [B, D, M] per user; train/vocab.py), used instead of drawing them here."""
    lc = config.loss
    n_items = item_count(params, d, semantic)
    if lc.rec == "full":
        return jnp.arange(n_items + 1)
    if lc.rec in UNIFORM_NEGATIVES and neg is not None:
        return neg[..., d, :]
    if lc.rec == "gbce":
        # per user, as gSASRec draws them (per position there; shared by the batch measured no better here)
        return jax.random.randint(key, (target.shape[0], lc.num_negatives), 1, n_items + 1)
    if lc.rec == "sampled":
        return jax.random.randint(key, (lc.num_negatives,), 1, n_items + 1)
    # in_batch: the targets of M positions drawn uniformly (with replacement) among the batch's real ones
    return in_batch_negatives(target, key, lc.num_negatives)


def in_batch_negatives(target: jnp.ndarray, key: jax.Array, m: int) -> jnp.ndarray:
    """int [m]: targets of m positions drawn uniformly with replacement among the real ones (target > 0) of
    `target` [B, L] (all 0 when there is none). Gumbel-max over a [B * L, m] draw, position-major, so the draw
    of a real position does not depend on padding users after it (a batch padded to a wider bucket draws the
    same negatives)."""
    flat = target.reshape(-1)
    gumbel = jax.random.gumbel(key, (flat.shape[0], m))
    pick = jnp.argmax(jnp.where((flat > 0)[:, None], gumbel, -jnp.inf), axis=0)
    return jnp.where(jnp.any(flat > 0), flat[pick], 0)


# Purpose tag of the sequence-contrastive key: folded into the batch key, so turning the term on leaves the
# dropout and negative-sampling keys (and with them every other term) exactly as they are without it.
_SEQCL_PURPOSE = 0x5EC1


def seqcl_loss(params: Params, config: ModelConfig, d: int, seq: jnp.ndarray, key: jax.Array, train: bool,
               semantic: Semantic) -> jnp.ndarray:
    """CL4SRec term of domain d: two augmented views of each user's sequence [B, L], NT-Xent over the batch.

    Both views go through the encoder as one [2B, L] batch (one traced encoder, not two: half the program).
    """
    lc = config.loss
    k_aug, k_drop = jax.random.split(key)
    b = seq.shape[0]
    aug, keep = augment(jnp.concatenate([seq, seq]), k_aug, lc.seqcl_crop, lc.seqcl_mask, lc.seqcl_reorder)
    (aug_emb,) = item_lookup(params, config, d, semantic, aug)
    z = encode(params, config, d, aug, semantic, k_drop, train, keep=keep, items=aug_emb)[:, -1]
    return nt_xent(z[:b], z[b:], seq[:, -1] > 0, lc.seqcl_tau)


def local_semantic(semantic: Semantic, vocab: dict[str, jnp.ndarray]) -> Semantic:
    """The semantic tables' rows of a client's local vocabularies (global ids; padding ids give zero rows)."""
    if semantic is None:
        return None
    take = lambda x, ids: jnp.take(x, ids, axis=0, mode="fill", fill_value=0)  # noqa: E731
    return [None if t is None else {k: take(v, vocab[domain_key(d)]) for k, v in t.items()}
            for d, t in enumerate(semantic)]


def _minus(a: jnp.ndarray | None, b: jnp.ndarray) -> jnp.ndarray:
    return -b if a is None else a - b


def _present(seq: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """Whether a domain's slice of the batch ([B, L] each) names any item: without one, every term of the
    domain is zero (all-zero users are padding) and so is its gradient."""
    return jnp.any(seq > 0) | jnp.any(target > 0)


def when_present(present: jnp.ndarray, fn: Callable[[], Any]) -> Any:
    """fn(), or zeros of its shapes where `present` is false: for an absent domain's terms the loss and its
    gradients are then what fn() gives (its next-item loss, users and validity are zero then; its candidate
    vectors are not, but every term that reads them is masked by the users' validity, which any new term
    must keep). A client whose data lacks a domain (one client a domain under `--scheme domain`) skips that
    domain's encoder and softmax at run time, forward and backward. Under vmap the predicate is batched and
    both sides run (a select), and the gradient then also selects between both sides' residuals: 27% more time
    for the user unit's per-user gradients (measured), so `loss_fn` uses it only where asked (`skip_absent`);
    the engine runs a chunk of one client without vmap (`engine.round`) so that the skip happens there."""
    shapes = jax.eval_shape(fn)
    return jax.lax.cond(present, fn, lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def _domain_terms(params: Params, config: ModelConfig, d: int, seq: jnp.ndarray, target: jnp.ndarray,
                  key: jax.Array, train: bool, semantic: Semantic, batch: dict[str, jnp.ndarray]
                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Domain d's next-item loss, its users' representations [B, dim] and validity [B], and its candidate
    item vectors (flattened [M', dim]; the inter-domain term of the user unit takes them as negatives)."""
    lc = config.loss
    needs = {"gbce": {"neg", "neg_pool"}, "sampled": {"neg"}}.get(lc.rec, set())
    if "vocab" in batch and (lc.rec == "full" or not needs <= batch.keys()):
        # on a local vocabulary the tables' rows are not the catalogue: draws and gBCE's rate need the batch's
        raise ValueError(f"loss {lc.rec!r} on local item ids (batch['vocab']): "
                         + ("the full softmax needs every item" if lc.rec == "full" else
                            f"needs the host-drawn batch fields {sorted(needs)} (train/vocab.py add_negatives)"))
    k_drop, k_neg = jax.random.split(key)
    cand_ids = _candidates(params, config, d, target, k_neg, semantic, batch.get("neg"))
    # the inputs', targets' and candidates' vectors: each table row fused once where that is cheaper
    seq_emb, tgt_emb, cand_emb = item_lookup(params, config, d, semantic, seq, target, cand_ids)
    h = encode(params, config, d, seq, semantic, k_drop, train, items=seq_emb)
    tgt_bias, cand_bias = item_bias(params, d, target), item_bias(params, d, cand_ids)
    if lc.logq:   # sampled-softmax correction: each score minus the log of its item's in-batch draw probability
        tgt_bias = _minus(tgt_bias, in_batch_log_q(target, target))
        cand_bias = _minus(cand_bias, in_batch_log_q(target, cand_ids))
    if lc.rec == "gbce":   # the catalogue's size: the batch's where its ids are a client's local ones
        n_items = batch["neg_pool"][..., d] if "neg_pool" in batch else item_count(params, d, semantic)
        beta = gbce_beta(lc.num_negatives, n_items, lc.gbce_t)
        rec = gbce_loss(h, target, tgt_emb, cand_ids, cand_emb, beta, tgt_bias, cand_bias)
    elif lc.rec == "full":   # the candidates are every item, padding row 0 first
        rec = full_softmax_loss(h, target, tgt_emb, cand_emb[1:], tgt_bias,
                                None if cand_bias is None else cand_bias[1:])
    else:
        rec = next_item_loss(h, target, tgt_emb, cand_ids, cand_emb, tgt_bias, cand_bias)
    # per-user candidates (gbce): all of them
    return rec, h[:, -1], seq[:, -1] > 0, cand_emb.reshape(-1, cand_emb.shape[-1])


def loss_fn(params: Params, batch: dict[str, jnp.ndarray], key: jax.Array, config: ModelConfig,
            train: bool = True, semantic: Semantic = None, per_user: bool = False,
            skip_absent: bool = False) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """(total loss, aux) for one mini-batch; aux holds each term and the number of next-item targets.

    per_user: the user unit of DP, where the loss is taken one user at a time and no user's term may read
    another user's data: the intra-domain term is off (its positives are other users) and the inter-domain
    term takes sampled items of the other domain as negatives (`inter_item_loss`) instead of other users;
    `loss.user_norm` "length" sums a user's next-item losses over its targets and divides by B x L instead of
    averaging them (B = 1 user there, L = the padded length: public constants).
    skip_absent: skip at run time the terms of a domain the batch names no item of (`when_present`; the same
    loss and gradients): for clients that hold one domain each (`--scheme domain`)."""
    lc = config.loss
    seq, target = batch["seq"], batch["target"]
    n_dom = seq.shape[1]
    if "vocab" in batch:   # a client's local item vocabularies: item ids are local, constant tables read through it
        semantic = local_semantic(semantic, batch["vocab"])
    rec = jnp.zeros(())
    users, valid, items = [], [], []
    for d, k in enumerate(jax.random.split(key, n_dom)):
        terms = functools.partial(_domain_terms, params, config, d, seq[:, d], target[:, d], k, train, semantic,
                                  batch)
        rec_d, user_d, valid_d, items_d = (when_present(_present(seq[:, d], target[:, d]), terms) if skip_absent
                                           else terms())
        if per_user and lc.user_norm == "length":   # the mean over the user's targets -> their sum / (B x L)
            rec_d = rec_d * jnp.sum(target[:, d] > 0) / target[:, d].size
        rec = rec + rec_d
        users.append(user_d)
        valid.append(valid_d)
        items.append(items_d)
    intra = jnp.zeros(())
    if lc.alpha and lc.lambda_intra and not per_user:
        for z, v in zip(users, valid):
            intra = intra + intra_loss(z, v, lc.tau_intra, lc.rho, lc.k_max)
    inter = jnp.zeros(())
    if lc.alpha and lc.lambda_inter:
        for a in range(n_dom):
            for b in range(a + 1, n_dom):
                if per_user:
                    inter = inter + inter_item_loss(users[a], users[b], items[a], items[b], valid[a], valid[b],
                                                    lc.tau_inter)
                else:
                    inter = inter + inter_loss(users[a], users[b], valid[a], valid[b], lc.tau_inter)
    seqcl = jnp.zeros(())
    if lc.seqcl_weight:
        for d, k in enumerate(jax.random.split(jax.random.fold_in(key, _SEQCL_PURPOSE), n_dom)):
            term = functools.partial(seqcl_loss, params, config, d, seq[:, d], k, train, semantic)
            seqcl = seqcl + (when_present(jnp.any(seq[:, d] > 0), term) if skip_absent else term())
    total = rec + lc.alpha * (lc.lambda_intra * intra + lc.lambda_inter * inter) + lc.seqcl_weight * seqcl
    aux: dict[str, Any] = {"rec": rec, "intra": intra, "inter": inter, "seqcl": seqcl,
                           "targets": jnp.sum(target > 0)}
    return total, aux
