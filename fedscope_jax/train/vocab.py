"""Local vocabularies of the FedSCOPE model's federated clients: a client trains only the item rows its data
names, so its cost follows its own data, not the catalogue (engine/client.py `SparseTable`).

A client's item-embedding delta is exact on a local table only if the loss reads no other row. The sampled
softmax draws its negatives from the whole catalogue, so here they are drawn on the host, per step and
domain (uniform over the domain's items, seeded by (seed, round, client)), and put in the batch ("neg"
[S, D, M]); each domain's vocabulary is the union of the client's items, these negatives and the padding
row 0. Its size is padded to a bound that does not change from round to round (the client's own items plus
S x M), so the round keeps one program shape. The semantic tables, which are constants indexed by item, are
read through the client's vocabulary (`model.objective.loss_fn` reads batch["vocab"]).

The gbce loss draws M negatives per user, also on the host ("neg" [S, B, D, M]); with them comes each domain's
item count ("neg_pool"), since its calibration needs the catalogue's size, not the vocabulary's.

Not used where a client's update must cover every row: the full softmax (every item is a candidate), the user
unit of DP (its per-step noise must reach every row), and secure aggregation (dense vectors); nor
without item IDs (`model.item_ids=off`: no item table to localize; a per-item bias, `model.item_bias`, then stays
dense). With item IDs the bias table is trained through the same vocabulary as the item table.

The user unit has per-user vocabularies instead (`localize_users`): each user's gradient is taken on the rows
that user's data and negatives name, then clipped and scattered into the dense sum that the step noises
(engine/client.py `user_rows_sum`), so a per-user gradient costs its own rows, not the catalogue.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fedscope_jax.engine.client import SparseTable
from fedscope_jax.engine.cohort import PAD_ROW
from fedscope_jax.errors import FedscopeError
from fedscope_jax.model.functional import domain_key

__all__ = ["NEGATIVES_TAG", "add_negatives", "localize", "localize_users", "sparse_tables", "uses_local_vocab",
           "uses_user_rows"]

NEGATIVES_TAG = 0x0E6A   # seeds a client's host-drawn negatives apart from its batches and Poisson sampling


def uses_local_vocab(cfg: Any) -> bool:
    """Whether the federated client trains local item vocabularies (see the module docstring)."""
    return (cfg.model.loss.rec != "full" and cfg.privacy.unit != "user" and not cfg.privacy.secagg
            and cfg.model.item_ids == "train")


def uses_user_rows(cfg: Any) -> bool:
    """Whether the user unit of DP takes each user's gradient of the item tables on that user's own rows
    (`localize_users`, engine/client.py `user_rows_sum`): wherever a loss reads only the rows its user names,
    i.e. with item IDs and without the full softmax."""
    return cfg.privacy.unit == "user" and cfg.model.loss.rec != "full" and cfg.model.item_ids == "train"


def sparse_tables(n_domains: int, *, item_bias: bool) -> tuple[SparseTable, ...]:
    """Each domain's item table (and its per-item biases, `model.item_bias`), trained through the vocabulary of
    the same name."""
    names = ("item_emb", "item_bias") if item_bias else ("item_emb",)
    return tuple(SparseTable((domain_key(d), n), domain_key(d)) for d in range(n_domains) for n in names)


def add_negatives(batch: dict[str, np.ndarray], n_items: Sequence[int], num_negatives: int,
                  rng: np.random.Generator, per_user: bool = False) -> dict[str, np.ndarray]:
    """The batch with "neg": each step's negatives of each domain, uniform over its items 1..n_d (as the loss
    would draw them on the device), int32 [S, D, M] shared by the step's users, or (per_user, the gbce loss)
    [S, B, D, M], 0 (padding, never a candidate) for padding users, with "neg_pool" int32 [S, D]: the n_d they
    come from (gbce's sampling rate needs the catalogue's size once item ids are a client's own)."""
    steps, users = batch["seq"].shape[:2]
    shape = (steps, users, num_negatives) if per_user else (steps, num_negatives)
    neg = np.stack([rng.integers(1, int(n) + 1, size=shape) for n in n_items], axis=-2)
    if not per_user:
        return {**batch, "neg": neg.astype(np.int32)}
    neg = neg * batch["user_mask"][:, :, None, None]
    pool = np.broadcast_to(np.asarray(n_items, np.int32), (steps, len(n_items))).copy()
    return {**batch, "neg": neg.astype(np.int32), "neg_pool": pool}


def localize(batch: dict[str, np.ndarray], n_items: Sequence[int]
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(batch with local item ids, vocab): per domain d, the sorted ids of row 0, the items of seq / target
    [S, B, D, L] and neg ([S, D, M] or per user [S, B, D, M]) in that domain, padded with PAD_ROW to
    min(n_d + 1, own items + the negatives' count)."""
    seq, target = np.array(batch["seq"], np.int32), np.array(batch["target"], np.int32)
    neg = batch.get("neg")
    local_neg = None if neg is None else np.array(neg, np.int32)
    vocab: dict[str, np.ndarray] = {}
    for d, n in enumerate(n_items):
        own = np.unique(np.concatenate([[0], seq[:, :, d].ravel(), target[:, :, d].ravel()]))
        drawn = neg[..., d, :].ravel() if neg is not None else np.zeros(0, np.int64)
        ids = np.union1d(own, drawn)
        bound = min(int(n) + 1, len(own) + drawn.size)
        vocab[domain_key(d)] = np.concatenate([ids, np.full(bound - len(ids), PAD_ROW)]).astype(np.int32)
        seq[:, :, d] = np.searchsorted(ids, seq[:, :, d])
        target[:, :, d] = np.searchsorted(ids, target[:, :, d])
        if local_neg is not None:
            local_neg[..., d, :] = np.searchsorted(ids, neg[..., d, :])
    out = {**batch, "seq": seq, "target": target}
    if local_neg is not None:
        out["neg"] = local_neg
    return out, vocab


def localize_users(batch: dict[str, np.ndarray], n_items: Sequence[int]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(batch with each user's own local item ids, vocab): per step, user and domain d, the sorted unique ids of
    row 0 and the user's items in seq / target [S, B, D, L] and neg ([S, D, M] shared by a step's users, or per
    user [S, B, D, M]; per user in the output), padded with PAD_ROW to min(n_d + 1, 1 + 2L + M): vocab
    int32 [S, B, V_d] per domain. "neg_pool" [S, D], if there, is given the user axis [S, B, D]. The user unit
    of DP takes each user's gradient on these rows (engine/client.py `user_rows_sum`); the ids must be unique
    there, or a row's gradient would be split over copies and its norm understated. Vectorized: one sort of
    (id, position) keys per domain."""
    seq, target = np.asarray(batch["seq"]), np.asarray(batch["target"])
    steps, users, _, length = seq.shape
    neg = batch.get("neg")
    new_seq, new_target = np.empty(seq.shape, np.int32), np.empty(target.shape, np.int32)
    new_neg = None if neg is None else np.empty((steps, users) + neg.shape[-2:], np.int32)
    vocab: dict[str, np.ndarray] = {}
    for d, n in enumerate(n_items):
        parts = [np.zeros((steps, users, 1), np.int64), seq[:, :, d], target[:, :, d]]
        if neg is not None:
            drawn = neg[..., d, :]
            parts.append(np.broadcast_to(drawn[:, None], (steps, users, drawn.shape[-1])) if neg.ndim == 3 else drawn)
        ids = np.concatenate(parts, axis=-1).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > int(n)):
            raise FedscopeError(f"localize_users: domain {d} has item ids outside 0..{int(n)} (its item count)")
        width = ids.shape[-1]
        if width >= 1 << 20:
            raise FedscopeError(f"localize_users: {width} ids a user and domain; at most {(1 << 20) - 1} fit")
        # sorting (id, position) keys gives each position's rank among the distinct ids (its local id)
        keyed = np.sort((ids << 20) | np.arange(width, dtype=np.int64), axis=-1)
        order, ranked = keyed & 0xFFFFF, keyed >> 20
        first = np.ones(ranked.shape, bool)
        first[..., 1:] = ranked[..., 1:] != ranked[..., :-1]
        rank = np.cumsum(first, axis=-1) - 1
        local = np.empty(rank.shape, np.int64)
        np.put_along_axis(local, order, rank, axis=-1)
        size = min(int(n) + 1, width)
        rows = np.full((steps, users, size + 1), PAD_ROW, np.int64)   # the last column takes the repeats
        np.put_along_axis(rows, np.where(first, rank, size), ranked, axis=-1)
        vocab[domain_key(d)] = rows[..., :size].astype(np.int32)
        new_seq[:, :, d] = local[..., 1:1 + length]
        new_target[:, :, d] = local[..., 1 + length:1 + 2 * length]
        if new_neg is not None:
            new_neg[:, :, d] = local[..., 1 + 2 * length:]
    out = {**batch, "seq": new_seq, "target": new_target}
    if new_neg is not None:
        out["neg"] = new_neg
    if "neg_pool" in batch:   # per user too: every field of a user-unit step has the user axis
        pool = np.asarray(batch["neg_pool"])
        out["neg_pool"] = np.broadcast_to(pool[:, None], (steps, users) + pool.shape[1:]).copy()
    return out, vocab
