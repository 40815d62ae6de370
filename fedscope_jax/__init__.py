"""fedscope-jax: vectorized JAX/Flax simulation of federated cross-domain sequential recommendation."""

__version__ = "0.1.0"
