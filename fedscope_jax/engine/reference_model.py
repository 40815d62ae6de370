"""A small two-domain SASRec-like model used to test and benchmark the engine (not the product model).

Per domain: an item embedding table (row 0 = padding), learned positions, one causal self-attention layer
with a residual, dot-product scoring against the next item and K sampled negatives shared by the mini-batch (as the
FedSCOPE model's "sampled" loss), given in the batch so a client only ever touches the rows its batch names:
the condition for local vocabularies.
An inter-domain InfoNCE term pulls a user's two domain representations together (other users of the
batch are negatives), standing in for the model's IIDCL terms. Dropout on the embeddings uses the key.

Batch (one mini-batch, shapes [B, ...]):
  seq_a, pos_a: int32[B, L] histories and next-item targets in domain A (0 = padding)
  neg_a: int32[K] sampled negatives shared by every position of the batch
  seq_b, pos_b, neg_b: the same for domain B
  user_mask: float32[B] (0 for padded users)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedscope_jax.engine.client import SparseTable
from fedscope_jax.engine.cohort import ClientShard, localize_batch

Params = dict[str, Any]


# Each domain's item-id fields (`cohort.localize_batch`) and item tables (local vocabularies) of this model.
FIELDS = {"a": ["seq_a", "pos_a", "neg_a"], "b": ["seq_b", "pos_b", "neg_b"]}
TABLES = (SparseTable(("item_emb_a",), "a"), SparseTable(("item_emb_b",), "b"))

@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Sizes of the reference model."""

    n_items_a: int
    n_items_b: int
    dim: int = 16
    max_len: int = 8
    dropout: float = 0.1
    inter_weight: float = 0.1
    temperature: float = 0.2


def init_params(key: jax.Array, config: ReferenceConfig) -> Params:
    """Random parameters: per domain an item table [n_items + 1, d] (row 0 = padding) and one attention block."""
    params: Params = {}
    for name, n_items, k in zip(("a", "b"), (config.n_items_a, config.n_items_b), jax.random.split(key, 2)):
        ks = jax.random.split(k, 6)
        d = config.dim
        scale = 1.0 / math.sqrt(d)
        params[f"item_emb_{name}"] = (jax.random.normal(ks[0], (n_items + 1, d)) * scale).at[0].set(0.0)
        params[f"enc_{name}"] = {
            "pos": jax.random.normal(ks[1], (config.max_len, d)) * scale,
            "wq": jax.random.normal(ks[2], (d, d)) * scale,
            "wk": jax.random.normal(ks[3], (d, d)) * scale,
            "wv": jax.random.normal(ks[4], (d, d)) * scale,
            "wo": jax.random.normal(ks[5], (d, d)) * scale,
        }
    return params


def _encode(table: jax.Array, enc: Params, seq: jax.Array, key: jax.Array, config: ReferenceConfig,
            train: bool) -> jax.Array:
    """Causal one-layer self-attention over a padded sequence: [B, L] ids -> [B, L, d] states."""
    x = jnp.take(table, seq, axis=0) + enc["pos"][None, : seq.shape[1]]
    valid = (seq > 0).astype(x.dtype)
    if train and config.dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - config.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - config.dropout), 0.0)
    x = x * valid[..., None]
    q, k, v = x @ enc["wq"], x @ enc["wk"], x @ enc["wv"]
    logits = jnp.einsum("bld,bmd->blm", q, k) / math.sqrt(x.shape[-1])
    length = seq.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None] & (valid[:, None, :] > 0)
    logits = jnp.where(allowed, logits, -1e9)
    attn = jax.nn.softmax(logits, axis=-1)
    h = x + (attn @ v) @ enc["wo"]
    return h * valid[..., None]


def _next_item_loss(table: jax.Array, h: jax.Array, pos: jax.Array, neg: jax.Array,
                    user_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sampled softmax over [target, negatives] at every non-padded position: (sum of losses, count)."""
    pos_logit = jnp.einsum("bld,bld->bl", h, jnp.take(table, pos, axis=0))
    neg_logit = jnp.einsum("bld,kd->blk", h, jnp.take(table, neg, axis=0))
    logits = jnp.concatenate([pos_logit[..., None], neg_logit], axis=-1)
    nll = -jax.nn.log_softmax(logits, axis=-1)[..., 0]
    mask = (pos > 0).astype(h.dtype) * user_mask[:, None]
    return jnp.sum(nll * mask), jnp.sum(mask)


def _last_state(h: jax.Array, seq: jax.Array) -> jax.Array:
    """The state at each user's last non-padded position (zeros for an empty sequence)."""
    last = jnp.maximum(jnp.sum(seq > 0, axis=1) - 1, 0)
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]


