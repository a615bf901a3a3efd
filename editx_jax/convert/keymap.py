"""Declarative key maps between released checkpoints and our params trees.

A converter is a list of `Rule`s. Each rule names a source tensor by a template such as
`model.layers.{layer}.self_attn.q_proj.weight`, the params path it fills (`layers/attn/q_proj/kernel`)
and a layout op. A template field named in `Rule.stack` indexes the leading (scan) axis of the target
leaf, so per-layer tensors are stacked for `nn.scan`. The same rules run both ways:
`convert` (source -> params) and `export` (params -> source names and layouts), and the round trip
is bit-exact for the layout ops here (they only transpose and reshape).

Tensors are read one at a time from a `TensorSource`; target leaves are preallocated in the target
dtype, so peak memory is about the converted size plus the largest source tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Iterable, Iterator, Mapping, Protocol

import numpy as np

from editx_jax.tree import flatten, unflatten


class ConversionError(ValueError):
    """A checkpoint does not match the model: a tensor is missing, extra, misshapen or used twice."""


# ------------------------------------------------------------------ layout ops (forward, inverse)
# forward(w, target_shape) -> array of target_shape; inverse(a, source_shape) -> array of source_shape.


def _identity(w, shape):
    return w.reshape(shape)


def _linear(w, shape):
    # torch Linear [out, in] -> kernel [in, *out dims] (or [*in dims, out] for output projections)
    return w.T.reshape(shape)


def _linear_inv(a, shape):
    return a.reshape(shape[::-1]).T


def _conv1d(w, shape):
    # torch Conv1d [out, in, k] -> Flax Conv [k, in, out]
    return w.transpose(2, 1, 0).reshape(shape)


def _conv1d_inv(a, shape):
    return a.reshape(shape[::-1]).transpose(2, 1, 0)


def _conv2d(w, shape):
    # torch Conv2d [out, in, kh, kw] -> Flax Conv [kh, kw, in, out]
    return w.transpose(2, 3, 1, 0).reshape(shape)


def _conv2d_inv(a, shape):
    return a.reshape(shape[2], shape[3], shape[1], shape[0]).transpose(3, 2, 0, 1)


LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "identity": (_identity, _identity),
    "linear": (_linear, _linear_inv),
    "conv1d": (_conv1d, _conv1d_inv),
    "conv2d": (_conv2d, _conv2d_inv),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # source tensor name template; fields in braces match integers
    target: str  # params path, '/'-separated
    layout: str = "identity"
    stack: str | None = None  # template field that indexes the target's leading axis
    in_dims: int = 1  # for "linear": how many leading target dims form torch's input dim

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {sorted(LAYOUTS)}")

    @functools.cached_property
    def regex(self) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", self.source)
        pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
        return re.compile(pattern + r"\Z")


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


class DictSource:
    """A source over an in-memory mapping of name -> array."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = tensors

    def names(self):
        return list(self._t)

    def shape(self, name):
        return tuple(self._t[name].shape)

    def get(self, name):
        return np.asarray(self._t[name])


# ------------------------------------------------------------------ convert / export


class _Matcher:
    """Finds the one rule for a source name: exact names by lookup, templates by regex."""

    def __init__(self, rules: Iterable[Rule]):
        self.exact: dict[str, Rule] = {}
        self.templated: list[Rule] = []
        for r in rules:
            if "{" in r.source:
                self.templated.append(r)
            elif r.source in self.exact:
                raise ConversionError(f"two rules read the same tensor {r.source!r}")
            else:
                self.exact[r.source] = r

    def __call__(self, name: str):
        hits = [(r, m) for r in self.templated if (m := r.regex.match(name))]
        if name in self.exact:
            hits.append((self.exact[name], None))
        if len(hits) > 1:
            raise ConversionError(f"tensor {name!r} matches several rules: {[r.source for r, _ in hits]}")
        return hits[0] if hits else (None, None)


