"""Random params for a tree of shapes, drawn with numpy (no compile): tests, demos, benchmarks.

Each leaf takes the dtype of its abstract leaf and goes to the device as soon as it is drawn, so
a released-size tree (7 GB in bfloat16) never exists twice in host memory. Kernels N(0, 1/fan_in)
times `kernel_scale`, embeddings N(0, 1), norm scales 1 + N(0, 0.1), everything else N(0, 0.1).
Random weights make noise, never speech; these only exercise the code.
"""

import jax
import numpy as np


def random_params(abstract, seed: int, kernel_scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def draw(path, leaf):
        name = str(path[-1].key) if hasattr(path[-1], "key") else ""
        shape = tuple(leaf.shape)
        x = rng.standard_normal(size=shape, dtype=np.float32)
        if name == "scale":
            x = 1 + 0.1 * x
        elif name == "kernel" and len(shape) >= 2:  # [..., in, out]: scaled by the input width
            x *= kernel_scale / np.sqrt(shape[-2])
        elif name != "embedding":
            x *= 0.1
        return jax.device_put(x.astype(leaf.dtype, copy=False))

    return jax.tree_util.tree_unflatten(treedef, [draw(path, leaf) for path, leaf in flat])
