"""Matmul precision names (config fields) -> jax.lax.Precision. The table is defined with the config
checks that validate those names (config/base.py) and re-exported here for the layers."""

from editx_jax.config.base import PRECISIONS  # noqa: F401  (re-exported)
