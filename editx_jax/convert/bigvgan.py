"""Converter for Step's BigVGAN state_dict (architecture.md §3.7.2); NVIDIA's PyPI `bigvgan` v2 uses
the same key names and shapes.

Weight norm (old `weight_g`/`weight_v`, or the parametrizations kind) is folded by
`WeightNormSource` (editx_jax/convert/sources.py). The anti-alias filter buffers
(`*.upsample.filter`, `*.downsample.lowpass.filter`) are not params: our activation computes the
Kaiser-sinc filter itself, so the converter checks each stored buffer against it (a mismatch means
a different filter design, which the model would silently ignore) and consumes it.

`to_state_dict` is the inverse: torch names and layouts, weight norm on every conv (as the
official generator holds it before `remove_weight_norm`), and the filter buffers it registers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np

from editx_jax.config import ConfigError
from editx_jax.convert.hift import conv_rules
from editx_jax.convert.keymap import ConversionError, Rule, TensorSource, convert, export
from editx_jax.convert.sources import TorchSource, WeightNormSource, checkpoint_source, with_weight_norm
from editx_jax.decoder.bigvgan import BigVGANConfig, abstract_params
from editx_jax.layers.activations import kaiser_sinc_filter

FILTER_SUFFIXES = (".upsample.filter", ".downsample.lowpass.filter")
FILTER_ATOL = 1e-6
RATIO, FILTER_SIZE = 2, 12  # the anti-alias resampling of every Activation1d: 2x, 12 taps


def bigvgan_config_from_reference(cfg: dict, **overrides) -> BigVGANConfig:
    """From Step's BigVGAN(**kwargs) arguments, as in the fixture manifests."""
    cfg = dict(cfg)
    cfg.pop("use_cuda_kernel", None)  # NVIDIA's fused CUDA activation computes the same maths
    known = {f.name for f in dataclasses.fields(BigVGANConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"bigvgan.{unknown[0]}: unknown BigVGAN argument")
    if "resblock" in cfg:
        cfg["resblock"] = str(cfg["resblock"])
    return BigVGANConfig(**{**cfg, **overrides})


def _filter(ratio: int = RATIO, kernel_size: int = FILTER_SIZE) -> np.ndarray:
    return np.asarray(kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size), np.float32)


class _WithoutFilters:
    """A TensorSource view of `inner` without the anti-alias filter buffers, each checked on the way."""

    def __init__(self, inner: TensorSource, ratio: int = RATIO, kernel_size: int = FILTER_SIZE):
        self.inner = inner
        want = _filter(ratio, kernel_size)
        self._names = []
        for name in inner.names():
            if not name.endswith(FILTER_SUFFIXES):
                self._names.append(name)
                continue
            shape = tuple(inner.shape(name))
            if shape != (1, 1, kernel_size):
                raise ConversionError(f"tensor {name!r} has shape {list(shape)}; expected [1, 1, {kernel_size}]")
            got = np.asarray(inner.get(name), np.float32).reshape(-1)
            if not np.allclose(got, want, rtol=0, atol=FILTER_ATOL):
                raise ConversionError(f"tensor {name!r} is not the Kaiser-sinc filter (cutoff {0.5 / ratio}, "
                                      f"half-width {0.6 / ratio}) this model computes: max diff "
                                      f"{np.abs(got - want).max():.3g}")

    def names(self):
        return list(self._names)

    def shape(self, name):
        return self.inner.shape(name)

    def get(self, name):
        return self.inner.get(name)


def _activation(src: str, dst: str, config: BigVGANConfig) -> list[Rule]:
    names = ("alpha", "beta") if config.activation == "snakebeta" else ("alpha",)
    return [Rule(f"{src}.act.{p}", f"{dst}/{p}") for p in names]


def rules(config: BigVGANConfig) -> list[Rule]:
    """torch names (weight norm folded to `<m>.weight`, filters removed) -> our params paths."""
    out = conv_rules("conv_pre", "conv_pre") + conv_rules("conv_post", "conv_post", bias=config.use_bias_at_final)
    out += _activation("activation_post", "activation_post", config)
    n_kernels = len(config.resblock_kernel_sizes)
    two = config.resblock == "1"
    for i in range(len(config.upsample_rates)):
        out += conv_rules(f"ups.{i}.0", f"ups_{i}")  # [in, out, k] -> [k, out, in] (layers/conv.py)
        for j, dilations in enumerate(config.resblock_dilation_sizes):
            k = i * n_kernels + j
            for d in range(len(dilations)):
                if two:
                    out += conv_rules(f"resblocks.{k}.convs1.{d}", f"resblocks_{k}/convs1_{d}")
                    out += conv_rules(f"resblocks.{k}.convs2.{d}", f"resblocks_{k}/convs2_{d}")
                else:
                    out += conv_rules(f"resblocks.{k}.convs.{d}", f"resblocks_{k}/convs_{d}")
            for m in range(len(dilations) * (2 if two else 1)):
                out += _activation(f"resblocks.{k}.activations.{m}", f"resblocks_{k}/activations_{m}", config)
    return out


def from_source(source: TensorSource, config: BigVGANConfig = BigVGANConfig(), dtype=None, progress=None) -> dict:
    """Params from any TensorSource over BigVGAN state_dict names (weight-normed or plain; the fixed
    anti-aliasing filters are checked and dropped)."""
    return convert(WeightNormSource(_WithoutFilters(source)), rules(config), abstract_params(config), dtype=dtype,
                   progress=progress)


def from_state_dict(state_dict: Mapping, config: BigVGANConfig = BigVGANConfig(), dtype=None) -> dict:
    """Params from a BigVGAN state_dict (torch tensors or numpy arrays)."""
    return from_source(TorchSource(state_dict), config, dtype)


def from_checkpoint(path: str | os.PathLike, config: BigVGANConfig = BigVGANConfig(), dtype=None) -> dict:
    """Params from a torch-pickled (NVIDIA's `bigvgan_generator.pt` holds it under 'generator') or
    safetensors BigVGAN state_dict."""
    return from_source(checkpoint_source(path), config, dtype)


def to_state_dict(params: Mapping, config: BigVGANConfig = BigVGANConfig(),
                  weight_norm: str = "old") -> dict[str, np.ndarray]:
    """Our params back to a BigVGAN generator state_dict (the inverse of `from_state_dict`).

    weight_norm: 'old' (`weight_g` / `weight_v`, how NVIDIA's `bigvgan_generator.pt` stores it),
    'parametrizations' or 'none' (plain folded weights, the round trip is then bit-exact). Every
    activation gets its `upsample.filter` and `downsample.lowpass.filter` buffers [1, 1, 12]."""
    config_rules = rules(config)
    convs = {r.source[:-len(".weight")] for r in config_rules if r.source.endswith(".weight")}
    out = with_weight_norm(export(params, config_rules), convs, weight_norm)
    buffer = _filter().reshape(1, 1, FILTER_SIZE)
    for r in config_rules:
        if r.source.endswith(".act.alpha"):
            base = r.source[:-len(".act.alpha")]
            out[f"{base}.upsample.filter"] = buffer.copy()
            out[f"{base}.downsample.lowpass.filter"] = buffer.copy()
    return out
