"""Nested-dict params trees: 'a/b/c' flattening and the shape comparison every loader makes.

Ground floor: imports nothing of ours. Checkpoint folders, converters and the model loaders use
these so that "which leaf differs" is computed and worded one way.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def leaf_shapes(tree) -> dict[str, tuple]:
    """'a/b/c' -> shape of every leaf of any pytree (arrays, ShapeDtypeStructs, numpy)."""
    return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(np.shape(v))
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def shape_diff(want, got) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """How the tree `got` differs from `want`: (missing paths, unexpected paths, [(path, wanted
    shape, got shape)] of the leaves whose shapes differ), each sorted by path."""
    want, got = leaf_shapes(want), leaf_shapes(got)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [(p, want[p], got[p]) for p in sorted(set(want) & set(got)) if want[p] != got[p]]
    return missing, extra, wrong
