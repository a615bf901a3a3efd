"""Converter for HiFT (`CosyVoice-300M-25Hz/hift.pt`, architecture.md §3.7.1, §4 item 3).

Weight norm is folded at conversion: the released file stores `<m>.parametrizations.weight.original0`
(g) and `.original1` (v) per weight-normed module (older files `<m>.weight_g` / `<m>.weight_v`);
`editx_jax.convert.sources.WeightNormSource` presents each pair as one plain `<m>.weight`, so the
rules below only name plain weights. `to_state_dict` writes the pairs back.

ConvTranspose1d weights [in, out, k] use the ordinary `conv1d` layout: our ConvTranspose1d stores the
kernel of the forward conv it transposes, [k, out, in] (see editx_jax/layers/conv.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np

from editx_jax.config import ConfigError
from editx_jax.config.decoder import HiFTConfig
from editx_jax.convert.keymap import Rule, TensorSource, convert, export
from editx_jax.convert.sources import TorchSource, WeightNormSource, checkpoint_source, with_weight_norm
from editx_jax.decoder.hift import abstract_params

# -------------------------------------------------------------------------------------- config


def hift_config_from_reference(cfg: dict, **overrides) -> HiFTConfig:
    """From HiFTGenerator's constructor args (+ the nested f0_predictor), as in cosyvoice.yaml."""
    cfg = dict(cfg)
    f0 = dict(cfg.pop("f0_predictor", {}) or {})
    istft = dict(cfg.pop("istft_params", {}) or {})
    if f0.get("num_class", 1) != 1:
        raise ConfigError(f"hift.f0_predictor.num_class: only 1 (f0 in Hz) is supported, got {f0['num_class']}")
    if "in_channels" in f0 and f0["in_channels"] != cfg.get("in_channels", HiFTConfig.in_channels):
        raise ConfigError(f"hift.f0_predictor.in_channels: {f0['in_channels']} must equal in_channels "
                          f"{cfg.get('in_channels', HiFTConfig.in_channels)} (both read the mel)")
    known = {f.name for f in dataclasses.fields(HiFTConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"hift.{unknown[0]}: unknown HiFTGenerator argument")
    args = {**cfg}
    if "cond_channels" in f0:
        args["f0_cond_channels"] = int(f0["cond_channels"])
    if "n_fft" in istft:
        args["istft_n_fft"] = int(istft["n_fft"])
    if "hop_len" in istft:
        args["istft_hop_len"] = int(istft["hop_len"])
    return HiFTConfig(**{**args, **overrides})


# --------------------------------------------------------------------------------------- rules


def conv_rules(src: str, dst: str, bias: bool = True) -> list[Rule]:
    """A torch Conv1d / ConvTranspose1d `{src}.weight` (+ `.bias`) -> `{dst}/kernel` (+ `/bias`)."""
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", "conv1d")]
    if bias:
        rules.append(Rule(f"{src}.bias", f"{dst}/bias"))
    return rules


def _resblock(src: str, dst: str, n_dilations: int) -> list[Rule]:
    rules = []
    for j in range(n_dilations):
        for a in ("convs1", "convs2"):
            rules += conv_rules(f"{src}.{a}.{j}", f"{dst}/{a}_{j}")
        for a in ("activations1", "activations2"):
            rules.append(Rule(f"{src}.{a}.{j}.alpha", f"{dst}/{a}_{j}/alpha"))
    return rules


def rules(config: HiFTConfig) -> list[Rule]:
    """torch names (with weight norm folded to `<m>.weight`) -> our params paths."""
    out = []
    for i in range(config.f0_num_convs):
        out += conv_rules(f"f0_predictor.condnet.{2 * i}", f"f0_predictor/condnet_{i}")  # ELUs sit between
    out += [Rule("f0_predictor.classifier.weight", "f0_predictor/classifier/kernel", "linear"),
            Rule("f0_predictor.classifier.bias", "f0_predictor/classifier/bias"),
            Rule("m_source.l_linear.weight", "m_source/l_linear/kernel", "linear"),
            Rule("m_source.l_linear.bias", "m_source/l_linear/bias")]
    out += conv_rules("conv_pre", "conv_pre") + conv_rules("conv_post", "conv_post")
    n_kernels = len(config.resblock_kernel_sizes)
    for i in range(len(config.upsample_rates)):
        out += conv_rules(f"ups.{i}", f"ups_{i}")  # [in, out, k] -> [k, out, in], see module docstring
        out += conv_rules(f"source_downs.{i}", f"source_downs_{i}")
        out += _resblock(f"source_resblocks.{i}", f"source_resblocks_{i}",
                         len(config.source_resblock_dilation_sizes[i]))
        for j in range(n_kernels):
            k = i * n_kernels + j
            out += _resblock(f"resblocks.{k}", f"resblocks_{k}", len(config.resblock_dilation_sizes[j]))
    return out


# ------------------------------------------------------------------------------------ convert


def from_source(source: TensorSource, config: HiFTConfig = HiFTConfig(), dtype=None, progress=None) -> dict:
    """Params from any TensorSource over HiFTGenerator state_dict names (weight-normed or plain)."""
    return convert(WeightNormSource(source), rules(config), abstract_params(config), dtype=dtype, progress=progress)


def from_state_dict(state_dict: Mapping, config: HiFTConfig = HiFTConfig(), dtype=None) -> dict:
    """Params from an in-memory HiFTGenerator state_dict (torch tensors or numpy arrays)."""
    return from_source(TorchSource(state_dict), config, dtype)


def from_checkpoint(path: str | os.PathLike, config: HiFTConfig = HiFTConfig(), dtype=None) -> dict:
    """Params from `hift.pt` (torch pickle) or a safetensors copy of its state_dict."""
    return from_source(checkpoint_source(path), config, dtype)


def to_state_dict(params: Mapping, config: HiFTConfig = HiFTConfig(),
                  weight_norm: str = "parametrizations") -> dict[str, np.ndarray]:
    """Our params back to torch names. `weight_norm`: 'parametrizations' (original0/1, like hift.pt),
    'old' (weight_g/weight_v) or 'none' (plain folded weights). Folding the result gives params back."""
    wn = {r.source[:-len(".weight")] for r in rules(config)
          if r.layout == "conv1d" and not r.source.startswith("source_downs.")}
    return with_weight_norm(export(params, rules(config)), wn, weight_norm)
