"""The Step1 LLM converter: released `model*.safetensors` names <-> our params tree (architecture.md §1.5).

    convert_llm(SRC, DST, dtype="bfloat16")   released folder (config.json + safetensors) -> checkpoint
    export_llm(CKPT or params, cfg, DST)      checkpoint -> model-00001.safetensors + index + config.json

Both stream one tensor at a time; torch -> ours -> torch is bit-exact (the layouts only transpose and
reshape, and a dtype cast happens only when asked for).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Mapping

import jax
import numpy as np
from tqdm import tqdm

from editx_jax import checkpoint
from editx_jax.config import DTYPES, ConfigError, LLMConfig
from editx_jax.convert import keymap
from editx_jax.convert.keymap import ConversionError, Rule
from editx_jax.convert.sources import (DEFAULT_IGNORED, FLOAT_DTYPES, INDEX_NAME, SafetensorsSource,
                                       numpy_dtype, write_safetensors)
from editx_jax.models.llm import abstract_params
from editx_jax.models.quantize import check_quantize, dequantize_params, quantize_params
from editx_jax.tree import flatten

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
IGNORED_SUFFIXES = DEFAULT_IGNORED

EXPORT_FILE = "model-00001.safetensors"


def llm_config_from_hf(hf: dict, **overrides) -> LLMConfig:
    """Our config from the released `config.json` (Step1Config key names)."""
    if hf.get("tie_word_embeddings"):
        raise ConfigError("config.json: tie_word_embeddings=true is not a Step1 checkpoint we know "
                          "(the released model stores a separate lm_head)")
    try:
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
            num_groups=hf["num_attention_groups"], num_layers=hf["num_hidden_layers"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=hf.get("max_seq_len", 32768),
            bos_id=hf.get("bos_token_id", 1), pad_id=hf.get("pad_token_id", 0),
            eos_id=hf.get("eos_token_id", 3))
    except KeyError as e:
        raise ConfigError(f"config.json: missing key {e.args[0]!r}") from None
    fields.update(overrides)
    return LLMConfig(**fields)


def llm_config_to_hf(cfg: LLMConfig) -> dict:
    """The released `config.json` layout for this config (for export back to PyTorch)."""
    return {
        "architectures": ["Step1ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_step1.Step1Config",
                     "AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM"},
        "model_type": "step1", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
        "num_attention_groups": cfg.num_groups, "num_hidden_layers": cfg.num_layers,
        "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps, "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    }


def read_hf_config(folder: pathlib.Path, **overrides) -> LLMConfig:
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json (expected the released Step-Audio-EditX folder)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return llm_config_from_hf(hf, **overrides)


def to_numpy_dtype(name):
    """numpy dtype for a config dtype name (bfloat16 through ml_dtypes, which jax ships)."""
    return numpy_dtype(name)


def check_source_dtypes(source, allowed=FLOAT_DTYPES) -> None:
    for name in source.names():
        dt = source.dtype(name) if hasattr(source, "dtype") else None
        if dt is not None and str(dt) not in allowed:
            raise ConversionError(f"tensor {name!r} has dtype {dt}; expected one of {', '.join(allowed)}")


# ------------------------------------------------------------------ name/shape plans (no allocation)


def source_shapes(rules: list[Rule], abstract: Mapping) -> dict[str, tuple[int, ...]]:
    """Every source tensor name the rules expect for the params tree `abstract`, with its torch shape."""
    out = {}
    for path, spec in flatten(abstract).items():
        rule = keymap._rule_for_target(rules, path)
        shape = tuple(spec.shape)
        if rule.stack:
            for i in range(shape[0]):
                out[rule.source.format(**{rule.stack: i})] = keymap.expected_source_shape(rule, shape[1:])
        else:
            out[rule.source] = keymap.expected_source_shape(rule, shape)
    return out


def check_plan(shapes: Mapping[str, tuple[int, ...]], rules: list[Rule], abstract: Mapping) -> None:
    """Check source names/shapes against the params tree before reading any data, so a bad
    checkpoint fails in a second rather than after minutes of conversion. Same errors as
    `keymap.convert`: unknown, misshapen, duplicate or missing tensors, each named."""
    expected = source_shapes(rules, abstract)
    match = keymap._Matcher(rules)
    unknown = sorted(n for n in shapes if n not in expected and match(n)[0] is None)
    if unknown:
        raise ConversionError(f"unexpected tensor(s) in checkpoint: {', '.join(unknown[:10])}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    for name, shape in shapes.items():
        if name not in expected:  # matches a rule but indexes past the model (e.g. layer 40 of 32)
            rule, m = match(name)
            raise ConversionError(f"tensor {name!r} has no place in the model ({rule.stack} "
                                  f"{m.group(rule.stack)} is out of range)")
        if tuple(shape) != expected[name]:
            raise ConversionError(f"tensor {name!r} has shape {list(shape)}; expected {list(expected[name])}")
    missing = [f"{n} (shape {list(s)})" for n, s in expected.items() if n not in shapes]
    if missing:
        raise ConversionError(f"checkpoint is missing tensor(s): {', '.join(missing[:10])}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))


# ------------------------------------------------------------------ convert


def _tqdm(enabled: bool, desc: str):
    if not enabled:
        return None
    return lambda it: tqdm(it, desc=desc, unit="tensor")


def convert_llm_params(source, cfg: LLMConfig, progress: bool = False) -> dict:
    """Params (nested dict of numpy arrays in cfg.param_dtype) from a tensor source."""
    abstract = abstract_params(cfg)
    check_source_dtypes(source)
    check_plan({n: tuple(source.shape(n)) for n in source.names()}, RULES, abstract)
    return keymap.convert(source, RULES, abstract, dtype=numpy_dtype(cfg.param_dtype),
                          progress=_tqdm(progress, "convert llm"))


def convert_llm(src_folder, dst_folder, dtype: str = "bfloat16", progress: bool = True, quantize: str | None = None,
                float_embeddings: bool = False) -> dict:
    """Convert the released LLM folder (`config.json`, `model*.safetensors`, optional index) into a
    checkpoint folder at `dst_folder`. Returns a summary (tensors, ignored buffers, bytes, seconds).

    Peak memory is about the converted params plus a few source tensors: target leaves are
    preallocated numpy arrays filled one source tensor at a time, and Orbax writes them from numpy.
    quantize="int8": int8 weights with per-output-channel scales (models/quantize.py), quantized leaf
    by leaf in place; float_embeddings keeps the embedding table and lm_head in `dtype`.
    """
    quantize = check_quantize(quantize)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    start = time.time()
    src_folder = pathlib.Path(src_folder)
    cfg = read_hf_config(src_folder, param_dtype=dtype, dtype=dtype)
    with SafetensorsSource(src_folder) as source:
        params = convert_llm_params(source, cfg, progress)
        n_tensors, ignored = len(source.names()), list(source.ignored)
        src_dtypes = sorted({source.dtype(n) for n in source.names()})
    params, cfg = quantize_params(params, cfg, quantize, embeddings=not float_embeddings)
    nbytes = sum(a.nbytes for a in flatten(params).values())
    meta = {"converted_from": str(src_folder.absolute()), "source_format": "safetensors",
            "source_dtypes": src_dtypes, "source_tensors": n_tensors, "ignored_buffers": ignored,
            "num_params": cfg.num_params}
    checkpoint.save_llm(dst_folder, params, cfg, meta)
    return {"tensors": n_tensors, "ignored": ignored, "dtype": dtype, "quantize": quantize, "bytes": nbytes,
            "num_params": cfg.num_params, "seconds": round(time.time() - start, 2),
            "dst": str(pathlib.Path(dst_folder).absolute())}


# ------------------------------------------------------------------ export


def export_llm(params_or_folder, cfg: LLMConfig | None, dst_folder, dtype: str | None = None,
               progress: bool = False) -> dict:
    """Write `model-00001.safetensors` + `model.safetensors.index.json` + `config.json` with the
    released names and torch layouts, loadable by the PyTorch Step1ForCausalLM.

    params_or_folder: a params tree (then `cfg` is required) or a checkpoint folder (`cfg` may be
    None: the folder's own config is used). dtype: None keeps the params' dtype (bit-exact export).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(params_or_folder, (str, pathlib.Path)):
        folder_cfg, params = checkpoint.load_llm(params_or_folder)
        cfg = cfg or folder_cfg
    else:
        if cfg is None:
            raise ValueError("export_llm: a params tree needs its LLMConfig")
        params = params_or_folder
    params, cfg = dequantize_params(params, cfg)  # the released format has float weights only
    # One host copy of the params (a no-op for numpy leaves); every exported tensor is a view of it
    # until the writer makes it contiguous, one tensor at a time.
    params = jax.tree_util.tree_map(np.asarray, params)
    out_dtype = numpy_dtype(dtype) if dtype else None
    if out_dtype is None:
        dtypes = {str(a.dtype) for a in flatten(params).values()}
        hf_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    else:
        hf_dtype = dtype

    def tensors():
        it = keymap.export(params, RULES, dtype=out_dtype)
        return _tqdm(progress, "export llm")(it) if progress else it

    dst = pathlib.Path(dst_folder)
    dst.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in keymap.export(params, RULES)]  # views only: no data is copied
    total = write_safetensors(dst / EXPORT_FILE, tensors, metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {n: EXPORT_FILE for n in sorted(names)}}
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    hf = llm_config_to_hf(cfg)
    hf["torch_dtype"] = hf_dtype
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return {"tensors": len(names), "bytes": total, "dtype": hf_dtype, "dst": str(dst.absolute())}
