"""Micro-batching inside a jitted step, for the batch-major [N, ...] batches of the reward model, DPO,
GRPO and PPO (SFT's batches arrive already split, see train/sft.py).

Layout: micro-batch a holds the row groups a, a + n, a + 2n, ... (a group = `group` consecutive rows:
2 for an interleaved pair batch, so a pair never splits). The batch's rows are sharded in contiguous
blocks over data x fsdp, so this interleaving is a local reshape on every device: no micro-batch
lives on a subset of the devices and no rows move between devices.

  * `accumulate`: gradients summed over a `lax.scan` of micro-batches (train.grad_accum); the loss
    function returns its share of the step's objective, so the caller picks the normalisation
    (per pair, per global token) that makes accumulated == unaccumulated;
  * `map_rows`: a no-grad pass (reference / policy / value log-probs, reward scores) as a `lax.map`
    over micro-batches of a fixed row count (train.micro_batch), so only one micro-batch's logits are
    alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


class MicroBatchError(ValueError):
    """A micro-batch size that does not divide the batch."""


def split(tree, n: int, group: int = 1):
    """[N, ...] leaves -> [n, N / n, ...]: micro-batch a = row groups a, a + n, ... (see the module doc)."""
    def one(x):
        rows = x.shape[0]
        x = x.reshape(rows // (group * n), n, group, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(n, rows // n, *x.shape[3:])
    return jax.tree_util.tree_map(one, tree)


def merge(tree, group: int = 1):
    """The inverse of `split`: [n, N / n, ...] leaves -> [N, ...] in the original row order."""
    def one(x):
        n, rows = x.shape[:2]
        x = x.reshape(n, rows // group, group, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape(n * rows, *x.shape[3:])
    return jax.tree_util.tree_map(one, tree)


def rows_of(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def check(rows: int, n: int, group: int, what: str) -> None:
    if n < 1 or rows % (n * group):
        raise MicroBatchError(f"{what}: {n} micro-batches do not divide {rows} rows"
                              + (f" in groups of {group}" if group > 1 else ""))


def accumulate(loss_fn: Callable, params, batch: dict, n: int, group: int = 1):
    """(objectives [n], aux stacked over micro-batches [n, ...], summed gradients) of
    `loss_fn(params, micro) -> (objective, aux)` over `n` micro-batches; the step's loss is the sum of
    the objectives (loss_fn scales its micro-batch's share)."""
    check(rows_of(batch), n, group, "train.grad_accum")

    def body(grads, micro):
        (objective, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, micro)
        return jax.tree_util.tree_map(jnp.add, grads, g), (objective, aux)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads, (objectives, aux) = jax.lax.scan(body, zeros, split(batch, n, group))
    return objectives, aux, grads


def map_rows(fn: Callable, batch: dict, rows: int = 0):
    """`fn(batch)` (outputs with a leading row axis) computed `rows` rows at a time; 0 or a size not
    below the batch: one call on the whole batch (the unsplit computation, unchanged)."""
    total = rows_of(batch)
    if not rows or rows >= total:
        return fn(batch)
    if total % rows:
        raise MicroBatchError(f"train.micro_batch: {rows} rows do not divide the batch of {total}")
    return merge(jax.lax.map(fn, split(batch, total // rows)))


def check_run(grad_rows: int, grad_accum: int, pass_rows: int, micro_batch: int, shards: int, what: str,
              group: int = 1) -> None:
    """Before anything compiles: `grad_rows` (one gradient step's rows, `what`) split into
    train.grad_accum micro-batches of whole groups that divide over the `shards` batch shards, and
    `pass_rows` (one no-grad pass's rows) into train.micro_batch-row micro-batches that do too."""
    unit = "pairs" if group == 2 else "rows"
    if grad_accum > 1 and (grad_rows % (grad_accum * group) or (grad_rows // grad_accum) % shards):
        raise MicroBatchError(f"train.grad_accum {grad_accum}: the {grad_rows // group} {unit} of {what} do not "
                              f"split into {grad_accum} equal micro-batches of whole {unit} that divide over "
                              f"data x fsdp = {shards} devices")
    if micro_batch and micro_batch < pass_rows and (pass_rows % micro_batch or micro_batch % shards):
        raise MicroBatchError(f"train.micro_batch {micro_batch}: must divide the {pass_rows} rows of a no-grad pass "
                              f"and divide over data x fsdp = {shards} devices")
