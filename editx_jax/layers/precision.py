"""Matmul precision names (config fields, validated by config/base.py) -> jax.lax.Precision. The table
lives here, not in config/, so that reading a config never imports jax."""

import jax

from editx_jax.config.base import MATMUL_PRECISIONS

PRECISIONS = {name: jax.lax.Precision[name.upper()] for name in MATMUL_PRECISIONS}
