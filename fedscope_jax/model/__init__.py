"""The FedSCOPE model: per-domain SASRec towers with semantic fusion, and its objective (pure functions)."""

from fedscope_jax.model.config import LossConfig, ModelConfig
from fedscope_jax.model.functional import (Params, Semantic, all_item_repr, domain_key, encode, init_params,
                                           item_bias, item_repr, n_domains)
from fedscope_jax.model.objective import loss_fn

__all__ = ["LossConfig", "ModelConfig", "Params", "Semantic", "all_item_repr", "domain_key", "encode",
           "init_params", "item_bias", "item_repr", "loss_fn", "n_domains"]
