"""Key maps for the flow model's input embedding and token encoder in `flow.pt` (architecture.md §3.4.2).

Source names are the released `flow.pt` names, prefixes included (`input_embedding.`, `encoder.`);
target paths mirror them (`input_embedding/...`, `encoder/...`), so the flow converter can concatenate
`EMBEDDING_RULES + ENCODER_RULES` with its own rules over one params tree
`{"input_embedding": ..., "encoder": ..., ...}`. Conformer layers are stacked on a leading layer axis
(`encoder/encoders/self_attn/linear_q/kernel` [6, 512, 512]).

A module's state_dict on its own (as in the fixtures: `embedding.weight`, `encoders.0....`) converts
through `embedding_from_state_dict` / `encoder_from_state_dict` with `prefix=""`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config import ConfigError
from editx_jax.convert.keymap import ConversionError, DictSource, Rule, convert, export
from editx_jax.config.decoder import DualCodebookConfig, UpsampleEncoderConfig
from editx_jax.decoder.embedding import DualCodebookEmbedding
from editx_jax.decoder.upsample_encoder import abstract_params

EMBEDDING_PREFIX = "input_embedding."
ENCODER_PREFIX = "encoder."

EMBEDDING_RULES: list[Rule] = [
    Rule("input_embedding.embedding.weight", "input_embedding/embedding/embedding"),
]


def _layer_rules(src: str, dst: str) -> list[Rule]:
    """One conformer layer stack: `{src}.{layer}.*` -> `{dst}/*` stacked on the layer axis."""
    rules = []
    for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
        rules.append(Rule(f"{src}.{{layer}}.self_attn.{name}.weight", f"{dst}/self_attn/{name}/kernel", "linear",
                          stack="layer"))
        rules.append(Rule(f"{src}.{{layer}}.self_attn.{name}.bias", f"{dst}/self_attn/{name}/bias", stack="layer"))
    rules.append(Rule(f"{src}.{{layer}}.self_attn.linear_pos.weight", f"{dst}/self_attn/linear_pos/kernel",
                      "linear", stack="layer"))
    for name in ("pos_bias_u", "pos_bias_v"):
        rules.append(Rule(f"{src}.{{layer}}.self_attn.{name}", f"{dst}/self_attn/{name}", stack="layer"))
    for name in ("w_1", "w_2"):
        rules.append(Rule(f"{src}.{{layer}}.feed_forward.{name}.weight", f"{dst}/feed_forward/{name}/kernel",
                          "linear", stack="layer"))
        rules.append(Rule(f"{src}.{{layer}}.feed_forward.{name}.bias", f"{dst}/feed_forward/{name}/bias",
                          stack="layer"))
    for name in ("norm_mha", "norm_ff"):
        rules.append(Rule(f"{src}.{{layer}}.{name}.weight", f"{dst}/{name}/scale", stack="layer"))
        rules.append(Rule(f"{src}.{{layer}}.{name}.bias", f"{dst}/{name}/bias", stack="layer"))
    return rules


def _encoder_rules() -> list[Rule]:
    rules = []
    for embed in ("embed", "up_embed"):  # LinearNoSubsampling: out.0 Linear, out.1 LayerNorm
        rules += [Rule(f"encoder.{embed}.out.0.weight", f"encoder/{embed}/linear/kernel", "linear"),
                  Rule(f"encoder.{embed}.out.0.bias", f"encoder/{embed}/linear/bias"),
                  Rule(f"encoder.{embed}.out.1.weight", f"encoder/{embed}/norm/scale"),
                  Rule(f"encoder.{embed}.out.1.bias", f"encoder/{embed}/norm/bias")]
    for conv in ("pre_lookahead_layer.conv1", "pre_lookahead_layer.conv2", "up_layer.conv"):
        path = conv.replace(".", "/")
        rules += [Rule(f"encoder.{conv}.weight", f"encoder/{path}/kernel", "conv1d"),
                  Rule(f"encoder.{conv}.bias", f"encoder/{path}/bias")]
    rules += _layer_rules("encoder.encoders", "encoder/encoders")
    rules += _layer_rules("encoder.up_encoders", "encoder/up_encoders")
    rules += [Rule("encoder.after_norm.weight", "encoder/after_norm/scale"),
              Rule("encoder.after_norm.bias", "encoder/after_norm/bias")]
    return rules


ENCODER_RULES: list[Rule] = _encoder_rules()


# ---------------------------------------------------------------------------------------- abstract trees


def embedding_abstract(config: DualCodebookConfig) -> dict:
    """{"input_embedding": params of DualCodebookEmbedding} as ShapeDtypeStructs."""
    pairs = jnp.zeros((1, 1, 2), jnp.int32)
    tree = jax.eval_shape(lambda: DualCodebookEmbedding(config).init(jax.random.PRNGKey(0), pairs)["params"])
    return {"input_embedding": tree}


def encoder_abstract(config: UpsampleEncoderConfig) -> dict:
    """{"encoder": params of UpsampleConformerEncoderV2} as ShapeDtypeStructs."""
    return {"encoder": abstract_params(config)}


# ---------------------------------------------------------------------------------------- convert / export


def _numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor; torch itself is never imported here
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, np.float32)


def _with_prefix(state_dict: Mapping, prefix: str) -> dict[str, np.ndarray]:
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"expected a state_dict mapping of name -> tensor, got {type(state_dict).__name__}")
    return {prefix + k: _numpy(v) for k, v in state_dict.items()}


def embedding_from_state_dict(state_dict: Mapping, config: DualCodebookConfig = DualCodebookConfig(),
                              prefix: str = EMBEDDING_PREFIX) -> dict:
    """DualCodebookEmbedding params; `prefix` is prepended to every name (the default suits the
    module's own state_dict, `embedding.weight`; pass "" for names already in flow.pt form)."""
    src = _with_prefix(state_dict, prefix)
    return convert(DictSource(src), EMBEDDING_RULES, embedding_abstract(config))["input_embedding"]


def encoder_from_state_dict(state_dict: Mapping, config: UpsampleEncoderConfig = UpsampleEncoderConfig(),
                            prefix: str = ENCODER_PREFIX) -> dict:
    """UpsampleConformerEncoderV2 params; `prefix` is prepended to every name (the default for a
    module's own state_dict, `encoders.0....`; pass "" for names already in flow.pt form)."""
    src = _with_prefix(state_dict, prefix)
    return convert(DictSource(src), ENCODER_RULES, encoder_abstract(config))["encoder"]


def export_embedding(params: Mapping, prefix: str = EMBEDDING_PREFIX) -> dict[str, np.ndarray]:
    """The inverse of `embedding_from_state_dict`: names without `prefix`, torch layouts."""
    return {k[len(prefix):]: v for k, v in export({"input_embedding": params}, EMBEDDING_RULES)}


def export_encoder(params: Mapping, prefix: str = ENCODER_PREFIX) -> dict[str, np.ndarray]:
    """The inverse of `encoder_from_state_dict`: names without `prefix`, torch layouts."""
    return {k[len(prefix):]: v for k, v in export({"encoder": params}, ENCODER_RULES)}


# ---------------------------------------------------------------------------------------- config from args


def dual_codebook_config_from_reference(cfg: dict) -> DualCodebookConfig:
    """From the reference constructor args `{vocab_size, input_size}` (fixture manifests, yaml)."""
    unknown = set(cfg) - {"vocab_size", "input_size"}
    if unknown:
        raise ConfigError(f"dual_codebook: unknown key(s) {sorted(unknown)}")
    return DualCodebookConfig(**{k: int(v) for k, v in cfg.items()})


# The reference constructor args that only choose the (single) implemented variant, and the
# dropout rates, which are identity at inference.
ENCODER_FIXED_ARGS = {"input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
                      "selfattention_layer_type": "rel_selfattn", "normalize_before": True}
ENCODER_IGNORED_ARGS = ("dropout_rate", "positional_dropout_rate", "attention_dropout_rate")


def upsample_encoder_config_from_reference(cfg: dict, **overrides) -> UpsampleEncoderConfig:
    """From `UpsampleConformerEncoderV2(**kwargs)` args (the yaml `encoder:` block, fixture configs)."""
    kwargs = {}
    names = {f.name for f in dataclasses.fields(UpsampleEncoderConfig)}
    for key, value in cfg.items():
        if key in ENCODER_FIXED_ARGS:
            if value != ENCODER_FIXED_ARGS[key]:
                raise ConfigError(f"upsample_encoder.{key}: only {ENCODER_FIXED_ARGS[key]!r} is implemented, "
                                  f"got {value!r}")
        elif key in ENCODER_IGNORED_ARGS:
            continue
        elif key in names:
            kwargs[key] = value
        else:
            raise ConfigError(f"upsample_encoder: unknown reference key {key!r}")
    kwargs.update(overrides)
    return UpsampleEncoderConfig(**kwargs)


# ---------------------------------------------------------------------------------------- config from shapes

_LAYER = re.compile(r"^encoder\.(encoders|up_encoders)\.(\d+)\.")


def encoder_config_from_state_dict(state_dict: Mapping, prefix: str = "", **overrides) -> UpsampleEncoderConfig:
    """Read the encoder's sizes from its tensor shapes (names in flow.pt form after `prefix` is added):
    width from `embed.out.0.weight`, heads from `pos_bias_u`, FFN from `w_1`, depths from the layer
    indices, look-ahead from `conv1`'s kernel, stride from `up_layer.conv`'s kernel (k = 2*stride + 1)."""
    shapes = {prefix + k: tuple(np.shape(v)) for k, v in state_dict.items()}

    def shape(name):
        if name not in shapes:
            raise ConversionError(f"checkpoint has no tensor {name!r}; is this a flow.pt encoder?")
        return shapes[name]

    depth = {"encoders": 0, "up_encoders": 0}
    for name in shapes:
        if m := _LAYER.match(name):
            depth[m[1]] = max(depth[m[1]], int(m[2]) + 1)
    out_size, in_size = shape("encoder.embed.out.0.weight")
    kernel = shape("encoder.up_layer.conv.weight")[2]
    if kernel % 2 == 0:
        raise ConversionError(f"encoder.up_layer.conv.weight has an even kernel {kernel}; expected 2*stride+1")
    kwargs = dict(input_size=in_size, output_size=out_size,
                  attention_heads=shape("encoder.encoders.0.self_attn.pos_bias_u")[0],
                  linear_units=shape("encoder.encoders.0.feed_forward.w_1.weight")[0],
                  num_blocks=depth["encoders"], num_up_blocks=depth["up_encoders"],
                  pre_lookahead_len=shape("encoder.pre_lookahead_layer.conv1.weight")[2] - 1,
                  up_stride=(kernel - 1) // 2, up_scale_factor=(kernel - 1) // 2,
                  key_bias="encoder.encoders.0.self_attn.linear_k.bias" in shapes)
    kwargs.update(overrides)
    try:
        return UpsampleEncoderConfig(**kwargs)
    except ConfigError as e:
        raise ConversionError(f"encoder tensors give an invalid config: {e}") from None
