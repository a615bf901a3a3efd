"""Tensor sources for the converters: read a released checkpoint one tensor at a time.

A source implements the `keymap.TensorSource` protocol (`names`, `shape`, `get`) plus `dtype(name)`,
and never holds more than the tensor being read. Converters for other file formats (torch pickles
read with `torch.load(mmap=True)`, ONNX initializers) add their source class here.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable

import numpy as np

from editx_jax.convert.keymap import ConversionError

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
        import ml_dtypes
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
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors needs for BF16)
        from safetensors import safe_open

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
