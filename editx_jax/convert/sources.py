"""Tensor sources for the converters: read a released checkpoint one tensor at a time.

A source implements the `keymap.TensorSource` protocol (`names`, `shape`, `get`) plus `dtype(name)`,
and never holds more than the tensor being read:

* `SafetensorsSource`: `model*.safetensors` files (sharded or not), tensors in their stored dtype.
* `TorchSource`: a torch pickle (`flow.pt`, `hift.pt`, FunASR `model.pt`, ...) memory-mapped with
  `torch.load(mmap=True, weights_only=True)`, or a state_dict already in memory; tensors come out as
  float32 numpy.
* `checkpoint_source(path)`: one of the two, by file suffix.
* `WeightNormSource`: a view over any source that shows each weight-norm (g, v) pair as one folded
  `<m>.weight` (the vocoders' converters).

torch is imported only inside `TorchSource`, when a file is read.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Callable, Iterable, Mapping

import ml_dtypes  # also registers bfloat16 with numpy, which safetensors needs for BF16
import numpy as np
from safetensors import safe_open

from editx_jax.cli import error_line
from editx_jax.convert.keymap import ConversionError, TensorSource

# Dtype tags of the safetensors header -> numpy dtype names.
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
NUMPY_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

FLOAT_DTYPES = ("float32", "bfloat16", "float16")

# Buffers some Llama-style exports carry; they hold no weights (architecture.md §1.5).
DEFAULT_IGNORED = ("rotary_emb.inv_freq", "position_ids")

INDEX_NAME = "model.safetensors.index.json"


def numpy_dtype(name: str) -> np.dtype:
    """A numpy dtype from its name; bfloat16 comes from ml_dtypes (which jax ships)."""
    if str(name) == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class SafetensorsSource:
    """The tensors of a folder's `model*.safetensors` (or of given files), read lazily.

    With `model.safetensors.index.json` present its `weight_map` decides which file holds which
    tensor, and every file it lists must exist. Tensor names ending in one of `ignore` are skipped
    (listed in `.ignored`). Tensors whose dtype is not in `allowed_dtypes` are an error naming them.
    Use as a context manager, or call `close()`, to release the open files.
    """

    def __init__(self, path: str | pathlib.Path | Iterable[str | pathlib.Path],
                 pattern: str = "model*.safetensors", ignore: Iterable[str] = DEFAULT_IGNORED,
                 allowed_dtypes: Iterable[str] | None = FLOAT_DTYPES):
        self._where: dict[str, pathlib.Path] = {}  # tensor name -> file
        self.ignored: list[str] = []
        if isinstance(path, (str, pathlib.Path)):
            path = pathlib.Path(path)
            if path.is_dir():
                files_for = self._from_index(path) if (path / INDEX_NAME).is_file() else None
                files = sorted({*files_for.values()}) if files_for else sorted(path.glob(pattern))
                if not files:
                    raise FileNotFoundError(f"{path}: no {pattern} files found")
            elif path.is_file():
                files_for, files = None, [path]
            else:
                raise FileNotFoundError(f"checkpoint not found: {path}")
        else:
            files_for, files = None, [pathlib.Path(p) for p in path]

        self._handles = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, numpy dtype name)
        try:
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"checkpoint file not found: {file}")
                try:
                    handle = safe_open(str(file), framework="numpy")
                except Exception as e:  # safetensors raises its own error types on a bad header
                    raise ConversionError(f"{file}: not a readable safetensors file ({e})") from None
                self._handles[file] = handle
                for name in handle.keys():
                    if files_for is not None and files_for.get(name) != file:
                        continue  # the index puts this name elsewhere (or nowhere): the index decides
                    if name in self._where:
                        raise ConversionError(f"tensor {name!r} is stored twice: in {self._where[name].name} "
                                              f"and {file.name}")
                    self._where[name] = file
            if files_for is not None:
                absent = sorted(n for n, f in files_for.items() if n not in self._where)
                if absent:
                    raise ConversionError(f"tensor {absent[0]!r} is listed in {INDEX_NAME} for "
                                          f"{files_for[absent[0]].name} but that file does not hold it")
            for name, file in list(self._where.items()):
                if any(name.endswith(s) for s in ignore):
                    self.ignored.append(name)
                    del self._where[name]
                    continue
                sl = self._handles[file].get_slice(name)
                tag = sl.get_dtype()
                dtype = SAFETENSORS_DTYPES.get(tag, tag.lower())
                if allowed_dtypes is not None and dtype not in allowed_dtypes:
                    raise ConversionError(f"tensor {name!r} has dtype {dtype}; expected one of "
                                          f"{', '.join(allowed_dtypes)}")
                self._info[name] = (tuple(int(d) for d in sl.get_shape()), dtype)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _from_index(folder: pathlib.Path) -> dict[str, pathlib.Path]:
        index_path = folder / INDEX_NAME
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index_path}: not a valid index file (no weight_map: {e})") from None
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in {index_path} is missing")
        return files

    # ---------------------------------------------------------------- TensorSource protocol

    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> str:
        return self._info[name][1]

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name))) * numpy_dtype(self.dtype(name)).itemsize

    def get(self, name: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
        return self._handles[self._where[name]].get_tensor(name)

    def close(self) -> None:
        for h in self._handles.values():
            if hasattr(h, "__exit__"):
                h.__exit__(None, None, None)
        self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -------------------------------------------------------------------- torch pickles

# Wrappers around the state_dict in training checkpoints: FunASR's `model.pt` may hold
# {"state_dict": ...} or {"model": ...}; NVIDIA's `bigvgan_generator.pt` holds {"generator": ...}.
TORCH_WRAPPER_KEYS = ("state_dict", "model", "generator")


def load_torch_checkpoint(path: str | os.PathLike) -> Mapping:
    """`torch.load` a checkpoint on CPU, weights only (no pickled code runs), memory-mapped when the
    file is in the zip format (the legacy format cannot be mapped and is read whole). A state_dict
    wrapped in one of `TORCH_WRAPPER_KEYS` is unwrapped. ConversionError for a missing file, a file
    torch cannot read, or one that holds no mapping."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    import torch  # noqa: PLC0415  (torch is optional, the convert extra: only converters read torch files)

    def load(mmap: bool):
        return torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=True)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = load(mmap=False)
    except Exception as e:  # pickle / zip / unsafe-content errors come in many classes
        raise ConversionError(f"{path}: not a readable torch checkpoint ({error_line(e)})") from None
    for key in TORCH_WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    return obj


