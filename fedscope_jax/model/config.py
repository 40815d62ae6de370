"""Frozen configuration of the FedSCOPE model and its losses (hashable, so it can be a static jit argument)."""

from __future__ import annotations

import dataclasses

from fedscope_jax.errors import FedscopeError


REC_LOSSES = ("sampled", "in_batch", "full", "gbce")   # model.loss.rec
USER_NORMS = ("mean", "length")                       # model.loss.user_norm
UNIFORM_NEGATIVES = ("sampled", "gbce")                  # the losses whose negatives are uniform over the items


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Next-item loss and IIDCL weights. Total = L_rec + alpha * (lambda_intra * L_intra + lambda_inter * L_inter)
    + seqcl_weight * L_seqcl (the CL4SRec-style baseline term, losses/seqcl.py; off by default).

    rec: "sampled" (softmax over uniform negatives shared by the batch), "in_batch" (softmax over negatives drawn
    from the batch's own targets, i.e. by popularity; `logq` corrects for that), "full" (softmax over every item
    of the domain; memory B*L*N floats) or "gbce" (gSASRec's generalized binary cross-entropy over uniform
    negatives drawn per user, calibrated by `gbce_t`; Petrov & Macdonald, RecSys 2023). losses/rec.py has the
    formulas.
    A weight of 0 removes the term from the traced program (its gradient is exactly zero).
    """

    rec: str = "gbce"         # the loss that ranks best against the whole catalogue within the CPU budget
    num_negatives: int = 256  # gSASRec's 256; docs/experiments.md, "Losses for full ranking"
    gbce_t: float = 0.75      # gbce: calibration t in [0, 1]; 0 = plain BCE, 1 = fully corrected (gSASRec's 0.75)
    logq: bool = False        # in_batch: subtract log q (an item's in-batch sampling probability) from its scores
    alpha: float = 0.1
    lambda_intra: float = 1.0
    lambda_inter: float = 1.0
    tau_intra: float = 0.2
    tau_inter: float = 0.2
    rho: float = 0.02          # intra positives: K = min(ceil(rho * N), k_max), N = valid users in the batch
    k_max: int = 50
    # the user unit's per-user loss (loss_fn(per_user=True)): "mean" = each domain's next-item loss averaged over
    # the user's own targets (within a domain every user weighs the same); "length" = summed over them and
    # divided by the sequence length max_len (a public constant), so a user weighs by its number of targets
    # there, as every target of a domain does in a non-private batch's mean. Either way the user's clipped
    # gradient bounds the sensitivity. "length" is refused outside federated privacy.unit "user" runs
    # (train.config.check_user_norm).
    user_norm: str = "mean"
    seqcl_weight: float = 0.0  # CL4SRec-style sequence contrastive term (the FedCL4SRec baseline); 0 = off
    seqcl_tau: float = 0.2     # with cosine similarity (in [-1, 1]) a temperature of 1 barely separates views
    seqcl_crop: float = 0.6    # eta: share of the items a crop keeps
    seqcl_mask: float = 0.3    # gamma: share of the items a mask hides
    seqcl_reorder: float = 0.6  # beta: share of the items a reorder shuffles

    def __post_init__(self) -> None:
        if self.rec not in REC_LOSSES:
            raise FedscopeError(f"model.loss.rec={self.rec!r}; expected one of {', '.join(REC_LOSSES)}")
        if self.user_norm not in USER_NORMS:
            raise FedscopeError(f"model.loss.user_norm={self.user_norm!r}; expected one of {', '.join(USER_NORMS)}")
        if not 0.0 <= self.gbce_t <= 1.0:
            raise FedscopeError(f"model.loss.gbce_t={self.gbce_t}; expected 0 <= t <= 1")
        if self.logq and self.rec != "in_batch":
            raise FedscopeError(f"model.loss.logq=true needs model.loss.rec=in_batch (got {self.rec!r}): only "
                                "in-batch negatives are drawn by popularity; uniform negatives shift every score "
                                "by the same log q, which changes no softmax")
        if self.num_negatives < 1 or self.k_max < 1:
            raise FedscopeError("model.loss.num_negatives and model.loss.k_max must be >= 1")
        if min(self.tau_intra, self.tau_inter) <= 0:
            raise FedscopeError("model.loss.tau_intra and model.loss.tau_inter must be > 0")
        if not 0 < self.rho <= 1:
            raise FedscopeError(f"model.loss.rho={self.rho}; expected 0 < rho <= 1")
        if self.seqcl_weight < 0 or self.seqcl_tau <= 0:
            raise FedscopeError("model.loss.seqcl_weight must be >= 0 and model.loss.seqcl_tau > 0")
        for name in ("seqcl_crop", "seqcl_mask", "seqcl_reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FedscopeError(f"model.loss.{name}={getattr(self, name)}; expected a share in [0, 1]")


# model.item_ids: "train" = each item has a trained ID embedding (fused with its semantic vector when it has one);
# "off" = no per-item parameter: an item is the fusion MLP of its public semantic vector, and every item without
# one shares the domain's trained "unknown item" vector (fewer private dimensions under DP; docs/model.md).
# model.item_bias adds one trained scalar per item (a score bias) in either mode.
ITEM_IDS = ("train", "off")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """SASRec-style encoder per domain (paper-like defaults) plus optional semantic fusion, and its losses.

    shared_encoder: the domains share their transformer blocks and output LayerNorm (FedDCSR's FedSASRec
    shares its self-attention encoder between its domain clients); item tables, fusion and positions stay
    per domain."""

    dim: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.3
    max_len: int = 50
    fusion_hidden: int = 64     # hidden width of the [ID ; semantic] fusion MLP
    item_ids: str = "train"     # "train": a trained ID embedding per item; "off": items from their public vectors
    item_bias: bool = False     # a trained scalar per item added to its every score (an item's popularity)
    shared_encoder: bool = False  # one stack of transformer blocks (and output LayerNorm) for every domain
    loss: LossConfig = LossConfig()

    def __post_init__(self) -> None:
        if self.dim < 1 or self.blocks < 1 or self.heads < 1 or self.max_len < 1 or self.fusion_hidden < 1:
            raise FedscopeError("model.dim, blocks, heads, max_len, fusion_hidden must be >= 1")
        if self.dim % self.heads:
            raise FedscopeError(f"model.dim={self.dim} must be divisible by model.heads={self.heads}")
        if self.item_ids not in ITEM_IDS:
            raise FedscopeError(f"model.item_ids={self.item_ids!r}; expected one of {', '.join(ITEM_IDS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise FedscopeError(f"model.dropout={self.dropout}; expected 0 <= dropout < 1")

