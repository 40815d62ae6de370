"""Losses: next-item prediction (rec), IIDCL contrastive terms (iidcl), sequence contrastive learning
(seqcl); pure jnp functions."""

__all__ = ["iidcl", "rec", "seqcl"]
