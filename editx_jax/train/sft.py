"""Supervised fine-tuning: pure loss and step functions, and their jitted, sharded forms.

Loss: next-token cross-entropy (float32 logits) over the tokens whose weight is 1. Normalisation:
  * "global_token_mean" (default): sum over every micro-batch and device / number of loss tokens in
    the whole step, so each token counts the same whatever the packing or accumulation;
  * "micro_batch_mean": upstream's HF Trainer behaviour (upstream-training.md §2): each micro-batch's
    own token mean, divided by the number of micro-batches. (Upstream further averages per-rank
    means; here a micro-batch is the global one, spread over all devices.)
Gradient accumulation is a `lax.scan` over the leading micro-batch axis of the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from editx_jax import sharding
from editx_jax.config import LLMConfig
from editx_jax.data.pipeline import BATCH_KEYS, batch_sharding
from editx_jax.models.llm import Step1
from editx_jax.train.state import master_config, state_shardings


def token_nll(params, cfg: LLMConfig, micro: dict):
    """Per-token NLL and argmax-correctness [B, T] of one micro-batch (float32)."""
    logits, _ = Step1(cfg).apply({"params": params}, micro["tokens"], micro["positions"], micro["segment_ids"])
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, micro["targets"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = (jnp.argmax(logits, axis=-1) == micro["targets"]).astype(jnp.float32)
    return nll, correct


def loss_fn(params, cfg: LLMConfig, micro: dict, denom):
    """(sum of weighted NLL / denom, sums for the metrics)."""
    nll, correct = token_nll(params, cfg, micro)
    w = micro["weights"]
    nll_sum = jnp.sum(nll * w)
    return nll_sum / denom, {"nll_sum": nll_sum, "correct": jnp.sum(correct * w), "tokens": jnp.sum(w)}


def train_step(state: dict, batch: dict, *, cfg: LLMConfig, tx: optax.GradientTransformation,
               loss_norm: str = "global_token_mean", schedule=None):
    """One optimizer step over a batch of [grad_accum, rows, length] arrays -> (state, metrics)."""
    cfg = master_config(cfg)
    n_micro = batch["tokens"].shape[0]
    total = jnp.sum(batch["weights"])

    def micro_step(grads, micro):
        if loss_norm == "global_token_mean":
            denom = jnp.maximum(total, 1.0)
        else:
            denom = jnp.maximum(jnp.sum(micro["weights"]), 1.0) * n_micro
        (objective, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], cfg, micro, denom)
        return jax.tree_util.tree_map(jnp.add, grads, g), (objective, sums)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
    grads, (objectives, sums) = jax.lax.scan(micro_step, zeros, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    denom = jnp.maximum(total, 1.0)
    metrics = {"loss": jnp.sum(sums["nll_sum"]) / denom, "objective": jnp.sum(objectives),
               "accuracy": jnp.sum(sums["correct"]) / denom, "tokens": total,
               "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch: dict, *, cfg: LLMConfig):
    """Teacher-forced sums over a [1, rows, length] batch: NLL, correct next tokens, loss tokens."""
    cfg = master_config(cfg)
    micro = jax.tree_util.tree_map(lambda x: x[0], batch)
    _, sums = loss_fn(params, cfg, micro, 1.0)
    return sums


def _with_mesh(fn, mesh):
    def run(*args):
        with sharding.use_mesh(mesh):
            return fn(*args)
    run.jitted = fn
    return run


def make_train_step(cfg: LLMConfig, tx, mesh, loss_norm: str = "global_token_mean", schedule=None):
    """`step(state, batch) -> (state, metrics)`: jitted with the state's and the batch's shardings,
    the state donated (its buffers are reused for the new state)."""
    state_sh = state_shardings(cfg, tx, mesh)
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    fn = functools.partial(train_step, cfg=cfg, tx=tx, loss_norm=loss_norm, schedule=schedule)
    jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
    return _with_mesh(jitted, mesh)


def make_eval_step(cfg: LLMConfig, tx, mesh):
    param_sh = state_shardings(cfg, tx, mesh)["params"]
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    jitted = jax.jit(functools.partial(eval_step, cfg=cfg), in_shardings=(param_sh, batch_sh),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
    return _with_mesh(jitted, mesh)
