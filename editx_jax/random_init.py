"""Random params for a tree of shapes, drawn with numpy (no compile): tests, demos, benchmarks.

Each leaf takes the dtype of its abstract leaf. Kernels N(0, 1/fan_in) times `kernel_scale`, embeddings N(0, 1), norm scales 1 + N(0, 0.1),
everything else N(0, 0.1). Random weights make noise, never speech; these only exercise the code.
"""

import jax
import numpy as np


def random_params(abstract, seed: int, kernel_scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def draw(path, leaf):
        name = str(path[-1].key) if hasattr(path[-1], "key") else ""
        shape = tuple(leaf.shape)
        if name == "scale":
            return (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        if name == "kernel" and len(shape) >= 2:  # [..., in, out]: scaled by the input width
            return (kernel_scale * rng.normal(size=shape) / np.sqrt(shape[-2])).astype(np.float32)
        if name == "embedding":
            return rng.normal(size=shape).astype(np.float32)
        return (0.1 * rng.normal(size=shape)).astype(np.float32)

    leaves = [draw(path, leaf).astype(leaf.dtype) for path, leaf in flat]  # e.g. bfloat16 LLM params
    return jax.tree_util.tree_unflatten(treedef, leaves)
