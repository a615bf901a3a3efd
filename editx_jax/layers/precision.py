"""Matmul precision names (config fields) -> jax.lax.Precision."""

import jax

from editx_jax.config import MATMUL_PRECISIONS

PRECISIONS = {name: jax.lax.Precision[name.upper()] for name in MATMUL_PRECISIONS}
