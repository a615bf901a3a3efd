"""The LLM's SwiGLU with a lean backward pass; the vocoders' periodic activations and BigVGAN's
anti-aliased activation (architecture.md §3.7).

The vocoders' act on NWC data (batch, time, channels) with one parameter per channel.

* Snake (HiFT resblocks, linear-scale alpha):   x + 1/(alpha + 1e-9) * sin(alpha*x)^2
* SnakeBeta (BigVGAN, log-scale alpha, beta):   x + 1/(exp(beta) + 1e-9) * sin(exp(alpha)*x)^2
* AntiAliasedActivation (BigVGAN `Activation1d`): upsample x2 with a Kaiser-windowed sinc, apply the
  activation at the doubled rate, low-pass and decimate x2 with the same filter. The filter is computed
  here (`kaiser_sinc_filter`); checkpoints carry it as a buffer, which the converter checks against it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.layers.conv import depthwise_filter, replicate_pad_time

NO_DIV_BY_ZERO = 1e-9


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up. Its backward keeps only `gate` and `up` and recomputes the sigmoid: autodiff
    of the same expression keeps four [B, T, F] arrays per layer (the sigmoid, silu and both inputs),
    and a layer scan stacks every one of them over the layers for the backward pass. Training at
    the released size then holds 2 x [B, T, 8192] float32 per layer less; the 12-layer MLP stack
    of LLM mid (2 x 512 tokens) runs its forward and backward about 1.5 % faster on XLA:CPU."""
    return nn.silu(gate) * up


def _swiglu_forward(gate, up):
    return nn.silu(gate) * up, (gate, up)


def _swiglu_backward(saved, grad):
    gate, up = saved
    sigmoid = jax.nn.sigmoid(gate)
    silu = gate * sigmoid
    # d silu / d gate = sigmoid + gate * sigmoid * (1 - sigmoid)
    return grad * up * (sigmoid + silu * (1.0 - sigmoid)), grad * silu


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


def snake(x: jax.Array, alpha: jax.Array) -> jax.Array:
    """Snake with a linear-scale alpha per channel (last axis)."""
    return x + (1.0 / (alpha + NO_DIV_BY_ZERO)) * jnp.square(jnp.sin(x * alpha))


def snake_beta(x: jax.Array, alpha: jax.Array, beta: jax.Array, logscale: bool = True) -> jax.Array:
    """SnakeBeta: alpha sets the frequency, beta the magnitude; both stored as logs when `logscale`."""
    if logscale:
        alpha, beta = jnp.exp(alpha), jnp.exp(beta)
    return x + (1.0 / (beta + NO_DIV_BY_ZERO)) * jnp.square(jnp.sin(x * alpha))


class Snake(nn.Module):
    """Snake with its per-channel `alpha` param (linear scale unless `logscale`; then exp(alpha))."""

    logscale: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.logscale else nn.initializers.ones
        alpha = self.param("alpha", init, (x.shape[-1],), jnp.float32).astype(x.dtype)
        return snake(x, jnp.exp(alpha) if self.logscale else alpha)


class SnakeBeta(nn.Module):
    """SnakeBeta with per-channel `alpha` and `beta` params."""

    logscale: bool = True

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.logscale else nn.initializers.ones
        alpha = self.param("alpha", init, (x.shape[-1],), jnp.float32).astype(x.dtype)
        beta = self.param("beta", init, (x.shape[-1],), jnp.float32).astype(x.dtype)
        return snake_beta(x, alpha, beta, self.logscale)


# ------------------------------------------------------------------------------ anti-aliasing


def kaiser_beta(half_size: int, half_width: float) -> float:
    """Kaiser's empirical beta for the stop-band attenuation of a filter with `half_size` taps a side."""
    attenuation = 2.285 * (half_size - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        return 0.1102 * (attenuation - 8.7)
    if attenuation >= 21.0:
        return 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    return 0.0


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
    """A low-pass FIR: Kaiser window times sinc at `cutoff` (in cycles per sample), normalised to sum 1.

    An even `kernel_size` samples the sinc at half-integer times (-k/2 + 0.5 ... k/2 - 0.5), so the
    filter has no centre tap. Computed in float64, returned float32 (k,).
    """
    even = kernel_size % 2 == 0
    half_size = kernel_size // 2
    window = np.kaiser(kernel_size, kaiser_beta(half_size, half_width))
    time = np.arange(-half_size, half_size) + 0.5 if even else np.arange(kernel_size) - half_size
    if cutoff == 0:
        return np.zeros(kernel_size, np.float32)
    taps = 2 * cutoff * window * np.sinc(2 * cutoff * time)
    return (taps / taps.sum()).astype(np.float32)


def upsample(x: jax.Array, taps: np.ndarray, ratio: int = 2, precision: str = "highest") -> jax.Array:
    """BigVGAN UpSample1d on (B, L, C) -> (B, ratio*L, C).

    Replicate-pad by k/ratio - 1 samples, transposed depthwise conv with stride `ratio` (times
    `ratio`, to keep unit gain), then crop the filter's spill on both sides.
    """
    k = taps.shape[0]
    pad = k // ratio - 1
    crop_left = pad * ratio + (k - ratio) // 2
    crop_right = pad * ratio + (k - ratio + 1) // 2
    x = replicate_pad_time(x, pad, pad)
    # transposed conv == dilate by `ratio`, zero-pad k-1, correlate with the reversed taps (§3.7.3)
    y = ratio * depthwise_filter(x, jnp.asarray(taps[::-1].copy()), lhs_dilation=ratio,
                                 padding=(k - 1, k - 1), precision=precision)
    return y[:, crop_left:y.shape[1] - crop_right]


def downsample(x: jax.Array, taps: np.ndarray, ratio: int = 2, precision: str = "highest") -> jax.Array:
    """BigVGAN DownSample1d (LowPassFilter1d) on (B, L, C) -> (B, ceil(L/ratio), C)."""
    k = taps.shape[0]
    left, right = k // 2 - (k % 2 == 0), k // 2
    x = replicate_pad_time(x, left, right)
    return depthwise_filter(x, jnp.asarray(taps), stride=ratio, precision=precision)


class AntiAliasedActivation(nn.Module):
    """BigVGAN `Activation1d`: upsample x2, SnakeBeta (or Snake), downsample x2.

    Params (`alpha`, `beta`) live directly under this module; the filter is a constant.
    """

    kind: str = "snakebeta"  # or "snake"
    logscale: bool = True
    ratio: int = 2
    kernel_size: int = 12
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        if self.kind not in ("snake", "snakebeta"):
            raise ValueError(f"AntiAliasedActivation.kind: snake or snakebeta, got {self.kind!r}")
        taps = kaiser_sinc_filter(0.5 / self.ratio, 0.6 / self.ratio, self.kernel_size)
        c = x.shape[-1]
        init = nn.initializers.zeros if self.logscale else nn.initializers.ones
        alpha = self.param("alpha", init, (c,), jnp.float32).astype(x.dtype)
        h = upsample(x, taps, self.ratio, self.precision)
        if self.kind == "snakebeta":
            beta = self.param("beta", init, (c,), jnp.float32).astype(x.dtype)
            h = snake_beta(h, alpha, beta, self.logscale)
        else:
            h = snake(h, jnp.exp(alpha) if self.logscale else alpha)
        return downsample(h, taps, self.ratio, self.precision)
