"""Random params for a tree of shapes, drawn with numpy (no compile): tests, demos, benchmarks.

Each leaf takes the dtype of its abstract leaf and goes to the device as soon as it is drawn, so
a released-size tree (7 GB in bfloat16) never exists twice in host memory. Kernels N(0, 1/fan_in)
times `kernel_scale`, embeddings N(0, 1), norm scales 1 + N(0, 0.1), everything else N(0, 0.1).
Random weights make noise, never speech; these only exercise the code.

A kernel's fan-in is its second-to-last axis ([..., in, out]: Dense, and convs by their channels),
except the LLM's multi-axis attention projections, whose input is not that axis: q/k/v
[L, E, H|G, D] read E, o_proj [L, H, D, E] reads H*D. Scaling those by H or D instead would make
random-weight attention logits so large that every softmax is one-hot.
"""

import math

import jax
import numpy as np

# Module name -> the axes (counted from the end) that a multi-axis kernel contracts with its input.
MULTI_AXIS_FAN_IN = {"q_proj": (-3,), "k_proj": (-3,), "v_proj": (-3,), "o_proj": (-3, -2)}


def kernel_fan_in(path, shape: tuple) -> int:
    """The number of inputs each output of the kernel at `path` sums over (see module doc)."""
    parent = str(path[-2].key) if len(path) >= 2 and hasattr(path[-2], "key") else ""
    axes = MULTI_AXIS_FAN_IN.get(parent)
    if axes is not None and len(shape) >= 3:
        return math.prod(shape[a] for a in axes)
    return shape[-2]


def random_leaves(abstract, seed: int, kernel_scale: float = 1.0):
    """(key path, abstract leaf, parts) per leaf of `abstract`, in tree order. `parts` yields
    (index, values in the leaf's dtype) such that `leaf[index] = values` fills the leaf: the whole
    leaf (index `...`) below rank 3, else one [L]-slice at a time (index i), so a consumer holds one
    slice's float32 working copy, not the whole stack (3.2 GB at the released size). All leaves
    share one generator: consume each leaf's parts fully, in order, before the next leaf."""
    rng = np.random.default_rng(seed)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        yield path, leaf, _parts(rng, path, leaf, kernel_scale)


def _parts(rng, path, leaf, kernel_scale: float):
    name = str(path[-1].key) if hasattr(path[-1], "key") else ""
    shape = tuple(leaf.shape)

    def part(sub_shape):
        x = rng.standard_normal(size=sub_shape, dtype=np.float32)
        if name == "scale":
            x = 1 + 0.1 * x
        elif name == "kernel" and len(shape) >= 2:
            x *= kernel_scale / np.sqrt(kernel_fan_in(path, shape))
        elif name != "embedding":
            x *= 0.1
        return x.astype(leaf.dtype, copy=False)

    if len(shape) < 3:
        yield ..., part(shape)
        return
    for i in range(shape[0]):
        yield i, part(shape[1:])


def assemble(leaf, parts) -> np.ndarray:
    """The numpy array of one leaf from its `parts` (see `random_leaves`)."""
    out = None
    for index, values in parts:
        if index is ...:
            return values
        if out is None:
            out = np.empty(leaf.shape, leaf.dtype)
        out[index] = values
    return out


def random_params(abstract, seed: int, kernel_scale: float = 1.0) -> dict:
    treedef = jax.tree_util.tree_structure(abstract)
    leaves = [jax.device_put(assemble(leaf, parts)) for _, leaf, parts in random_leaves(abstract, seed, kernel_scale)]
    return jax.tree_util.tree_unflatten(treedef, leaves)
