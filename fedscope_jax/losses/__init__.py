"""Losses: next-item prediction (rec) and IIDCL contrastive terms (iidcl); pure jnp functions."""
