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

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from editx_jax.config.decoder import CONV_PRE_KERNEL, BigVGANConfig
from editx_jax.layers.activations import AntiAliasedActivation
from editx_jax.layers.conv import Conv1d, ConvTranspose1d


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
