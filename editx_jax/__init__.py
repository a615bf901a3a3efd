"""editx-jax: Step-Audio-EditX in JAX/Flax."""

__version__ = "0.1.0"
