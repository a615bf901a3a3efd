"""The Step1 LLM key map: released `model*.safetensors` names <-> our params tree (architecture.md §1.5)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from editx_jax.config import ConfigError, LLMConfig
from editx_jax.convert.keymap import ConversionError, Rule

LAYER = "model.layers.{layer}."

RULES = [
    Rule("model.embed_tokens.weight", "embed/embedding"),
    Rule(LAYER + "input_layernorm.weight", "layers/input_norm/scale", stack="layer"),
    Rule(LAYER + "self_attn.q_proj.weight", "layers/attn/q_proj/kernel", "linear", stack="layer"),
    Rule(LAYER + "self_attn.k_proj.weight", "layers/attn/k_proj/kernel", "linear", stack="layer"),
    Rule(LAYER + "self_attn.v_proj.weight", "layers/attn/v_proj/kernel", "linear", stack="layer"),
    Rule(LAYER + "self_attn.o_proj.weight", "layers/attn/o_proj/kernel", "linear", stack="layer", in_dims=2),
    Rule(LAYER + "post_attention_layernorm.weight", "layers/post_attention_norm/scale", stack="layer"),
    Rule(LAYER + "mlp.gate_proj.weight", "layers/mlp/gate_proj/kernel", "linear", stack="layer"),
    Rule(LAYER + "mlp.up_proj.weight", "layers/mlp/up_proj/kernel", "linear", stack="layer"),
    Rule(LAYER + "mlp.down_proj.weight", "layers/mlp/down_proj/kernel", "linear", stack="layer"),
    Rule("model.norm.weight", "final_norm/scale"),
    Rule("lm_head.weight", "lm_head/kernel", "linear"),
]

# Buffers some Llama-style exports carry; they hold no weights (architecture.md §1.5).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids")


def read_hf_config(folder: pathlib.Path) -> LLMConfig:
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json (expected the released Step-Audio-EditX folder)")
    return LLMConfig.from_hf(json.loads(path.read_text()))


def to_numpy_dtype(name):
    """numpy dtype for a config dtype name (bfloat16 through ml_dtypes, which jax ships)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(name)


def check_source_dtypes(source, allowed=("float32", "bfloat16", "float16")) -> None:
    for name in source.names():
        dt = source.dtype(name) if hasattr(source, "dtype") else None
        if dt is not None and str(dt) not in allowed:
            raise ConversionError(f"tensor {name!r} has dtype {dt}; expected one of {', '.join(allowed)}")
