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
from editx_jax.random_init import assemble, random_leaves
from editx_jax.tree import unflatten

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
    # max|w| as max(max w, -min w) and the rounding in one buffer: the float32 temporaries of a
    # 74752 x 3072 table are 0.9 GB each, and these are the same numbers with one of them.
    peak = np.maximum(np.max(w, axis=reduce_axes, keepdims=True), -np.min(w, axis=reduce_axes, keepdims=True))
    scale = np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)
    q = np.divide(w, scale)
    np.rint(q, out=q)
    np.clip(q, -QMAX, QMAX, out=q)
    return q.astype(np.int8), scale


def quantize_parts(parts, shape: tuple, reduce_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scale) of a leaf of `shape` given as (index, values) parts, the whole
    (index `...`) or [L]-slices (index i), each quantized over `reduce_axes` (axes of the whole
    leaf; a slice drops axis 0, which is never reduced). One slice's float copy at a time."""
    q = scale = None
    for index, w in parts:
        if index is ...:
            return quantize_array(w, reduce_axes)
        if q is None:
            q = np.empty(shape, np.int8)
            scale = np.empty(tuple(1 if i in reduce_axes else n for i, n in enumerate(shape)), np.float32)
        q[index], scale[index] = quantize_array(w, tuple(a - 1 for a in reduce_axes))
    return q, scale


def dequantize_array(q, scale, dtype=np.float32) -> np.ndarray:
    return (np.asarray(q, np.float32) * np.asarray(scale, np.float32)).astype(dtype)


def quantized_config(cfg: LLMConfig, quantize: str = "int8", embeddings: bool = True) -> LLMConfig:
    return dataclasses.replace(cfg, quantize=check_quantize(quantize), quantize_embeddings=embeddings)


def _quantized_leaves(qcfg: LLMConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Key path of every quantized float leaf -> the axes its scale reduces (those of size 1)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(qcfg))[0]
    out = {}
    for path, leaf in flat:
        keys = tuple(k.key for k in path)
        if keys[-1].endswith("_scale"):
            out[keys[:-1] + (keys[-1][:-len("_scale")],)] = tuple(i for i, n in enumerate(leaf.shape)
                                                               if n == 1 and not (keys[0] == "layers" and i == 0))
    return out


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
    for path, axes in _quantized_leaves(qcfg).items():
        node = _node(params, path[:-1])
        w = node.pop(path[-1])
        parts = ((i, w[i]) for i in range(w.shape[0])) if path[0] == "layers" else [(..., w)]
        node[path[-1]], node[f"{path[-1]}_scale"] = quantize_parts(parts, w.shape, axes)
        del w, parts
    return params, qcfg


def random_quantized_params(cfg: LLMConfig, seed: int, quantize: str = "int8", embeddings: bool = True,
                            kernel_scale: float = 1.0) -> tuple[dict, LLMConfig]:
    """(params on the device, config): the same numbers as `quantize_params(random_params(float
    abstract params, seed, kernel_scale), ...)`, but each leaf is quantized as it is drawn (a stacked
    kernel slice by slice) and placed on the device, so no float leaf outlives its quantization: the
    peak is the int8 tree plus one leaf's working copy, never the float tree (6.6 GB at 3.5B bf16)."""
    float_cfg = dataclasses.replace(cfg, quantize="none")
    qcfg = quantized_config(float_cfg, quantize, embeddings)
    quantized = _quantized_leaves(qcfg) if qcfg.quantize != "none" else {}
    flat = {}
    for path, leaf, parts in random_leaves(abstract_params(float_cfg), seed, kernel_scale):
        keys = tuple(k.key for k in path)
        if keys in quantized:
            q, scale = quantize_parts(parts, leaf.shape, quantized[keys])
            flat[keys], flat[keys[:-1] + (f"{keys[-1]}_scale",)] = jax.device_put(q), jax.device_put(scale)
        else:
            flat[keys] = jax.device_put(assemble(leaf, parts))
    return unflatten({"/".join(k): v for k, v in flat.items()}), qcfg


def dequantize_params(params: dict, qcfg: LLMConfig) -> tuple[dict, LLMConfig]:
    """(float params in qcfg.param_dtype as numpy, the float config): for export and comparison."""
    cfg = dataclasses.replace(qcfg, quantize="none")
    if qcfg.quantize == "none":
        return params, cfg
    dtype = np.dtype(qcfg.param_dtype) if qcfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
    out = jax.tree_util.tree_map(lambda x: x, params)  # new dicts, same leaves
    for path in _quantized_leaves(qcfg):
        node = _node(out, path[:-1])
        node[path[-1]] = dequantize_array(node[path[-1]], node.pop(f"{path[-1]}_scale"), dtype)
    return out, cfg
