"""Normalisation layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """Step1's RMSNorm: the variance in float32, the two products in the compute dtype.

    y = x * rsqrt(mean(x^2) + eps) * scale, with rsqrt(...) cast to x's dtype before the product,
    as `StepRMSNorm` does (architecture.md §1.2).
    """

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    logical_axes: tuple = ("norm",)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.logical_axes),
                           (x.shape[-1],), self.param_dtype)
        x = x.astype(self.dtype)
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(var + self.eps).astype(self.dtype)
        return y * scale.astype(self.dtype)
