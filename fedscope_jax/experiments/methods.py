"""The compared methods, defined once: how each one trains (mode) and what it changes in the RunConfig.

A study config names methods; a cell's RunConfig is profile overrides + DP setting + the method's overrides.
`vectors`: which item vectors the method reads: "llm" (the LLM attribute vectors of `--attributes-root`, when
they exist), "title" (vectors of the raw titles and metadata, `--title-root`, made by `fedscope enrich --text
title`: the ablation's title-only arm, the privacy study's no-ID arm on titles; not run without them) or "none"
(ID only).
A method with `model.item_ids=off` represents items by those vectors alone (no item table: fewer private
dimensions under DP, docs/privacy.md; a profile that sets `model.item_bias` adds one scalar per item) and so
needs them: like the title-only arm, its cells are not run without them (`needs_vectors`).
`dp_mode`: the FedAvg baselines and the uniform-DP ablation run DP with one budget for every client
(privacy mode "uniform", i.e. DP-FedAvg with local noise) at the cell's epsilon; FedSCOPE uses the cell's mode.
`dp`: "any" (federated: runs with and without DP), "none" (DP does not apply: local-only training shares
nothing, and the centralized upper bound pools raw data; tables say "n/a"), "required" (a DP ablation),
"no-user" (no cell with the user as the privacy unit, where the method's difference vanishes: FedCL4SRec's
contrastive term takes its negatives from the other users of a batch, so with a batch of one user it is 0 and
the cell would be FedSASRec's; the user unit has no intra-domain term, so "w/o intra" would be FedSCOPE's).
`skip_without_llm`: an arm defined by removing the LLM vectors ("w/o LLM"); without LLM vectors for the
dataset (no `--attributes-root`, or none there for it) FedSCOPE itself runs ID-only, so the arm's cells
would repeat FedSCOPE's: they are not run, and the report says so.
"""

from __future__ import annotations

import dataclasses

from fedscope_jax.errors import FedscopeError

MODES = ("federated", "local", "centralized")
DP_RULES = ("any", "none", "required", "no-user")
VECTORS = ("llm", "title", "none")


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method: training mode, RunConfig overrides (dotted keys), attribute use, DP applicability."""

    name: str
    label: str
    mode: str
    overrides: tuple[tuple[str, str], ...] = ()
    vectors: str = "llm"
    dp: str = "any"
    dp_mode: str | None = None   # the privacy mode this method uses when a cell has DP on (None: the cell's)
    note: str = ""
    skip_without_llm: bool = False   # its cells repeat FedSCOPE's when there are no LLM vectors: not run then

    def settings(self) -> tuple[str, ...]:
        """The overrides as `--set` strings."""
        return tuple(f"{k}={v}" for k, v in self.overrides)

    @property
    def needs_vectors(self) -> bool:
        """True when the method cannot train without its item vectors (never run ID-only under its name)."""
        return self.vectors == "title" or ("model.item_ids", "off") in self.overrides

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.dp not in DP_RULES or self.vectors not in VECTORS:
            raise ValueError(f"method {self.name}: bad mode {self.mode!r}, dp {self.dp!r} or vectors {self.vectors!r}")
        if self.vectors == "none" and ("model.item_ids", "off") in self.overrides:
            raise ValueError(f"method {self.name}: without item IDs its items are their vectors; vectors 'none'")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fedscope", "FedSCOPE", "federated",
           note="federated, LLM attributes (when enriched), intra + inter contrastive terms, personalized DP"),
    Method("local", "Local-only", "local",
           dp="none", note="the FedSCOPE model trained by each client on its own data alone; nothing is shared"),
    Method("fedsasrec", "FedSASRec", "federated", (("model.loss.alpha", "0"),), vectors="none", dp_mode="uniform",
           note="FedAvg of SASRec: no attributes, no contrastive terms"),
    Method("fedcl4srec", "FedCL4SRec", "federated",
           (("model.loss.alpha", "0"), ("model.loss.seqcl_weight", "0.1")), vectors="none", dp="no-user",
           dp_mode="uniform", note="FedSASRec plus the CL4SRec-style sequence contrastive term (weight 0.1); no "
                                   "user-level DP cell: there the term has no negatives and is 0"),
    Method("centralized", "Centralized SASRec", "centralized", (("model.loss.alpha", "0"),), vectors="none",
           dp="none", note="SASRec on the pooled data: the non-private upper bound"),
    Method("fedscope_wo_llm", "w/o LLM", "federated", vectors="none", skip_without_llm=True,
           note="FedSCOPE without the attribute vectors (ID embeddings only); not run without them, when FedSCOPE "
                "is ID-only itself"),
    Method("fedscope_title", "title only", "federated", vectors="title",
           note="FedSCOPE with vectors of the raw titles (the same sentence encoder, no LLM) in place of the LLM "
                "attribute vectors: what the LLM adds beyond embedding the title"),
    Method("fedscope_noid", "no item IDs (LLM vectors)", "federated", (("model.item_ids", "off"),),
           note="FedSCOPE whose items are the frozen public LLM attribute vectors through the trained fusion MLP, "
                "with no item-ID table: the private parameters are the encoder, the fusion layers and one shared "
                "vector for the items without one"),
    Method("fedscope_title_noid", "no item IDs (title vectors)", "federated", (("model.item_ids", "off"),),
           vectors="title", note="the same with the title vectors of --title-root (no LLM)"),
    Method("fedscope_wo_intra", "w/o intra", "federated", (("model.loss.lambda_intra", "0"),), dp="no-user",
           note="FedSCOPE without the intra-domain contrastive term; no user-level DP cell: the user unit has no "
                "intra term, so it would be FedSCOPE's"),
    Method("fedscope_wo_inter", "w/o inter", "federated", (("model.loss.lambda_inter", "0"),),
           note="FedSCOPE without the inter-domain contrastive term"),
    Method("fedscope_uniform_dp", "uniform DP", "federated", dp="required", dp_mode="uniform",
           note="FedSCOPE with one budget for every client instead of personalized budgets"),
)}


def vector_arms() -> tuple[str, ...]:
    """FedSCOPE and its arms that differ from it in their item vectors alone (LLM attributes, title vectors, ID
    only): federated, no overrides, any DP, the cell's privacy mode. Their runs pair by seed (`tables.vector_rows`)."""
    return tuple(m.name for m in METHODS.values()
                 if m.mode == "federated" and not m.overrides and m.dp == "any" and m.dp_mode is None)


def get_method(name: str, where: str = "methods") -> Method:
    """The method called `name`; a FedscopeError naming `where` and the known methods otherwise."""
    if name not in METHODS:
        raise FedscopeError(f"{where}: unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]