def _dtype_name(value) -> str:
    """numpy-style dtype name of a torch tensor or numpy array ('float32', 'bfloat16', 'int64')."""
    return str(value.dtype).removeprefix("torch.")


class TorchSource:
    """The tensors of a torch state_dict, read one at a time as float32 numpy.

    `checkpoint` is a path (loaded by `load_torch_checkpoint`, memory-mapped, so the whole file is
    never resident at once) or a state_dict already in memory (torch tensors or numpy arrays).
    Entries that are not tensors, and names for which `select(name)` is false, are left out of
    `names()` and listed in `.ignored`. `get` widens bfloat16/float16 to float32 exactly; a tensor
    that is not floating point is a ConversionError naming it.
    """

    def __init__(self, checkpoint: str | os.PathLike | Mapping,
                 select: Callable[[str], bool] | None = None):
        if isinstance(checkpoint, (str, os.PathLike)):
            state = load_torch_checkpoint(checkpoint)
        elif isinstance(checkpoint, Mapping):
            state = checkpoint
        else:
            raise ConversionError(f"expected a checkpoint path or a state_dict (a mapping of name -> tensor), "
                                  f"got {type(checkpoint).__name__}")
        self._t: dict[str, object] = {}
        self.ignored: list[str] = []
        for name, value in state.items():
            if not isinstance(name, str):
                raise ConversionError(f"state_dict key {name!r} is not a tensor name")
            if hasattr(value, "shape") and hasattr(value, "dtype") and (select is None or select(name)):
                self._t[name] = value
            else:
                self.ignored.append(name)

    def names(self) -> list[str]:
        return list(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._t[name].shape)

    def dtype(self, name: str) -> str:
        return _dtype_name(self._t[name])

    def get(self, name: str) -> np.ndarray:
        value = self._t[name]
        dtype = self.dtype(name)
        if dtype not in ("float64",) + FLOAT_DTYPES:
            raise ConversionError(f"tensor {name!r} has dtype {dtype}; expected a float tensor")
        if hasattr(value, "detach"):  # a torch tensor (torch is imported by whoever made it)
            value = value.detach().cpu().float().numpy()
        return np.asarray(value, np.float32)


