"""Converters for the S3 tokenizer v1 (vq06): a PyTorch state_dict in the PyPI `s3tokenizer` names, or
the released `speech_tokenizer_v1.onnx` (architecture.md §2.2, §4 item 4).

Both go through one key map (`RULES`, source names = the PyPI `s3tokenizer` state_dict). The ONNX file
is first read into those names: its named initializers are recognised by name, and the anonymous ones
(`onnx::MatMul_*`, `onnx::Add_*`, ...) through the graph node that consumes them, e.g. the initializer
input of `/blocks.3/attn/query/MatMul` is block 3's query weight, stored (in, out).
"""

from __future__ import annotations

import os
import re

import numpy as np

from editx_jax.config import ConfigError
from editx_jax.config.audio import S3TokenizerConfig
from editx_jax.convert.keymap import ConversionError, DictSource, Rule, convert
from editx_jax.tokenizer.s3tokenizer import abstract_params

_LINEARS = {"attn.query": "attn/query", "attn.key": "attn/key", "attn.value": "attn/value",
            "attn.out": "attn/out", "mlp.0": "fc1", "mlp.2": "fc2"}


def _rules() -> list[Rule]:
    rules = [
        Rule("encoder.conv1.weight", "encoder/conv1/kernel", "conv1d"),
        Rule("encoder.conv1.bias", "encoder/conv1/bias"),
        Rule("encoder.conv2.weight", "encoder/conv2/kernel", "conv1d"),
        Rule("encoder.conv2.bias", "encoder/conv2/bias"),
        Rule("encoder.positional_embedding", "encoder/positional_embedding"),
        Rule("quantizer._codebook.embed", "quantizer/codebook"),
    ]
    for src, dst in _LINEARS.items():
        rules.append(Rule(f"encoder.blocks.{{layer}}.{src}.weight", f"encoder/blocks/{dst}/kernel", "linear",
                          stack="layer"))
        if src != "attn.key":  # the key projection has no bias
            rules.append(Rule(f"encoder.blocks.{{layer}}.{src}.bias", f"encoder/blocks/{dst}/bias",
                              stack="layer"))
    for ln in ("attn_ln", "mlp_ln"):
        rules.append(Rule(f"encoder.blocks.{{layer}}.{ln}.weight", f"encoder/blocks/{ln}/scale", stack="layer"))
        rules.append(Rule(f"encoder.blocks.{{layer}}.{ln}.bias", f"encoder/blocks/{ln}/bias", stack="layer"))
    return rules


RULES: list[Rule] = _rules()


def s3tokenizer_config_from_reference(cfg: dict, **overrides) -> S3TokenizerConfig:
    """From the PyPI `s3tokenizer` ModelConfig fields (+ its model name), as in fixture manifests."""
    name = cfg.get("name", "speech_tokenizer_v1_25hz")
    if name not in ("speech_tokenizer_v1_25hz", "speech_tokenizer_v1"):
        raise ConfigError(f"s3tokenizer.name: only the v1 models are supported, got {name!r}")
    return S3TokenizerConfig(n_mels=int(cfg.get("n_mels", 128)), n_audio_ctx=int(cfg.get("n_audio_ctx", 1500)),
               n_audio_state=int(cfg.get("n_audio_state", 1280)),
               n_audio_head=int(cfg.get("n_audio_head", 20)),
               n_audio_layer=int(cfg.get("n_audio_layer", 6)),
               codebook_size=int(cfg.get("n_codebook_size", 4096)),
               conv1_stride=2 if name == "speech_tokenizer_v1_25hz" else 1, **overrides)


def from_state_dict(state_dict, config: S3TokenizerConfig) -> dict:
    """Params from a PyPI `s3tokenizer` S3Tokenizer state_dict (torch tensors or numpy arrays)."""
    tensors = {k: _to_numpy(v) for k, v in state_dict.items()}
    return convert(DictSource(tensors), RULES, abstract_params(config))


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor; torch itself is never imported here
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, np.float32)


# ---------------------------------------------------------------------------------------- ONNX

# Named initializers (the released file names conv, position and LayerNorm tensors
# `encoders.conv1.weight`, `encoders.blocks.0.attn_ln.weight`, ...): whatever module prefix, the tail says.
_NAMED = [
    (re.compile(r"(?:^|\.)(conv[12])\.(weight|bias)$"), lambda m: f"encoder.{m[1]}.{m[2]}"),
    (re.compile(r"(?:^|\.)positional_embedding$"), lambda m: "encoder.positional_embedding"),
    (re.compile(r"(?:^|\.)blocks\.(\d+)\.(attn_ln|mlp_ln)\.(weight|bias)$"),
     lambda m: f"encoder.blocks.{m[1]}.{m[2]}.{m[3]}"),
    (re.compile(r"(?:^|\.)blocks\.(\d+)\.(attn\.(?:query|key|value|out)|mlp\.[02])\.bias$"),
     lambda m: f"encoder.blocks.{m[1]}.{m[2]}.bias"),
    (re.compile(r"(?:^|\.)_codebook\.embed$"), lambda m: "quantizer._codebook.embed"),  # (K, D) if kept named
]
# Anonymous initializers, by the node that consumes them: (node-name pattern, op, input slot) -> name.
_BLOCK = r"(?:^|/)blocks\.(\d+)/"
_BY_NODE = [
    (re.compile(_BLOCK + r"attn/(query|key|value|out)/MatMul$"), "MatMul",
     lambda m: (f"encoder.blocks.{m[1]}.attn.{m[2]}.weight", True)),
    (re.compile(_BLOCK + r"attn/(query|value|out)/Add$"), "Add",
     lambda m: (f"encoder.blocks.{m[1]}.attn.{m[2]}.bias", False)),
    (re.compile(_BLOCK + r"mlp/mlp\.([02])/MatMul$"), "MatMul",
     lambda m: (f"encoder.blocks.{m[1]}.mlp.{m[2]}.weight", True)),
    (re.compile(_BLOCK + r"mlp/mlp\.([02])/Add$"), "Add",
     lambda m: (f"encoder.blocks.{m[1]}.mlp.{m[2]}.bias", False)),
]
_LAYERNORM = re.compile(_BLOCK + r"(attn_ln|mlp_ln)/LayerNormalization$")
_CONV = re.compile(r"(?:^|/)(conv[12])/Conv$")


