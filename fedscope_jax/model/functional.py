"""Pure functions over the parameter pytree: init, encode, item representations.

params = {"domain_0": <tower params>, "domain_1": ...}, plus {"encoder": {"block_i", "ln_out"}} with
`model.shared_encoder` (those keys then leave the towers); every shape the towers need (item counts, semantic
width) is read back from the arrays, so these functions take only (params, config) and stay jit/vmap friendly.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from fedscope_jax.errors import FedscopeError
from fedscope_jax.model.config import ModelConfig
from fedscope_jax.model.network import DomainTower, SemanticTable

Params = dict[str, Any]
Semantic = Sequence[SemanticTable | None] | None


ENCODER = "encoder"   # the shared blocks' key (model.shared_encoder)


def domain_key(d: int) -> str:
    return f"domain_{d}"


def n_domains(params: Params) -> int:
    """The number of domain towers (the shared encoder's key is not one)."""
    return sum(1 for k in params if k != ENCODER)


def _is_encoder(name: str) -> bool:
    """A tower parameter that `model.shared_encoder` shares: the transformer blocks and the output LayerNorm."""
    return name.startswith("block_") or name == "ln_out"


def tower_params(params: Params, d: int) -> Params:
    """Domain d's whole tower: its own parameters, with the shared encoder's merged in when there is one."""
    own = params[domain_key(d)]
    return {**own, **params[ENCODER]} if ENCODER in params else own


def _sem(semantic: Semantic, d: int) -> SemanticTable | None:
    return None if semantic is None else semantic[d]


def item_count(params: Params, d: int, semantic: Semantic = None) -> int:
    """Domain d's item count N: the ID table's rows - 1, or (model.item_ids=off) the semantic table's."""
    p = params[domain_key(d)]
    if "item_emb" in p:
        return p["item_emb"].shape[0] - 1
    sem = _sem(semantic, d)
    if sem is None:
        raise ValueError("a model without item IDs (model.item_ids='off') needs its semantic tables")
    return sem["mask"].shape[0] - 1


def _tower(params: Params, config: ModelConfig, d: int, semantic: Semantic = None) -> DomainTower:
    p = params[domain_key(d)]
    id_dim = p["item_emb"].shape[1] if "item_emb" in p else 0
    semantic_dim = p["fuse_in"]["kernel"].shape[0] - id_dim if "fuse_in" in p else 0
    return DomainTower(n_items=item_count(params, d, semantic), cfg=config, semantic_dim=semantic_dim)


def init_params(key: jax.Array, config: ModelConfig, n_items: Sequence[int], semantic: Semantic = None) -> Params:
    """Initial parameters for len(n_items) domains; a domain gets a fusion MLP iff it has a semantic table."""
    if config.item_ids == "off" and (semantic is None or any(s is None for s in semantic)):
        raise FedscopeError("model.item_ids=off represents every item by its semantic vector: give the item "
                            "vectors (--attributes DIR with item_embeddings.arrow), or use model.item_ids=train")
    params = {}
    for d, (k, n) in enumerate(zip(jax.random.split(key, len(n_items)), n_items)):
        sem = _sem(semantic, d)
        sdim = 0 if sem is None else int(sem["vectors"].shape[-1])
        tower = DomainTower(n_items=int(n), cfg=config, semantic_dim=sdim)
        seq = jnp.ones((1, config.max_len), jnp.int32)
        params[domain_key(d)] = tower.init(k, seq, sem, False)["params"]
    if config.shared_encoder:   # domain 0's initial blocks become everyone's; each tower keeps the rest
        params[ENCODER] = {n: v for n, v in params[domain_key(0)].items() if _is_encoder(n)}
        for d in range(len(n_items)):
            params[domain_key(d)] = {n: v for n, v in params[domain_key(d)].items() if not _is_encoder(n)}
    return params


def encode(params: Params, config: ModelConfig, d: int, seq: jnp.ndarray, semantic: Semantic = None,
           key: jax.Array | None = None, train: bool = False, keep: jnp.ndarray | None = None,
           items: jnp.ndarray | None = None) -> jnp.ndarray:
    """float32 [B, L, dim]: domain d's encoder outputs for left-padded shifted ids [B, L] (key: dropout).

    keep: optional bool [B, L], False where an item is masked (zero mask token; losses/seqcl.py).
    items: optional float32 [B, L, dim], the representations of `seq`'s items (`item_lookup`)."""
    tower = _tower(params, config, d, semantic)
    rngs = {"dropout": key} if train else {}
    if train and key is None:
        raise ValueError("encode(train=True) needs a dropout key")
    return tower.apply({"params": tower_params(params, d)}, seq, _sem(semantic, d), train, keep, items, rngs=rngs,
                       method=DomainTower.encode)


def item_repr(params: Params, config: ModelConfig, d: int, ids: jnp.ndarray, semantic: Semantic = None) -> jnp.ndarray:
    """float32 [..., dim]: domain d's item representations (fused when it has semantic vectors) of shifted ids."""
    tower = _tower(params, config, d, semantic)
    return tower.apply({"params": tower_params(params, d)}, ids, _sem(semantic, d), method=DomainTower.items)


def item_bias(params: Params, d: int, ids: jnp.ndarray) -> jnp.ndarray | None:
    """float32 [...]: domain d's per-item score biases of shifted ids (`model.item_bias`), or None without."""
    p = params[domain_key(d)]
    return jnp.take(p["item_bias"][:, 0], ids, axis=0) if "item_bias" in p else None


def all_item_repr(params: Params, config: ModelConfig, d: int, semantic: Semantic = None) -> jnp.ndarray:
    """float32 [N+1, dim]: every item of domain d (row 0 = padding)."""
    return item_repr(params, config, d, jnp.arange(item_count(params, d, semantic) + 1), semantic)


def item_lookup(params: Params, config: ModelConfig, d: int, semantic: Semantic, *ids: jnp.ndarray,
                table: bool | None = None) -> tuple[jnp.ndarray, ...]:
    """float32 [..., dim] for each of the id arrays `ids`: domain d's item representations.

    A fused item (`DomainTower.items`) costs a fusion MLP, which per occurrence runs once for every id given
    (a batch's inputs, targets and every sampled negative). Where domain d's table (its N + 1 rows: on a
    client's local vocabulary, that vocabulary) has fewer rows than the ids given, every row is fused once
    (`all_item_repr`) and the ids read from it: the same values and gradients, for less work. table: True /
    False forces either way (tests); None chooses the cheaper one (shapes are static: a trace-time choice)."""
    if table is None:
        fused = "fuse_in" in params[domain_key(d)]
        table = fused and item_count(params, d, semantic) + 1 < sum(x.size for x in ids)
    if not table:
        return tuple(item_repr(params, config, d, x, semantic) for x in ids)
    rows = all_item_repr(params, config, d, semantic)
    return tuple(jnp.take(rows, x, axis=0) for x in ids)