def checkpoint_source(path: str | os.PathLike) -> TensorSource:
    """A safetensors file (by its suffix) or else a torch pickle (.pt / .pth / .bin)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    return TorchSource(path)


# -------------------------------------------------------------------- weight norm
#
# Weight-normed modules store `<m>.parametrizations.weight.original0` (g, [d0, 1, 1]) and
# `.original1` (v) (torch's parametrizations API), or `<m>.weight_g` and `<m>.weight_v` (the old
# API). `WeightNormSource` presents each pair as one tensor `<m>.weight` = g * v / ||v|| (the norm
# over every axis but 0, which for a ConvTranspose1d [in, out, k] is the *input* channel),
# materialised in float32 before any cast to the target dtype, so the key map only sees plain
# weights (it works per tensor and cannot combine two). A plain `<m>.weight` (weight norm already
# removed) passes through unchanged.

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


WEIGHT_NORM_STYLES = ("parametrizations", "old", "none")


def with_weight_norm(pairs, modules: set[str], style: str) -> dict[str, np.ndarray]:
    """(name, array) pairs with each `<m>.weight` of a module in `modules` stored weight-normed:
    'parametrizations' (`<m>.parametrizations.weight.original0/1`, torch >= 2.1), 'old'
    (`<m>.weight_g` / `<m>.weight_v`) or 'none' (as is). WeightNormSource folds any of them back."""
    if style not in WEIGHT_NORM_STYLES:
        raise ValueError(f"weight_norm must be one of {', '.join(WEIGHT_NORM_STYLES)}, got {style!r}")
    out = {}
    for name, arr in pairs:
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if style == "none" or module not in modules:
            out[name] = arr
            continue
        g, v = unfold_weight_norm(arr)
        if style == "parametrizations":
            out[f"{module}.parametrizations.weight.original0"], out[f"{module}.parametrizations.weight.original1"] = g, v
        else:
            out[f"{module}.weight_g"], out[f"{module}.weight_v"] = g, v
    return out


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
            return fold_weight_norm(self.inner.get(g), self.inner.get(v))
        return np.asarray(self.inner.get(name), np.float32)


# -------------------------------------------------------------------- writing


def write_safetensors(path: str | pathlib.Path, tensors, metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file from `tensors`, a zero-argument callable returning an iterator of
    (name, array), streaming one tensor at a time (it is iterated twice: once for the header, once
    for the bytes). Returns the byte size of the tensor data.

    safetensors' own `save_file` needs every tensor in memory at once; for a 7 GB model that doubles
    the footprint, hence this writer.
    """
    header: dict[str, object] = {}
    offset = 0
    order = []
    for name, arr in tensors():
        dtype = str(np.dtype(arr.dtype))
        if dtype not in NUMPY_TO_SAFETENSORS:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        if name in header:
            raise ValueError(f"tensor {name!r} written twice")
        size = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
        header[name] = {"dtype": NUMPY_TO_SAFETENSORS[dtype], "shape": [int(d) for d in arr.shape],
                        "data_offsets": [offset, offset + size]}
        order.append(name)
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
    path = pathlib.Path(path)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i, (name, arr) in enumerate(tensors()):
            if i >= len(order) or name != order[i]:
                raise RuntimeError("write_safetensors: the tensor iterator is not repeatable")
            arr = np.ascontiguousarray(arr)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    return offset