def loss_fn(params: Params, batch: dict[str, jax.Array], key: jax.Array, config: ReferenceConfig,
            train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-item loss over both domains plus the inter-domain contrastive term."""
    ka, kb = jax.random.split(key)
    ha = _encode(params["item_emb_a"], params["enc_a"], batch["seq_a"], ka, config, train)
    hb = _encode(params["item_emb_b"], params["enc_b"], batch["seq_b"], kb, config, train)
    user_mask = batch["user_mask"]
    la, na = _next_item_loss(params["item_emb_a"], ha, batch["pos_a"], batch["neg_a"], user_mask)
    lb, nb = _next_item_loss(params["item_emb_b"], hb, batch["pos_b"], batch["neg_b"], user_mask)
    rec = (la + lb) / jnp.maximum(na + nb, 1.0)
    # Inter-domain InfoNCE: users present in both domains are positives of themselves.
    za, zb = _last_state(ha, batch["seq_a"]), _last_state(hb, batch["seq_b"])
    za = za * jax.lax.rsqrt(jnp.sum(za * za, axis=-1, keepdims=True) + 1e-6)
    zb = zb * jax.lax.rsqrt(jnp.sum(zb * zb, axis=-1, keepdims=True) + 1e-6)
    both = user_mask * (batch["seq_a"][:, 0] > 0) * (batch["seq_b"][:, 0] > 0)
    sim = (za @ zb.T) / config.temperature
    sim = jnp.where(both[None, :] > 0, sim, -1e9)
    nce = -jnp.diagonal(jax.nn.log_softmax(sim, axis=-1))
    inter = jnp.sum(nce * both) / jnp.maximum(jnp.sum(both), 1.0)
    loss = rec + config.inter_weight * inter
    return loss, {"rec": rec, "inter": inter}


def synthetic_user_batches(rng: np.random.Generator, n_users: int, config: ReferenceConfig, batch_size: int,
                           n_neg: int, domains: str = "ab", popularity: float = 1.1) -> dict[str, np.ndarray]:
    """One client's data: `n_users` synthetic users cut into mini-batches, stacked as [S, B, ...].

    Item popularity follows a Zipf-like law (exponent `popularity`) so clients share popular items, as in
    real data. `domains` is "ab" (cross-domain users) or "a" / "b" (a client holding one domain only).
    Sequences are left-aligned (padding at the end), lengths uniform in [2, max_len + 1]. Padded users (to fill
    the last batch) have user_mask 0.
    """
    steps = max(1, math.ceil(n_users / batch_size))
    total = steps * batch_size
    length = config.max_len + 1
    lengths = rng.integers(2, length + 1, size=total)
    real = (np.arange(length)[None, :] < lengths[:, None]) & (np.arange(total) < n_users)[:, None]
    out: dict[str, np.ndarray] = {}
    for name, n_items in (("a", config.n_items_a), ("b", config.n_items_b)):
        seq = np.zeros((total, length), np.int32)
        if name in domains:
            weights = 1.0 / np.arange(1, n_items + 1) ** popularity
            cdf = np.cumsum(weights / weights.sum())
            draws = np.searchsorted(cdf, rng.random((total, length)) * cdf[-1]).astype(np.int32) + 1
            seq = np.where(real, np.minimum(draws, n_items), 0).astype(np.int32)
        out[f"seq_{name}"] = seq[:, :-1].reshape(steps, batch_size, -1)
        out[f"pos_{name}"] = seq[:, 1:].reshape(steps, batch_size, -1)
        out[f"neg_{name}"] = rng.integers(1, n_items + 1, size=(steps, n_neg), dtype=np.int32)
    mask = np.zeros(total, np.float32)
    mask[:n_users] = 1.0
    out["user_mask"] = mask.reshape(steps, batch_size)
    return out


def synthetic_client(rng: np.random.Generator, n_users: int, config: ReferenceConfig, batch_size: int,
                     n_neg: int) -> ClientShard:
    """One synthetic client (`synthetic_user_batches`) localized to its own item vocabularies (`TABLES`)."""
    return ClientShard(*localize_batch(synthetic_user_batches(rng, n_users, config, batch_size, n_neg), FIELDS))
