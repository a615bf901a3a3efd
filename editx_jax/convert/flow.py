"""Converter for the released `flow.pt` (CausalMaskedDiffWithXvec; architecture.md §3.4.2, §3.5, §4 item 2).

`flow.pt` is a plain torch state_dict of 605 tensors: the dual-codebook embedding, the upsampling
conformer encoder, `encoder_proj`, `spk_embed_affine_layer` and the DiT under `decoder.estimator.`.
The key map is the union of the embedding and encoder rules (`editx_jax.convert.flow_encoder`) with
the DiT, projection and speaker-affine rules below. DiT blocks are stacked on a leading axis
(`nn.scan`), so `decoder.estimator.blocks.{block}.*` fill one slot each.

`flow.pt` is read by `editx_jax.convert.sources.TorchSource` (torch imported only there, lazily); the
converters also take the state_dict itself (torch tensors or numpy arrays).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np

from editx_jax.config import ConfigError
from editx_jax.config.decoder import DiTConfig, FlowConfig
from editx_jax.convert.flow_encoder import (EMBEDDING_RULES, ENCODER_RULES, dual_codebook_config_from_reference,
                                          upsample_encoder_config_from_reference)
from editx_jax.convert.keymap import Rule, convert, export
from editx_jax.convert.sources import TorchSource
from editx_jax.decoder import dit
from editx_jax.decoder.flow import abstract_params

# ------------------------------------------------------------------------------------------ rules


def _linear(src: str, dst: str, stack: str | None = None) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", "linear", stack=stack),
            Rule(f"{src}.bias", f"{dst}/bias", stack=stack)]


def _norm(src: str, dst: str, stack: str | None = None) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/scale", stack=stack), Rule(f"{src}.bias", f"{dst}/bias", stack=stack)]


def _conv(src: str, dst: str, stack: str | None = None) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", "conv1d", stack=stack),
            Rule(f"{src}.bias", f"{dst}/bias", stack=stack)]


def _dit_rules() -> list[Rule]:
    """The reference `DiT` state_dict names (no prefix) -> `editx_jax.decoder.dit.DiT` params."""
    b = "blocks.{block}"
    rules = [*_linear("t_embedder.mlp.0", "t_embedder/fc1"), *_linear("t_embedder.mlp.2", "t_embedder/fc2"),
             *_linear("in_proj", "in_proj"),
             *_linear("final_layer.adaLN_modulation.1", "final_layer/adaln"),
             *_linear("final_layer.linear", "final_layer/linear"),
             *_linear(f"{b}.adaLN_modulation.1", "blocks/adaln", "block")]
    for proj in ("to_q", "to_k", "to_v", "proj"):
        rules += _linear(f"{b}.attn.{proj}", f"blocks/attn/{proj}", "block")
    rules += _norm(f"{b}.attn.q_norm", "blocks/attn/q_norm", "block")
    rules += _norm(f"{b}.attn.k_norm", "blocks/attn/k_norm", "block")
    # CausalConvBlock is a Sequential: 0 pad, 1 conv, 2 transpose, 3 LayerNorm, 4 transpose, 5 Mish, 6 conv
    rules += _conv(f"{b}.conv.block.1", "blocks/conv/conv1", "block")
    rules += _norm(f"{b}.conv.block.3", "blocks/conv/norm", "block")
    rules += _conv(f"{b}.conv.block.6", "blocks/conv/conv2", "block")
    rules += _linear(f"{b}.mlp.fc1", "blocks/mlp/fc1", "block")
    rules += _linear(f"{b}.mlp.fc2", "blocks/mlp/fc2", "block")
    return rules


DIT_RULES: list[Rule] = _dit_rules()

# The flow's own layers (besides embedding, encoder and DiT).
HEAD_RULES: list[Rule] = [*_linear("encoder_proj", "encoder_proj"),
                          *_linear("spk_embed_affine_layer", "spk_embed_affine_layer")]


def prefixed(rules: list[Rule], source_prefix: str = "", target_prefix: str = "") -> list[Rule]:
    """The same rules with a prefix on every source name and a parent folder on every target path."""
    return [dataclasses.replace(r, source=source_prefix + r.source,
                                target=f"{target_prefix}/{r.target}" if target_prefix else r.target)
            for r in rules]


def flow_rules() -> list[Rule]:
    """The whole `flow.pt` key map -> `editx_jax.decoder.flow.FlowModel` params."""
    # their source names and target paths already carry the flow.pt prefixes
    return EMBEDDING_RULES + ENCODER_RULES + HEAD_RULES + prefixed(DIT_RULES, "decoder.estimator.", "estimator")


# ------------------------------------------------------------------------------------- config


def dit_config_from_reference(cfg: dict, **overrides) -> DiTConfig:
    """From the reference's `DiT(**kwargs)` constructor arguments (a fixture manifest's config)."""
    known = {"in_channels", "out_channels", "hidden_size", "depth", "num_heads", "head_dim", "mlp_ratio"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"dit.{unknown[0]}: unknown DiT argument")
    return DiTConfig(**{k: (float(v) if k == "mlp_ratio" else int(v)) for k, v in cfg.items()}, **overrides)


def flow_config_from_reference(cfg: dict, **overrides) -> FlowConfig:
    """From a fixture manifest's config: the scalar args plus `input_embedding`, `encoder` and
    `decoder: {inference_cfg_rate, estimator}` blocks (the cosyvoice.yaml `flow:` structure)."""
    cfg = dict(cfg)
    kwargs = {}
    if "output_type" in cfg and cfg.pop("output_type") != "mel":
        raise ConfigError("flow.output_type: only 'mel' is implemented")
    for key in ("input_size", "output_size", "spk_embed_dim", "vocab_size"):
        if key in cfg:
            kwargs[key] = int(cfg.pop(key))
    if "input_embedding" in cfg:
        kwargs["embedding"] = dual_codebook_config_from_reference(cfg.pop("input_embedding"))
    if "encoder" in cfg:
        kwargs["encoder"] = upsample_encoder_config_from_reference(cfg.pop("encoder"))
    if "decoder" in cfg:
        decoder = dict(cfg.pop("decoder"))
        if "estimator" in decoder:
            kwargs["estimator"] = dit_config_from_reference(decoder.pop("estimator"))
        if "inference_cfg_rate" in decoder:
            kwargs["inference_cfg_rate"] = float(decoder.pop("inference_cfg_rate"))
        if decoder:
            raise ConfigError(f"flow.decoder.{sorted(decoder)[0]}: unknown key")
    if cfg:
        raise ConfigError(f"flow.{sorted(cfg)[0]}: unknown key")
    kwargs.update(overrides)
    return FlowConfig(**kwargs)


# ------------------------------------------------------------------------------------- converters


def convert_dit(state_dict: Mapping, config) -> dict:
    """Params of `editx_jax.decoder.dit.DiT` from a reference `DiT` state_dict (unprefixed names)."""
    return convert(TorchSource(state_dict), DIT_RULES, dit.abstract_params(config))


def convert_flow(flow_pt, config=None, dtype=None) -> dict:
    """Params of `editx_jax.decoder.flow.FlowModel` from `flow.pt` (a path) or its state_dict.

    `config` is a `FlowConfig` (default: the released sizes). Every tensor is used exactly once and
    every param filled exactly once, else ConversionError names the tensor and the expected shape.
    """
    config = config or FlowConfig()
    return convert(TorchSource(flow_pt), flow_rules(), abstract_params(config), dtype=dtype)


def export_flow(params: Mapping, dtype=None):
    """(name, array) pairs in `flow.pt` names and torch layouts; the inverse of `convert_flow`."""
    return export(params, flow_rules(), dtype=dtype)


def expected_flow_shapes(config=None) -> dict[str, tuple[int, ...]]:
    """`flow.pt` tensor name -> torch shape implied by our params at `config` (default: released)."""
    abstract = abstract_params(config or FlowConfig())
    zeros = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape), abstract)
    return {name: tuple(a.shape) for name, a in export(zeros, flow_rules())}
