"""Supervised fine-tuning: pure loss and step functions, and their jitted, sharded forms.

Loss: next-token cross-entropy (float32 logits) over the tokens whose weight is 1. Normalisation:
  * "global_token_mean" (default): sum over every micro-batch and device / number of loss tokens in
    the whole step, so each token counts the same whatever the packing or accumulation;
  * "micro_batch_mean": upstream's HF Trainer behaviour (upstream-training.md §2): every rank takes
    its own micro-batch's token mean, divides by the number of micro-batches, and the ranks' results
    are averaged. Here a rank is one batch shard (`ranks` = data x fsdp devices, each holding
    rows / ranks consecutive rows of the micro-batch).
Both are written as one weighted sum, sum(nll * weight * row_scale), with a per-row scale.
Gradient accumulation is a `lax.scan` over the leading micro-batch axis of the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from editx_jax import sharding
from editx_jax.config import LLMConfig
from editx_jax.models.llm import Step1
from editx_jax.train.jit import sharded_step
from editx_jax.train.state import llm_state_shardings, master_config

MICRO_BATCH_AXIS = 1  # batches are [grad_accum, rows, length]: the rows split over data x fsdp


def token_nll(params, cfg: LLMConfig, micro: dict):
    """Per-token NLL and argmax-correctness [B, T] of one micro-batch (float32)."""
    logits = Step1(cfg).apply({"params": params}, micro["tokens"], micro["positions"], micro["segment_ids"])
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, micro["targets"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = (jnp.argmax(logits, axis=-1) == micro["targets"]).astype(jnp.float32)
    return nll, correct


def loss_fn(params, cfg: LLMConfig, micro: dict, row_scale):
    """(sum of NLL x weight x row_scale[row], sums for the metrics). row_scale [B] sets the normalisation."""
    nll, correct = token_nll(params, cfg, micro)
    w = micro["weights"]
    nll_sum = jnp.sum(nll * w)
    objective = jnp.sum(jnp.sum(nll * w, axis=-1) * row_scale)
    return objective, {"nll_sum": nll_sum, "correct": jnp.sum(correct * w), "tokens": jnp.sum(w)}


def row_scales(weights, loss_norm: str, ranks: int = 1):
    """[A, B] per-row loss scale of a [A, B, T] batch for each normalisation (see the module doc)."""
    n_micro, rows = weights.shape[:2]
    if loss_norm == "global_token_mean":
        return jnp.full((n_micro, rows), 1.0, jnp.float32) / jnp.maximum(jnp.sum(weights), 1.0)
    if rows % ranks:
        raise ValueError(f"{rows} rows per micro-batch do not split over {ranks} ranks")
    per_rank = jnp.sum(weights.reshape(n_micro, ranks, rows // ranks, -1), axis=(2, 3))  # [A, ranks]
    scale = 1.0 / (jnp.maximum(per_rank, 1.0) * n_micro * ranks)
    return jnp.repeat(scale, rows // ranks, axis=1)


def train_step(state: dict, batch: dict, *, cfg: LLMConfig, tx: optax.GradientTransformation,
               loss_norm: str = "global_token_mean", schedule=None, ranks: int = 1):
    """One optimizer step over a batch of [grad_accum, rows, length] arrays -> (state, metrics)."""
    cfg = master_config(cfg)
    total = jnp.sum(batch["weights"])
    scales = row_scales(batch["weights"], loss_norm, ranks)

    def micro_step(grads, micro_and_scale):
        micro, scale = micro_and_scale
        (objective, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], cfg, micro, scale)
        return jax.tree_util.tree_map(jnp.add, grads, g), (objective, sums)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
    grads, (objectives, sums) = jax.lax.scan(micro_step, zeros, (batch, scales))
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
    _, sums = loss_fn(params, cfg, micro, jnp.ones(micro["weights"].shape[:1], jnp.float32))
    return sums


def make_train_step(cfg: LLMConfig, tx, mesh, loss_norm: str = "global_token_mean", schedule=None,
                    shardings: dict | None = None):
    """`step(state, batch) -> (state, metrics)`: jitted with the state's shardings (`shardings`, the
    run's `llm_state_shardings`) and the batch's rows over data x fsdp, the state donated (its
    buffers are reused for the new state)."""
    state_sh = shardings or llm_state_shardings(cfg, tx, mesh)
    ranks = mesh.shape["data"] * mesh.shape["fsdp"]  # batch shards: the "ranks" of micro_batch_mean
    fn = functools.partial(train_step, cfg=cfg, tx=tx, loss_norm=loss_norm, schedule=schedule, ranks=ranks)
    return sharded_step(fn, mesh, (state_sh,), (state_sh, sharding.replicated(mesh)), donate=(0,),
                        batch_axis=MICRO_BATCH_AXIS)


def make_eval_step(cfg: LLMConfig, tx, mesh, shardings: dict | None = None):
    param_sh = (shardings or llm_state_shardings(cfg, tx, mesh))["params"]
    return sharded_step(functools.partial(eval_step, cfg=cfg), mesh, (param_sh,), sharding.replicated(mesh),
                        batch_axis=MICRO_BATCH_AXIS)


def model_flops_per_token(cfg: LLMConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM-paper MFU convention: 6 x matmul params
    (the embedding lookup is a gather, not counted) + 12 x layers x heads x head_dim x seq_len for the
    attention scores and mix. Rematerialisation is not counted (it is overhead, not model FLOPs).

    Why not XLA's count: `cost_analysis()` counts a while-loop body once, and both the layer scan and
    the micro-batch scan are loops, so for this model it reports one layer of one micro-batch."""
    matmul_params = cfg.num_params - cfg.vocab_size * cfg.hidden_size
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
