"""A bias-free projection over named axes, with logical axis names on its kernel."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Projection(nn.Module):
    """y = x . kernel, contracting the last `len(in_axes)` dims of x.

    kernel shape is (*in_shape, *out_shape) with logical names `axes` (one per kernel dim).
    Inputs and kernel are cast to `dtype`; the product accumulates in float32 where the backend does.
    """

    out_shape: Sequence[int]
    axes: Sequence[str]
    in_ndim: int = 1
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_ndim:]
        shape = tuple(in_shape) + tuple(self.out_shape)
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.std), tuple(self.axes)),
                            shape, self.param_dtype)
        if kernel.dtype == jnp.uint16:  # bfloat16 bits (see models/llm.py `as_scan_bits`)
            kernel = jax.lax.bitcast_convert_type(kernel, jnp.bfloat16)
        contract = (tuple(range(x.ndim - self.in_ndim, x.ndim)), tuple(range(self.in_ndim)))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