def onnx_to_state_dict(path: str | os.PathLike, config: S3TokenizerConfig) -> dict[str, np.ndarray]:
    """Read `speech_tokenizer_v1.onnx` into the PyPI `s3tokenizer` state_dict names and layouts.

    Every float initializer with more than one element must be recognised, else ConversionError names
    it (scalars and integer shape constants of the graph are not weights).
    """
    try:
        import onnx  # noqa: PLC0415  (onnx is optional, the convert extra)
        from onnx import numpy_helper  # noqa: PLC0415  (as above)
    except ImportError as e:  # pragma: no cover - onnx is in the convert extra
        raise ConversionError("reading an ONNX tokenizer needs the `onnx` package") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(path)
    except Exception as e:  # onnx raises DecodeError and friends for a non-ONNX file
        raise ConversionError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    # the exporter deduplicates equal initializers behind Identity nodes: follow them
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}

    def resolve(name):
        return alias.get(name, name)

    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def put(target, init_name, transpose=False):
        if target in out:
            raise ConversionError(f"ONNX tensor {init_name!r} gives {target} a second time")
        arr = numpy_helper.to_array(inits[init_name]).astype(np.float32)
        out[target] = np.ascontiguousarray(arr.T) if transpose else arr
        used.add(init_name)

    for name in inits:
        for pattern, target in _NAMED:
            if m := pattern.search(name):
                put(target(m), name)
                break
    named = set(used)  # recognised by name; the nodes that consume them add nothing
    codebook_candidates = []
    for node in graph.node:
        params = [(slot, resolve(i)) for slot, i in enumerate(node.input) if resolve(i) in inits]
        params = [(slot, i) for slot, i in params if i not in named]
        if not params or node.op_type == "Identity":
            continue
        if (m := _CONV.search(node.name)) and node.op_type == "Conv":
            for slot, i in params:
                put(f"encoder.{m[1]}.{'weight' if slot == 1 else 'bias'}", i)
        elif (m := _LAYERNORM.search(node.name)) and node.op_type == "LayerNormalization":
            for slot, i in params:
                put(f"encoder.blocks.{m[1]}.{m[2]}.{'weight' if slot == 1 else 'bias'}", i)
        elif node.op_type == "MatMul" and not re.search(_BLOCK, node.name):
            codebook_candidates += [i for _, i in params]  # the VQ distance x @ E^T, E stored (D, K)
        else:
            for pattern, op, target in _BY_NODE:
                if node.op_type == op and (m := pattern.search(node.name)):
                    name, transpose = target(m)
                    if len(params) != 1:
                        raise ConversionError(f"ONNX node {node.name!r} has {len(params)} weight inputs; "
                                              f"expected one for {name}")
                    # MatMul weights are stored (in, out): the state_dict wants torch's (out, in)
                    put(name, params[0][1], transpose)
                    break
    # the codebook is the (D, K) operand of the one MatMul outside the blocks (x @ E^T, §2.2)
    want = (config.n_audio_state, config.codebook_size)
    codebook_candidates = sorted(i for i in set(codebook_candidates) - used if tuple(inits[i].dims) == want)
    if "quantizer._codebook.embed" in out and not codebook_candidates:
        pass
    elif len(codebook_candidates) != 1:
        raise ConversionError(f"expected one codebook initializer of shape {list(want)} feeding a MatMul "
                              f"outside the blocks (…/_codebook/MatMul), found {len(codebook_candidates)}: "
                              f"{codebook_candidates[:5]}")
    else:
        put("quantizer._codebook.embed", codebook_candidates[0], transpose=True)
    unused = [n for n, t in inits.items() if n not in used and _is_weight(numpy_helper.to_array(t))]
    if unused:
        raise ConversionError(f"ONNX initializer(s) not recognised as tokenizer weights: {', '.join(unused[:10])}")
    return out


def _is_weight(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" and arr.size > 1


def from_onnx(path: str | os.PathLike, config: S3TokenizerConfig = S3TokenizerConfig()) -> dict:
    """Params from `speech_tokenizer_v1.onnx` (or an export with the same node naming)."""
    return convert(DictSource(onnx_to_state_dict(path, config)), RULES, abstract_params(config))
