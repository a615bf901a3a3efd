"""A bias-free projection over named axes, with logical axis names on its kernel."""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Projection(nn.Module):
    """y = x . kernel, contracting the last `len(in_axes)` dims of x.

    kernel shape is (*in_shape, *out_shape) with logical names `axes` (one per kernel dim); a params
    tree may hold it as `kernel_t` instead, (*out_shape, *in_shape) (generation's CPU layout).
    Inputs and kernel are cast to `dtype`; the product accumulates in float32 where the backend does.
    """

    out_shape: Sequence[int]
    axes: Sequence[str]
    in_ndim: int = 1
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    quantized: bool = False  # int8 kernel + float32 per-output-channel `kernel_scale` (models/quantize.py)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead, in_shape = x.shape[:x.ndim - self.in_ndim], x.shape[x.ndim - self.in_ndim:]
        fan_in = math.prod(in_shape)
        if self.has_variable("params", "kernel_t"):
            # The kernel laid out [*out, *in] (models/llm.py `split_layers`, generation on a CPU):
            # each output is a dot with one contiguous row, which XLA:CPU reads faster one token
            # at a time than the [*in, *out] layout. As an [N, K] matrix: with several output
            # axes XLA:CPU would take a slower path.
            kernel = self.get_variable("params", "kernel_t")
            kernel = kernel.reshape(-1, fan_in)
            contract = ((1,), (1,))
        else:
            shape = tuple(in_shape) + tuple(self.out_shape)
            # int8 weights come from quantizing float ones (models/quantize.py); their init is a placeholder
            init = nn.initializers.zeros if self.quantized else nn.initializers.normal(self.std)
            kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                                shape, jnp.int8 if self.quantized else self.param_dtype)
            kernel = kernel.reshape(fan_in, -1)
            contract = ((1,), (0,))
        # One [tokens, in] x [in, out] product, whatever the leading dims: contracting a [B, T, E]
        # input directly leaves the weight gradient a contraction over two dims (B and T), which
        # XLA:CPU lays out with transposing copies of the input and the output gradient. The LLM mid
        # MLP stack's forward and backward: 5.40 -> 3.96 s for 2 x 512 tokens. The forward alone is the same.
        x = x.reshape(-1, fan_in)
        if kernel.dtype == jnp.uint16:  # bfloat16 bits (models/llm.py: the inference form)
            kernel = jax.lax.bitcast_convert_type(kernel, jnp.bfloat16)
        out_shape = lead + tuple(self.out_shape)
        if not self.quantized:
            return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                       (contract, ((), ()))).reshape(out_shape)
        # Scales keep the kernel's rank (1 on the contracted dims), so they shard like its outputs.
        scale_axes = (None,) * self.in_ndim + tuple(self.axes[self.in_ndim:])
        scale = self.param("kernel_scale", nn.with_logical_partitioning(nn.initializers.ones, scale_axes),
                           (1,) * self.in_ndim + tuple(self.out_shape), jnp.float32)
        # Per-output-channel scales commute with the contraction: x . (q * s) = (x . q) * s, so the
        # int8 kernel is only widened (one layer at a time inside the scan), never multiplied.
        # XLA:CPU has no bfloat16 GEMM: it widens both operands to float32 anyway, and its
        # int8 -> bfloat16 convert is a scalar rounding routine (a 1024 x 2816 int8 matvec: 413 ms
        # per 12 layers against 55 ms widened straight to float32). int8 and bfloat16 values are
        # exact in float32, so on CPU the float32 contraction gives the same numbers, faster.
        compute = jnp.float32 if jax.default_backend() == "cpu" else self.dtype
        y = jax.lax.dot_general(x.astype(self.dtype).astype(compute), kernel.astype(compute), (contract, ((), ())),
                                preferred_element_type=jnp.float32).reshape(out_shape)
        return (y * scale.reshape(tuple(self.out_shape))).astype(self.dtype)
