"""fedscope-jax: vectorized JAX/Flax simulation of federated cross-domain sequential recommendation.

Layers (imports run down only; tests/test_layers.py): cli -> experiments -> bench -> train -> engine -> privacy ->
eval -> model -> losses -> data -> utils -> errors.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
