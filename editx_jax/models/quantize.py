"""int8 weight-only quantization of the Step1 LLM (config `llm.quantize: int8`).

Every projection kernel (and, with `llm.quantize_embeddings`, the embedding table and lm_head) is
stored as int8 with a float32 scale per output channel, symmetric: `w ~ q * s`, `s = max|w| / 127`
over the contracted dims, `q = round(w / s)`. A scale keeps its kernel's rank (1 on the contracted
dims: q_proj [L, E, H, D] -> kernel_scale [L, 1, H, D]; embedding [V, E] -> embedding_scale [V, 1],
one per token row), so it shards by its output channel's logical axis like the kernel does.
Norm scales stay in param_dtype. `layers/linear.py` applies the scales after the int8 matmul, one
layer at a time inside the scan; training refuses quantized weights (they have no gradients).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from editx_jax.config import QUANTIZE, LLMConfig
from editx_jax.models.llm import abstract_params

QMAX = 127


def check_quantize(name: str | None) -> str:
    """A --quantize value (None = "none"), or ValueError naming the ones supported."""
    name = name or "none"
    if name not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {', '.join(q for q in QUANTIZE if q != 'none')}, got {name!r}")
    return name


def quantize_array(w, reduce_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scale with 1 on `reduce_axes`) with |w - q * scale| <= scale / 2."""
    w = np.asarray(w, np.float32)
    peak = np.max(np.abs(w), axis=reduce_axes, keepdims=True)
    scale = np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8), scale


def dequantize_array(q, scale, dtype=np.float32) -> np.ndarray:
    return (np.asarray(q, np.float32) * np.asarray(scale, np.float32)).astype(dtype)


def quantized_config(cfg: LLMConfig, quantize: str = "int8", embeddings: bool = True) -> LLMConfig:
    return dataclasses.replace(cfg, quantize=check_quantize(quantize), quantize_embeddings=embeddings)


def _pairs(qcfg: LLMConfig):
    """(parent path, leaf name, reduce axes per slice, stacked) of every quantized leaf."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(qcfg))[0]
    shapes = {tuple(k.key for k in path): leaf.shape for path, leaf in flat}
    for path, shape in shapes.items():
        if path[-1].endswith("_scale"):
            parent, name = path[:-1], path[-1][:-len("_scale")]
            stacked = parent[0] == "layers"
            axes = tuple(i - stacked for i, n in enumerate(shape) if n == 1 and i >= stacked)
            yield parent, name, axes, stacked


def _node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def quantize_params(params: dict, cfg: LLMConfig, quantize: str = "int8",
                    embeddings: bool = True) -> tuple[dict, LLMConfig]:
    """(params, config) quantized from a float params tree, IN PLACE: each float leaf is replaced
    by its int8 leaf and scale as it is done (layer by layer for the stacked kernels), so the float
    tree and the int8 tree never both exist whole. Leaves come back as numpy arrays."""
    qcfg = quantized_config(cfg, quantize, embeddings)
    if qcfg.quantize == "none":
        return params, qcfg
    for parent, name, axes, stacked in _pairs(qcfg):
        node = _node(params, parent)
        w = node.pop(name)
        if stacked:
            q = np.empty(w.shape, np.int8)
            scales = []
            for layer in range(w.shape[0]):
                q[layer], s = quantize_array(w[layer], axes)
                scales.append(s)
            scale = np.stack(scales)
        else:
            q, scale = quantize_array(w, axes)
        del w
        node[name], node[f"{name}_scale"] = q, scale
    return params, qcfg


def dequantize_params(params: dict, qcfg: LLMConfig) -> tuple[dict, LLMConfig]:
    """(float params in qcfg.param_dtype as numpy, the float config): for export and comparison."""
    cfg = dataclasses.replace(qcfg, quantize="none")
    if qcfg.quantize == "none":
        return params, cfg
    dtype = np.dtype(qcfg.param_dtype) if qcfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
    out = jax.tree_util.tree_map(lambda x: x, params)  # new dicts, same leaves
    for parent, name, _, _ in _pairs(qcfg):
        node = _node(out, parent)
        node[name] = dequantize_array(node[name], node.pop(f"{name}_scale"), dtype)
    return out, cfg
