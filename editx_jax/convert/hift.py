"""Converter for HiFT (`CosyVoice-300M-25Hz/hift.pt`, architecture.md §3.7.1, §4 item 3), and the
weight-norm folding shared with the BigVGAN converter.

Weight norm is folded at conversion: the released file stores `<m>.parametrizations.weight.original0`
(g, [d0, 1, 1]) and `.original1` (v) per weight-normed module; older files store `<m>.weight_g` and
`<m>.weight_v`. `WeightNormSource` presents each (g, v) pair as one tensor `<m>.weight` =
g * v / ||v|| (norm over every axis but 0, which for a ConvTranspose1d [in, out, k] is the *input*
channel), materialised in float32 before any cast to the target dtype. A plain `<m>.weight` (a
checkpoint whose weight norm was already removed) passes through unchanged. The key map then only
sees plain weights; it works per tensor and cannot combine two source tensors itself.

ConvTranspose1d weights [in, out, k] use the ordinary `conv1d` layout: our ConvTranspose1d stores the
kernel of the forward conv it transposes, [k, out, in] (see editx_jax/layers/conv.py).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping

import numpy as np

from editx_jax.convert.keymap import ConversionError, DictSource, Rule, TensorSource, convert, export
from editx_jax.decoder.hift import HiFTConfig, abstract_params

# --------------------------------------------------------------------------------- weight norm

_WN_PATTERNS = (
    (re.compile(r"(.+)\.parametrizations\.weight\.original([01])\Z"), {"0": "g", "1": "v"}),
    (re.compile(r"(.+)\.weight_([gv])\Z"), {"g": "g", "v": "v"}),
)


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """W = g * v / ||v||, the norm over all axes but 0 (torch weight_norm with dim=0), as float32.

    The inputs are widened to float64 first, so a bf16 or fp16 checkpoint is folded at full precision
    and rounded once.
    """
    g64 = np.asarray(g, np.float32).astype(np.float64)
    v64 = np.asarray(v, np.float32).astype(np.float64)
    norm = np.sqrt(np.sum(v64 * v64, axis=tuple(range(1, v64.ndim)), keepdims=True))
    return (g64.reshape((-1,) + (1,) * (v64.ndim - 1)) * v64 / norm).astype(np.float32)


def unfold_weight_norm(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (g, v) pair with fold_weight_norm(g, v) == w: g = ||w|| per axis-0 slice, v = w."""
    w = np.asarray(w, np.float32)
    g = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=tuple(range(1, w.ndim)), keepdims=True))
    return g.astype(np.float32), w


class WeightNormSource:
    """A TensorSource view that shows every weight-norm (g, v) pair of `inner` as one `<m>.weight`.

    Raises ConversionError (naming the tensor) for a g without its v or the reverse, a g whose shape
    is not [v.shape[0], 1, ...], or a module stored both weight-normed and plain.
    """

    def __init__(self, inner: TensorSource):
        self.inner = inner
        pairs: dict[str, dict[str, str]] = {}
        plain: list[str] = []
        for name in inner.names():
            for pattern, role in _WN_PATTERNS:
                if m := pattern.match(name):
                    slot = pairs.setdefault(m[1], {})
                    key = role[m[2]]
                    if key in slot:
                        raise ConversionError(f"tensor {name!r}: module {m[1]!r} has two weight-norm {key} tensors "
                                              f"({slot[key]!r} too)")
                    slot[key] = name
                    break
            else:
                plain.append(name)
        self._folded: dict[str, tuple[str, str]] = {}
        plain_set = set(plain)
        for module, slot in pairs.items():
            if set(slot) != {"g", "v"}:
                have = next(iter(slot.values()))
                want = "v (original1 / weight_v)" if "g" in slot else "g (original0 / weight_g)"
                raise ConversionError(f"tensor {have!r} has no weight-norm partner: expected the {want} "
                                      f"of {module!r} too")
            name = f"{module}.weight"
            if name in plain_set:
                raise ConversionError(f"tensor {name!r} is stored both plain and weight-normed "
                                      f"({slot['g']!r}, {slot['v']!r})")
            g_shape, v_shape = tuple(inner.shape(slot["g"])), tuple(inner.shape(slot["v"]))
            want = (v_shape[0],) + (1,) * (len(v_shape) - 1) if v_shape else ()
            if not v_shape or g_shape not in (want, (v_shape[0],)):
                raise ConversionError(f"tensor {slot['g']!r} has shape {list(g_shape)}; expected {list(want)} "
                                      f"(weight norm over axis 0 of {slot['v']!r} {list(v_shape)})")
            self._folded[name] = (slot["g"], slot["v"])
        self._names = plain + list(self._folded)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._folded:
            return tuple(self.inner.shape(self._folded[name][1]))
        return tuple(self.inner.shape(name))

    def get(self, name: str) -> np.ndarray:
        if name in self._folded:
            g, v = self._folded[name]
            return fold_weight_norm(_float32(self.inner.get(g)), _float32(self.inner.get(v)))
        return _float32(self.inner.get(name))


