"""tadjax: end-to-end temporal action detection in JAX/Flax."""

__version__ = "0.1.0"
