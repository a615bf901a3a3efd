"""Converter for the released `flow.pt` (CausalMaskedDiffWithXvec; architecture.md §3.4.2, §3.5, §4 item 2).

`flow.pt` is a plain torch state_dict of 605 tensors: the dual-codebook embedding, the upsampling
conformer encoder, `encoder_proj`, `spk_embed_affine_layer` and the DiT under `decoder.estimator.`.
The key map is the union of the embedding and encoder rules (`editx_jax.convert.flow_encoder`) with
the DiT, projection and speaker-affine rules below. DiT blocks are stacked on a leading axis
(`nn.scan`), so `decoder.estimator.blocks.{block}.*` fill one slot each.

torch is imported only inside `load_torch_state_dict`; the rest works on any name -> array mapping.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np

from editx_jax.convert.keymap import ConversionError, Rule, convert, export

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
    from editx_jax.convert.flow_encoder import EMBEDDING_RULES, ENCODER_RULES
    # their source names and target paths already carry the flow.pt prefixes
    return EMBEDDING_RULES + ENCODER_RULES + HEAD_RULES + prefixed(DIT_RULES, "decoder.estimator.", "estimator")


# ---------------------------------------------------------------------------------------- sources


class TorchStateDictSource:
    """A `keymap.TensorSource` over a torch state_dict (tensors or arrays), one tensor at a time.

    Tensors are converted to float32 numpy only when read, so with a `torch.load(mmap=True)` dict
    the whole file is never resident at once.
    """

    def __init__(self, state_dict: Mapping):
        if not isinstance(state_dict, Mapping):
            raise ConversionError(f"expected a state_dict (a mapping of name -> tensor), got "
                                  f"{type(state_dict).__name__}")
        bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not hasattr(v, "shape")]
        if bad:
            raise ConversionError(f"state_dict entry {bad[0]!r} is not a named tensor")
        self._t = state_dict

    def names(self):
        return list(self._t)

    def shape(self, name):
        return tuple(int(d) for d in self._t[name].shape)

    def get(self, name):
        v = self._t[name]
        if hasattr(v, "detach"):  # a torch tensor; torch is already imported by whoever made it
            v = v.detach().to("cpu").float().numpy()
        return np.asarray(v, np.float32)


def load_torch_state_dict(path: str | os.PathLike) -> Mapping:
    """`torch.load` a plain state_dict pickle memory-mapped on CPU, weights only (no code runs)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint file not found: {path}")
    import torch  # lazily: only converters touch torch

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # not a zip pickle, truncated, or unsafe content
        raise ConversionError(f"{path} is not a readable torch state_dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def _source(state_dict_or_path):
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict_or_path = load_torch_state_dict(state_dict_or_path)
    return TorchStateDictSource(state_dict_or_path)


# ------------------------------------------------------------------------------------- converters


def convert_dit(state_dict: Mapping, config) -> dict:
    """Params of `editx_jax.decoder.dit.DiT` from a reference `DiT` state_dict (unprefixed names)."""
    from editx_jax.decoder.dit import abstract_params
    return convert(_source(state_dict), DIT_RULES, abstract_params(config))


def convert_flow(flow_pt, config=None, dtype=None) -> dict:
    """Params of `editx_jax.decoder.flow.FlowModel` from `flow.pt` (a path) or its state_dict.

    `config` is a `FlowConfig` (default: the released sizes). Every tensor is used exactly once and
    every param filled exactly once, else ConversionError names the tensor and the expected shape.
    """
    from editx_jax.decoder.flow import FlowConfig, abstract_params
    config = config or FlowConfig()
    return convert(_source(flow_pt), flow_rules(), abstract_params(config), dtype=dtype)


def export_flow(params: Mapping, dtype=None):
    """(name, array) pairs in `flow.pt` names and torch layouts; the inverse of `convert_flow`."""
    return export(params, flow_rules(), dtype=dtype)


def expected_flow_shapes(config=None) -> dict[str, tuple[int, ...]]:
    """`flow.pt` tensor name -> torch shape implied by our params at `config` (default: released)."""
    import jax
    from editx_jax.decoder.flow import FlowConfig, abstract_params
    abstract = abstract_params(config or FlowConfig())
    zeros = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape), abstract)
    return {name: tuple(a.shape) for name, a in export(zeros, flow_rules())}
