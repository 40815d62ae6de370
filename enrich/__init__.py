"""Offline LLM enrichment (FedSCOPE pillar 1): a vLLM batch job writing attributes.arrow and item_embeddings.arrow.

Runs in its own virtual environment (.venv-enrich, `make enrich-env`) because vLLM pins its own torch; it never
imports jax or fedscope_jax. Modules without heavy imports (schema, prompts, retry, shards, options) are also
imported by the main environment's tests and CLI.
"""