def _float32(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch itself is never imported here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


class TorchFileSource:
    """The tensors of a torch-pickled state_dict (`hift.pt`), memory-mapped and read one at a time."""

    def __init__(self, path: str | os.PathLike):
        import torch  # converters only

        path = pathlib.Path(path)
        if not path.is_file():
            raise ConversionError(f"checkpoint not found: {path}")
        try:
            obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # pickle / zip errors of a file that is not a torch checkpoint
            raise ConversionError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
        for key in ("state_dict", "generator"):  # training checkpoints nest the weights
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
            raise ConversionError(f"{path} does not hold a state_dict of tensors")
        self._t = dict(obj)

    def names(self):
        return list(self._t)

    def shape(self, name):
        return tuple(self._t[name].shape)

    def get(self, name):
        return _float32(self._t[name])


def checkpoint_source(path: str | os.PathLike) -> TensorSource:
    """A torch pickle (.pt/.pth/.bin) or a safetensors file."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        from editx_jax.convert.sources import SafetensorsSource
        return SafetensorsSource(path)
    return TorchFileSource(path)


# --------------------------------------------------------------------------------------- rules


def _conv(src: str, dst: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", "conv1d")]
    if bias:
        rules.append(Rule(f"{src}.bias", f"{dst}/bias"))
    return rules


def _resblock(src: str, dst: str, n_dilations: int) -> list[Rule]:
    rules = []
    for j in range(n_dilations):
        for a in ("convs1", "convs2"):
            rules += _conv(f"{src}.{a}.{j}", f"{dst}/{a}_{j}")
        for a in ("activations1", "activations2"):
            rules.append(Rule(f"{src}.{a}.{j}.alpha", f"{dst}/{a}_{j}/alpha"))
    return rules


def rules(config: HiFTConfig) -> list[Rule]:
    """torch names (with weight norm folded to `<m>.weight`) -> our params paths."""
    out = []
    for i in range(config.f0_num_convs):
        out += _conv(f"f0_predictor.condnet.{2 * i}", f"f0_predictor/condnet_{i}")  # ELUs sit between
    out += [Rule("f0_predictor.classifier.weight", "f0_predictor/classifier/kernel", "linear"),
            Rule("f0_predictor.classifier.bias", "f0_predictor/classifier/bias"),
            Rule("m_source.l_linear.weight", "m_source/l_linear/kernel", "linear"),
            Rule("m_source.l_linear.bias", "m_source/l_linear/bias")]
    out += _conv("conv_pre", "conv_pre") + _conv("conv_post", "conv_post")
    n_kernels = len(config.resblock_kernel_sizes)
    for i in range(len(config.upsample_rates)):
        out += _conv(f"ups.{i}", f"ups_{i}")  # [in, out, k] -> [k, out, in], see module docstring
        out += _conv(f"source_downs.{i}", f"source_downs_{i}")
        out += _resblock(f"source_resblocks.{i}", f"source_resblocks_{i}",
                         len(config.source_resblock_dilation_sizes[i]))
        for j in range(n_kernels):
            k = i * n_kernels + j
            out += _resblock(f"resblocks.{k}", f"resblocks_{k}", len(config.resblock_dilation_sizes[j]))
    return out


# ------------------------------------------------------------------------------------ convert


def from_source(source: TensorSource, config: HiFTConfig = HiFTConfig(), dtype=None) -> dict:
    """Params from any TensorSource over HiFTGenerator state_dict names (weight-normed or plain)."""
    return convert(WeightNormSource(source), rules(config), abstract_params(config), dtype=dtype)


def from_state_dict(state_dict: Mapping, config: HiFTConfig = HiFTConfig(), dtype=None) -> dict:
    """Params from an in-memory HiFTGenerator state_dict (torch tensors or numpy arrays)."""
    return from_source(DictSource({k: _float32(v) for k, v in state_dict.items()}), config, dtype)


def from_checkpoint(path: str | os.PathLike, config: HiFTConfig = HiFTConfig(), dtype=None) -> dict:
    """Params from `hift.pt` (torch pickle) or a safetensors copy of its state_dict."""
    return from_source(checkpoint_source(path), config, dtype)


def to_state_dict(params: Mapping, config: HiFTConfig = HiFTConfig(),
                  weight_norm: str = "parametrizations") -> dict[str, np.ndarray]:
    """Our params back to torch names. `weight_norm`: 'parametrizations' (original0/1, like hift.pt),
    'old' (weight_g/weight_v) or 'none' (plain folded weights). Folding the result gives params back."""
    if weight_norm not in ("parametrizations", "old", "none"):
        raise ValueError(f"weight_norm must be 'parametrizations', 'old' or 'none', got {weight_norm!r}")
    out = {}
    wn = {r.source[:-len(".weight")] for r in rules(config)
          if r.layout == "conv1d" and not r.source.startswith("source_downs.")}
    for name, arr in export(params, rules(config)):
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if weight_norm == "none" or module not in wn:
            out[name] = arr
            continue
        g, v = unfold_weight_norm(arr)
        if weight_norm == "parametrizations":
            prefix = f"{module}.parametrizations.weight"
            out[f"{prefix}.original0"], out[f"{prefix}.original1"] = g, v
        else:
            out[f"{module}.weight_g"], out[f"{module}.weight_v"] = g, v
    return out
