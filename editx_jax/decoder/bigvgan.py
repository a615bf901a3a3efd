"""BigVGAN v2 as in Step-Audio-EditX's `stepvocoder/cosyvoice2/bigvgan` (architecture.md §3.7.2).

Present in the official code but not used by the shipped cosyvoice.yaml (which uses HiFT). Mel
(B, n_mels, T) -> waveform (B, (T - 6) * prod(upsample_rates)):

  conv_pre (k7, padding 0: Step's class; NVIDIA's PyPI `bigvgan` pads 3, so the caller reflect-pads
  the mel by 3 frames on each side instead) -> per stage [ConvTranspose1d, mean of the AMP blocks]
  -> anti-aliased SnakeBeta -> conv_post (k7, p3) -> clamp(-1, 1) (or tanh with use_tanh_at_final).

AMPBlock1, per dilation d: x += conv2(act2(conv1_d(act1(x)))). AMPBlock2: x += conv_d(act(x)).
Every activation is anti-aliased (x2 up, SnakeBeta, x2 down; editx_jax/layers/activations.py).
Data inside is NWC.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config import ConfigError
from editx_jax.layers.activations import AntiAliasedActivation
from editx_jax.layers.conv import PRECISIONS, Conv1d, ConvTranspose1d

CONV_PRE_KERNEL = 7


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class BigVGANConfig:
    """Step's BigVGAN constructor arguments; defaults are the class defaults (real sizes unknown)."""

    num_mels: int = 80
    upsample_initial_channel: int = 512
    upsample_rates: tuple[int, ...] = (5, 4, 3, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 8, 7, 4, 4, 4)
    resblock: str = "1"  # "1" = AMPBlock1, "2" = AMPBlock2
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"  # or "snake"
    snake_logscale: bool = True
    use_bias_at_final: bool = False
    use_tanh_at_final: bool = False
    conv_pre_padding: int = 0  # Step's class; NVIDIA's bigvgan package uses 3
    matmul_precision: str = "highest"

    def __post_init__(self):
        for name in ("resblock_dilation_sizes", "upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for name in ("num_mels", "upsample_initial_channel"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"bigvgan.{name}: must be a positive integer, got {value!r}")
        n = len(self.upsample_rates)
        if n == 0 or len(self.upsample_kernel_sizes) != n:
            raise ConfigError(f"bigvgan.upsample_kernel_sizes: need one kernel per upsample rate ({n}), "
                              f"got {list(self.upsample_kernel_sizes)}")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if u <= 0 or k < u or (k - u) % 2:
                raise ConfigError(f"bigvgan.upsample_kernel_sizes: kernel {k} for rate {u} must be >= the rate "
                                  f"with an even difference, so that each stage scales the length exactly")
        if self.upsample_initial_channel // 2 ** n < 1:
            raise ConfigError(f"bigvgan.upsample_initial_channel: {self.upsample_initial_channel} is too small "
                              f"for {n} halvings")
        if self.resblock not in ("1", "2"):
            raise ConfigError(f"bigvgan.resblock: '1' (AMPBlock1) or '2' (AMPBlock2), got {self.resblock!r}")
        if not self.resblock_kernel_sizes or len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ConfigError("bigvgan.resblock_dilation_sizes: need one dilation list per resblock kernel")
        if any(k % 2 == 0 or k <= 0 for k in self.resblock_kernel_sizes):
            raise ConfigError(f"bigvgan.resblock_kernel_sizes: kernels must be odd and positive, "
                              f"got {list(self.resblock_kernel_sizes)}")
        if self.activation not in ("snake", "snakebeta"):
            raise ConfigError(f"bigvgan.activation: 'snake' or 'snakebeta', got {self.activation!r}")
        if not 0 <= self.conv_pre_padding <= CONV_PRE_KERNEL // 2:
            raise ConfigError(f"bigvgan.conv_pre_padding: between 0 and 3, got {self.conv_pre_padding}")
        if self.matmul_precision not in PRECISIONS:
            raise ConfigError(f"bigvgan.matmul_precision: one of {sorted(PRECISIONS)}, got {self.matmul_precision!r}")

    @property
    def hop(self) -> int:
        return int(np.prod(self.upsample_rates))

    @property
    def frames_consumed(self) -> int:
        """Mel frames lost at conv_pre (6 in Step's class): output samples = (T - this) * hop."""
        return CONV_PRE_KERNEL - 1 - 2 * self.conv_pre_padding

    def stage_channels(self, i: int) -> int:
        return self.upsample_initial_channel // 2 ** (i + 1)


class BigVGANInputError(ValueError):
    """BigVGAN was given a mel of the wrong shape or too few frames."""


class AMPBlock(nn.Module):
    """AMPBlock1 (two convs per dilation) or AMPBlock2 (one), with anti-aliased activations.

    The activations are numbered in call order, like torch's `activations` list (AMPBlock1 alternates
    a1, a2 per dilation).
    """

    channels: int
    kernel_size: int
    dilations: tuple[int, ...]
    config: BigVGANConfig

    @nn.compact
    def __call__(self, x):
        cfg, k = self.config, self.kernel_size
        prec = cfg.matmul_precision
        act = functools.partial(AntiAliasedActivation, kind=cfg.activation, logscale=cfg.snake_logscale,
                                precision=prec)
        two = cfg.resblock == "1"
        for j, d in enumerate(self.dilations):
            h = act(name=f"activations_{2 * j if two else j}")(x)
            h = Conv1d(self.channels, k, padding=d * (k - 1) // 2, dilation=d, precision=prec, name=f"convs1_{j}" if two
                       else f"convs_{j}")(h)
            if two:
                h = act(name=f"activations_{2 * j + 1}")(h)
                h = Conv1d(self.channels, k, padding=(k - 1) // 2, precision=prec, name=f"convs2_{j}")(h)
            x = x + h
        return x


class BigVGAN(nn.Module):
    """BigVGAN v2 generator on NWC mel (B, T, n_mels) -> (B, (T - 6) * hop)."""

    config: BigVGANConfig

    @nn.compact
    def __call__(self, mel):
        cfg = self.config
        prec = cfg.matmul_precision
        x = Conv1d(cfg.upsample_initial_channel, CONV_PRE_KERNEL, padding=cfg.conv_pre_padding, precision=prec,
                   name="conv_pre")(mel)
        n_kernels = len(cfg.resblock_kernel_sizes)
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            ch = cfg.stage_channels(i)
            x = ConvTranspose1d(ch, k, stride=u, padding=(k - u) // 2, precision=prec, name=f"ups_{i}")(x)
            x = sum(AMPBlock(ch, kk, dd, cfg, name=f"resblocks_{i * n_kernels + j}")(x)
                    for j, (kk, dd) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)))
            x = x / n_kernels
        x = AntiAliasedActivation(kind=cfg.activation, logscale=cfg.snake_logscale, precision=prec,
                                  name="activation_post")(x)
        x = Conv1d(1, 7, padding=3, use_bias=cfg.use_bias_at_final, precision=prec, name="conv_post")(x)
        x = jnp.tanh(x) if cfg.use_tanh_at_final else jnp.clip(x, -1.0, 1.0)
        return x[..., 0]


@functools.partial(jax.jit, static_argnames=("config", "frames"))
def init_params(key: jax.Array, config: BigVGANConfig = BigVGANConfig(), frames: int = 8) -> dict:
    """Random params (for tests and training from scratch); real ones come from the converter."""
    mel = jnp.zeros((1, frames, config.num_mels), jnp.float32)
    return BigVGAN(config).init(key, mel)["params"]


@functools.lru_cache(maxsize=8)
def abstract_params(config: BigVGANConfig = BigVGANConfig()) -> dict:
    """Shapes and dtypes of the params tree, without allocating it (for the converter; cached, since
    tracing the unrolled blocks takes seconds). Treat the result as read-only."""
    return jax.eval_shape(functools.partial(init_params, config=config), jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnames=("config",))
def _inference(params, mel_bct, config):
    mel = jnp.swapaxes(mel_bct.astype(jnp.float32), 1, 2)
    return BigVGAN(config).apply({"params": params}, mel)


def bigvgan_inference(params: dict, mel, config: BigVGANConfig = BigVGANConfig()) -> jax.Array:
    """BigVGAN.inference: mel (B, n_mels, T) channels-first -> wav (B, (T - 6) * hop) in [-1, 1]."""
    mel = jnp.asarray(mel)
    if mel.ndim != 3 or mel.shape[1] != config.num_mels or mel.shape[2] <= config.frames_consumed:
        raise BigVGANInputError(f"mel must be (batch, {config.num_mels}, frames) with frames > "
                                f"{config.frames_consumed}, got shape {tuple(mel.shape)}")
    return _inference(params, mel, config)
