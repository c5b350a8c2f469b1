"""deit-jax: DeiT (data-efficient image transformers) in JAX/Flax."""

__version__ = "0.1.0"
