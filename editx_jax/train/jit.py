"""The one way a training step is jitted: fixed arguments (states, params) with their shardings, the
batch's rows over data x fsdp, run under the mesh and its rules so the layers' logical constraints
apply. Every algorithm's steps (sft.py, reward.py, dpo.py, grpo.py, ppo.py) go through `sharded_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from editx_jax import sharding


class ShardedStep:
    """`step(*fixed_args, batch)`: one `jax.jit` per batch layout (tree structure and ranks), compiled
    on first use. The batch may be host arrays (placed here) or global arrays already in place."""

    def __init__(self, fn: Callable, mesh, fixed_shardings: tuple, out_shardings, donate: tuple = (),
                 batch_axis: int = 0):
        self.fn, self.mesh, self.fixed, self.out, self.donate = fn, mesh, fixed_shardings, out_shardings, donate
        self.batch_axis = batch_axis
        self._cache = {}

    def batch_shardings(self, batch):
        return jax.tree_util.tree_map(lambda x: sharding.batch_sharding(self.mesh, np.ndim(x), self.batch_axis),
                                      batch)

    def _jitted(self, batch):
        key = jax.tree_util.tree_structure(batch), tuple(np.ndim(x) for x in jax.tree_util.tree_leaves(batch))
        if key not in self._cache:
            self._cache[key] = jax.jit(self.fn, in_shardings=(*self.fixed, self.batch_shardings(batch)),
                                       out_shardings=self.out, donate_argnums=self.donate)
        return self._cache[key]

    def lower(self, *args):
        """The lowered computation for these (possibly abstract) arguments: memory / cost analysis."""
        with sharding.use_mesh(self.mesh):
            return self._jitted(args[-1]).lower(*args)

    def __call__(self, *args):
        *fixed, batch = args
        jitted = self._jitted(batch)
        batch = sharding.place(batch, self.batch_shardings(batch))
        with sharding.use_mesh(self.mesh):
            return jitted(*fixed, batch)


def sharded_step(fn: Callable, mesh, fixed_shardings: tuple, out_shardings, donate: tuple = (),
                 batch_axis: int = 0) -> ShardedStep:
    """`fn(*fixed, batch)` jitted with `fixed_shardings` for the fixed arguments, the batch's
    `batch_axis` over data x fsdp, outputs in `out_shardings`; `donate` as in `jax.jit`."""
    return ShardedStep(fn, mesh, fixed_shardings, out_shardings, donate, batch_axis)