def convert(source: TensorSource, rules: list[Rule], abstract: Mapping, dtype=None,
            progress: Callable[[Iterator], Iterator] | None = None) -> dict:
    """Fill the params tree described by `abstract` (leaves with .shape and .dtype) from `source`.

    Every source tensor must be used exactly once and every target element filled exactly once;
    otherwise a ConversionError names the tensor and the expected shape.
    """
    specs = flatten(abstract)
    out: dict[str, np.ndarray] = {}
    filled: dict[str, np.ndarray] = {}  # per target: which stack slots (or the single slot) are filled
    names = source.names()
    match = _Matcher(rules)
    unknown = [n for n in names if match(n)[0] is None]
    if unknown:
        raise ConversionError(f"unexpected tensor(s) in checkpoint: {', '.join(sorted(unknown)[:10])}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    iterator = progress(names) if progress else names
    for name in iterator:
        rule, m = match(name)
        if rule.target not in specs:
            raise ConversionError(f"rule target {rule.target!r} for tensor {name!r} is not a model param")
        spec = specs[rule.target]
        full_shape = tuple(spec.shape)
        leaf_dtype = np.dtype(dtype or spec.dtype)
        if rule.stack:
            index = int(m.group(rule.stack))
            if index >= full_shape[0]:
                raise ConversionError(f"tensor {name!r}: {rule.stack} {index} is out of range "
                                      f"(the model has {full_shape[0]})")
            slot_shape, n_slots = full_shape[1:], full_shape[0]
        else:
            index, slot_shape, n_slots = 0, full_shape, 1
        forward, _ = LAYOUTS[rule.layout]
        src_shape = tuple(source.shape(name))
        expected = expected_source_shape(rule, slot_shape)
        if src_shape != expected:
            raise ConversionError(f"tensor {name!r} has shape {list(src_shape)}; expected {list(expected)} "
                                  f"for {rule.target}")
        value = forward(np.asarray(source.get(name)), slot_shape)
        if rule.target not in out:
            out[rule.target] = np.empty(full_shape, leaf_dtype)
            filled[rule.target] = np.zeros(n_slots, bool)
        if filled[rule.target][index]:
            raise ConversionError(f"tensor {name!r} fills {rule.target}[{index}] a second time")
        filled[rule.target][index] = True
        if rule.stack:
            out[rule.target][index] = value.astype(leaf_dtype)
        else:
            out[rule.target][...] = value.astype(leaf_dtype)
    missing = []
    for path, spec in specs.items():
        if path not in filled:
            missing.append(f"{_source_for(rules, path, None)} (shape {list(_source_shape_for(rules, path, spec.shape))})")
        elif not filled[path].all():
            for i in np.flatnonzero(~filled[path]):
                missing.append(f"{_source_for(rules, path, i)} (shape {list(_source_shape_for(rules, path, spec.shape))})")
    if missing:
        raise ConversionError(f"checkpoint is missing tensor(s): {', '.join(missing[:10])}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    return unflatten(out)


def expected_source_shape(rule: Rule, slot_shape) -> tuple[int, ...]:
    """The source tensor shape that maps onto a target slot of `slot_shape`."""
    slot_shape = tuple(int(d) for d in slot_shape)
    if rule.layout == "linear":
        # kernel [*in dims, *out dims] is W.T of torch [out, in]; `in_dims` says how many lead.
        return (int(np.prod(slot_shape[rule.in_dims:])), int(np.prod(slot_shape[:rule.in_dims])))
    if rule.layout == "conv1d":
        return (int(np.prod(slot_shape[2:])), slot_shape[1], slot_shape[0])
    if rule.layout == "conv2d":
        return (slot_shape[3], slot_shape[2], slot_shape[0], slot_shape[1])
    return slot_shape


def _rule_for_target(rules, path):
    for r in rules:
        if r.target == path:
            return r
    raise ConversionError(f"no rule fills the model param {path!r}")


def _source_for(rules, path, index):
    r = _rule_for_target(rules, path)
    return r.source.format(**{r.stack: index if index is not None else 0}) if r.stack else r.source


def _source_shape_for(rules, path, full_shape):
    r = _rule_for_target(rules, path)
    return expected_source_shape(r, tuple(full_shape)[1:] if r.stack else tuple(full_shape))


def export(params: Mapping, rules: list[Rule], dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (source name, array in source layout) for every tensor; the inverse of `convert`."""
    flat = flatten(params)
    for path, value in flat.items():
        rule = _rule_for_target(rules, path)
        _, inverse = LAYOUTS[rule.layout]
        value = np.asarray(value)
        slots = range(value.shape[0]) if rule.stack else [None]
        for i in slots:
            leaf = value[i] if i is not None else value
            name = rule.source.format(**{rule.stack: i}) if rule.stack else rule.source
            arr = inverse(leaf, expected_source_shape(rule, leaf.shape))
            yield name, (arr.astype(dtype) if dtype is not None else arr)
