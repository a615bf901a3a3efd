"""1-D convolutions on NWC data (batch, time, channels) with PyTorch's padding semantics.

`Conv1d` is torch's `nn.Conv1d` (symmetric or explicit zero padding, dilation, stride); its kernel is
[k, in, out] (torch [out, in, k] under the converters' `conv1d` layout).

`ConvTranspose1d` is torch's `nn.ConvTranspose1d` (architecture.md §3.7.3). Its kernel is stored as
the kernel of the forward convolution it is the transpose of, [k, out, in]: that is exactly torch's
[in, out, k] weight under the same `conv1d` layout, so converters need no extra layout op.
It is computed as step 1-3 of §3.7.3: dilate the input by the stride, zero-pad k-1-p on both sides,
and cross-correlate with the kernel flipped in time and with in/out swapped.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from editx_jax.layers.precision import PRECISIONS

_DIMS = ("NWC", "WIO", "NWC")


def _pair(padding: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(padding, int):
        return padding, padding
    lo, hi = padding
    return int(lo), int(hi)


class Conv1d(nn.Module):
    """torch.nn.Conv1d on (B, L, C_in) -> (B, L_out, features)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int | tuple[int, int] = 0  # zeros on (left, right); an int pads both sides
    dilation: int = 1
    use_bias: bool = True
    precision: str = "highest"  # float32 convs stay exact on accelerators (no TF32 passes)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1] * self.kernel_size
        kernel = self.param("kernel", nn.initializers.normal(fan_in ** -0.5),
                            (self.kernel_size, x.shape[-1], self.features), jnp.float32)
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), window_strides=(self.stride,), padding=[_pair(self.padding)],
            rhs_dilation=(self.dilation,), dimension_numbers=_DIMS, precision=PRECISIONS[self.precision])
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(y.dtype)
        return y


class ConvTranspose1d(nn.Module):
    """torch.nn.ConvTranspose1d on (B, L, C_in) -> (B, (L-1)*stride - 2*padding + k, features)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, p = self.kernel_size, self.padding
        if not 0 <= p <= k - 1:
            raise ValueError(f"ConvTranspose1d: padding {p} must lie in [0, kernel_size - 1 = {k - 1}]")
        # [k, out, in]: the forward conv (out -> in) whose transpose this is (torch [in, out, k]).
        kernel = self.param("kernel", nn.initializers.normal((x.shape[-1] * k / self.stride) ** -0.5),
                            (k, self.features, x.shape[-1]), jnp.float32)
        rhs = jnp.flip(kernel, 0).swapaxes(1, 2).astype(x.dtype)  # [k, in, out], taps reversed
        y = jax.lax.conv_general_dilated(
            x, rhs, window_strides=(1,), padding=[(k - 1 - p, k - 1 - p)], lhs_dilation=(self.stride,),
            dimension_numbers=_DIMS, precision=PRECISIONS[self.precision])
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(y.dtype)
        return y


def depthwise_filter(x: jax.Array, taps: jax.Array, stride: int = 1, lhs_dilation: int = 1,
                     padding: tuple[int, int] = (0, 0), precision: str = "highest") -> jax.Array:
    """Cross-correlate every channel of x (B, L, C) with the same 1-D filter `taps` (k,)."""
    c = x.shape[-1]
    rhs = jnp.broadcast_to(taps.astype(x.dtype)[:, None, None], (taps.shape[0], 1, c))
    return jax.lax.conv_general_dilated(
        x, rhs, window_strides=(stride,), padding=[padding], lhs_dilation=(lhs_dilation,),
        dimension_numbers=_DIMS, feature_group_count=c, precision=PRECISIONS[precision])


def reflect_pad_time(x: jax.Array, left: int, right: int) -> jax.Array:
    """torch ReflectionPad1d((left, right)) on (B, L, C): mirror without repeating the edge sample."""
    return jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")


def replicate_pad_time(x: jax.Array, left: int, right: int) -> jax.Array:
    """torch F.pad(..., mode='replicate') on (B, L, C): repeat the edge samples."""
    return jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="edge")
