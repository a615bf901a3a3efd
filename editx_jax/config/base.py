"""What every config section shares: the error type, the shared checks, building a dataclass from a
nested dict, `--set a.b=c` overrides, and reading YAML presets with `base:` inheritance.

Imports nothing of ours: every config module builds on this one, and everything else builds on them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing

import yaml


class ConfigError(ValueError):
    """A config file, an override or a field value is wrong; the message says which."""


DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "minimal")
MATMUL_PRECISIONS = ("default", "high", "highest")  # jax.lax.Precision names, for *.matmul_precision


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_matmul_precision(value: str, field: str) -> None:
    _check(value in MATMUL_PRECISIONS, field, f"one of {', '.join(MATMUL_PRECISIONS)}, got {value!r}")


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {message}")


def as_tuples(value):
    """Lists (YAML, JSON) -> tuples, nested; tuples keep configs hashable (static jit arguments)."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- building from dicts


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys are an error naming them."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping, got {value!r}")
            kwargs[name] = from_dict(typ, value, path)
        else:
            kwargs[name] = _coerce(typ, value, path)
    return cls(**kwargs)


def _coerce(typ, value, path):
    if typing.get_origin(typ) is tuple and isinstance(value, list):
        return as_tuples(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {typ.__name__}, got {value!r}")
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` strings to a nested dict; values are parsed as YAML scalars."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. llm.num_layers=4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


# ---------------------------------------------------------------- YAML presets


def read_preset(path: str | pathlib.Path, _chain: tuple[pathlib.Path, ...] = ()) -> dict:
    """A YAML preset as a nested dict. `base: other.yaml` (relative to this file's folder) loads that
    preset first and deep-merges this one's keys over it, so a variant states only its differences
    (MaxText's `base_config`); bases may chain, a cycle is an error."""
    path = pathlib.Path(path)
    if not path.is_file():
        via = f" (the base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{via}")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(p.name for p in (*_chain[_chain.index(resolved):], resolved))
        raise ConfigError(f"{path}: `base:` cycle {cycle}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected a preset file name, got {base!r}")
    return deep_merge(read_preset(path.parent / base, (*_chain, resolved)), data)


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else in `over` replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
