"""Flax modules: one SASRec-style causal self-attention tower per domain, with optional semantic fusion.

Sequences are left-padded int32 arrays of shifted item ids (0 = padding, item i of the domain is i + 1), so the
most recent item sits at the last position and the user representation is the output there. Positions are
counted from the end of the sequence, which makes prepending padding change no output (padding invariance).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from fedscope_jax.model.config import ModelConfig

# A domain's semantic side input: {"vectors": float32 [N+1, ds], "mask": float32 [N+1]} (row 0 = padding),
# or None for an ID-only tower. It is data, never a trained parameter.
SemanticTable = dict[str, Any]


def attention_mask(valid: jnp.ndarray) -> jnp.ndarray:
    """bool [B, 1, L, L]: query q sees key k iff k <= q and k is a real item; a padding query sees itself only."""
    length = valid.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None] & valid[:, None, :]
    mask = mask | jnp.eye(length, dtype=bool)[None]
    return mask[:, None]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention, then a position-wise feed-forward."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, valid: jnp.ndarray, train: bool) -> jnp.ndarray:
        cfg = self.cfg
        h = nn.LayerNorm(name="ln_attn")(x)
        h = nn.MultiHeadDotProductAttention(num_heads=cfg.heads, qkv_features=cfg.dim, dropout_rate=cfg.dropout,
                                            deterministic=not train, name="attn")(h, h, mask=mask)
        x = x + nn.Dropout(cfg.dropout, deterministic=not train)(h)
        h = nn.LayerNorm(name="ln_ffn")(x)
        h = nn.Dense(cfg.dim, name="ffn_in")(h)
        h = nn.Dropout(cfg.dropout, deterministic=not train)(nn.gelu(h))
        h = nn.Dense(cfg.dim, name="ffn_out")(h)
        x = x + nn.Dropout(cfg.dropout, deterministic=not train)(h)
        return x * valid[..., None]


class DomainTower(nn.Module):
    """Item representations and the causal encoder of one domain.

    Item representation: e_i = E[i] + m_i * MLP([E[i] ; s_i]) where s_i is the item's semantic vector and
    m_i in {0, 1} says whether it has one; without a semantic table (semantic_dim = 0) e_i = E[i].
    With cfg.item_ids "off" there is no E: e_i = m_i * MLP(s_i) + (1 - m_i) * u, with u the domain's one
    trained "unknown item" vector (the item count then comes from the semantic table).
    With cfg.item_bias, item i also has a trained scalar b_i (zero at init, an [N+1, 1] table so that it is a
    row table like E), added to every score of i (`functional.item_bias`): a per-item term of one dimension
    that can learn an item's popularity where the item has no ID embedding.
    """

    n_items: int
    cfg: ModelConfig
    semantic_dim: int = 0

    def setup(self) -> None:
        d = self.cfg.dim
        ids = self.cfg.item_ids == "train"
        if not ids and not self.semantic_dim:
            raise ValueError("model.item_ids='off' represents items by their semantic vectors: pass the semantic "
                             "tables (--attributes)")
        if ids:
            self.item_emb = self.param("item_emb", nn.initializers.normal(d ** -0.5), (self.n_items + 1, d))
        else:
            self.unknown_emb = self.param("unknown_emb", nn.initializers.normal(d ** -0.5), (d,))
        if self.cfg.item_bias:
            self.item_bias = self.param("item_bias", nn.initializers.zeros, (self.n_items + 1, 1))
        self.pos_emb = self.param("pos_emb", nn.initializers.normal(d ** -0.5), (self.cfg.max_len, d))
        self.blocks = [Block(self.cfg, name=f"block_{i}") for i in range(self.cfg.blocks)]
        self.ln_out = nn.LayerNorm(name="ln_out")
        self.emb_dropout = nn.Dropout(self.cfg.dropout)
        if self.semantic_dim:
            self.fuse_in = nn.Dense(self.cfg.fusion_hidden, name="fuse_in")
            self.fuse_out = nn.Dense(d, name="fuse_out")

    def items(self, ids: jnp.ndarray, semantic: SemanticTable | None) -> jnp.ndarray:
        """float32 [..., d]: representations of shifted item ids (any shape)."""
        if not self.semantic_dim:            # ID-only (item_ids "off" always has a semantic table: setup)
            return jnp.take(self.item_emb, ids, axis=0)
        if semantic is None:
            raise ValueError("this model was built with semantic fusion; pass its semantic table")
        s = jnp.take(semantic["vectors"], ids, axis=0)
        m = jnp.take(semantic["mask"], ids, axis=0)[..., None]
        if self.cfg.item_ids == "off":   # the item is its vector's MLP, or the domain's unknown vector
            return jnp.where(m > 0, self.fuse_out(nn.gelu(self.fuse_in(s))), self.unknown_emb)
        e = jnp.take(self.item_emb, ids, axis=0)
        return e + m * self.fuse_out(nn.gelu(self.fuse_in(jnp.concatenate([e, s], axis=-1))))

    def all_items(self, semantic: SemanticTable | None) -> jnp.ndarray:
        """float32 [N+1, d]: every item's representation (row 0 is padding)."""
        return self.items(jnp.arange(self.n_items + 1), semantic)

    def encode(self, seq: jnp.ndarray, semantic: SemanticTable | None, train: bool,
               keep: jnp.ndarray | None = None, items: jnp.ndarray | None = None) -> jnp.ndarray:
        """float32 [B, L, d] outputs of a left-padded sequence batch [B, L]; zero at padding positions.

        keep (bool [B, L], optional): False marks a masked item (CL4SRec's item mask): its position stays in the
        sequence but its item vector is replaced by the zero mask token.
        items (float32 [B, L, d], optional): the representations of `seq`'s items, computed by the caller
        (`functional.item_lookup`), instead of computing them here.
        """
        length = seq.shape[-1]
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} > model.max_len {self.cfg.max_len}")
        valid = seq > 0
        x = (self.items(seq, semantic) if items is None else items) * math.sqrt(self.cfg.dim)
        if keep is not None:
            x = x * keep[..., None].astype(x.dtype)
        x = x + self.pos_emb[length - 1 - jnp.arange(length)]
        x = self.emb_dropout(x, deterministic=not train) * valid[..., None]
        mask = attention_mask(valid)
        for block in self.blocks:
            x = block(x, mask, valid, train)
        return self.ln_out(x) * valid[..., None]

    def __call__(self, seq: jnp.ndarray, semantic: SemanticTable | None, train: bool = False) -> jnp.ndarray:
        return self.encode(seq, semantic, train)
