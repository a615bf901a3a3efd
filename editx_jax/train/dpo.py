"""DPO: the sigmoid loss against a frozen reference (upstream-training.md §3), as a jitted, sharded step.

A batch is `batches.pair_batch` (row 2i chosen, 2i + 1 rejected). The reference's sequence log-probs
are computed inside the step from the frozen reference params (upstream's default; train.micro_batch
rows per forward), or, with `dpo.precompute_ref`, once before training over the whole pair set (the
run's `reference_step` over every pair, kept in the run folder, train/runs/dpo.py) and carried in the
batch as "ref_logps" [2N]; the step then never touches the reference.
With train.grad_accum = n the gradient is a scan over n micro-batches of whole pairs; the loss is a
mean over pairs and every micro-batch holds as many, so the step's loss is the mean of theirs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from editx_jax import sharding
from editx_jax.config import DPOConfig, LLMConfig
from editx_jax.train import batches, losses, micro
from editx_jax.train.jit import sharded_step
from editx_jax.train.logprobs import sequence_logps
from editx_jax.train.state import apply_update, llm_state_shardings, master_config

INPUT_KEYS = ("tokens", "targets", "positions", "segment_ids", "action_mask")


def loss_fn(params, ref_logps, cfg: LLMConfig, dcfg: DPOConfig, batch: dict):
    logps = sequence_logps(params, cfg, batch)
    loss, metrics = losses.dpo_loss(logps[0::2], logps[1::2], ref_logps[0::2], ref_logps[1::2], dcfg.beta,
                                    dcfg.label_smoothing)
    metrics["logps_chosen"] = jax.numpy.mean(logps[0::2])
    metrics["logps_rejected"] = jax.numpy.mean(logps[1::2])
    return loss, metrics


def reference_logps(ref_params, batch: dict, *, cfg: LLMConfig, micro_batch: int = 0):
    """The frozen reference's sequence log-probs [2N], `micro_batch` rows per forward (0: all at once)."""
    cfg = master_config(cfg)
    return jax.lax.stop_gradient(micro.map_rows(lambda b: sequence_logps(ref_params, cfg, b), batch, micro_batch))


def _reference(ref_params, batch: dict, cfg: LLMConfig, micro_batch: int):
    if "ref_logps" in batch:
        return batch["ref_logps"]
    return reference_logps(ref_params, {k: batch[k] for k in INPUT_KEYS}, cfg=cfg, micro_batch=micro_batch)


def train_step(state: dict, ref_params, batch: dict, *, cfg: LLMConfig, dcfg: DPOConfig, tx, grad_accum: int = 1,
               micro_batch: int = 0):
    """One optimizer step. ref_params may be None when the batch carries "ref_logps"."""
    cfg = master_config(cfg)
    ref = _reference(ref_params, batch, cfg, micro_batch)
    if grad_accum == 1:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], ref, cfg, dcfg, batch)
    else:
        def share(params, mb):
            loss, m = loss_fn(params, mb["ref_logps"], cfg, dcfg, mb)
            return loss / grad_accum, m
        mbs = {**{k: batch[k] for k in INPUT_KEYS}, "ref_logps": ref}
        objectives, metrics, grads = micro.accumulate(share, state["params"], mbs, grad_accum, group=2)
        loss, metrics = jnp.sum(objectives), jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), metrics)
    return apply_update(state, grads, tx), {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}


def eval_step(params, ref_params, batch: dict, *, cfg: LLMConfig, dcfg: DPOConfig, micro_batch: int = 0):
    cfg = master_config(cfg)
    ref = _reference(ref_params, batch, cfg, micro_batch)
    loss, metrics = loss_fn(params, ref, cfg, dcfg, batch)
    return {"loss": loss, **metrics}


def make_train_step(cfg: LLMConfig, dcfg: DPOConfig, tx, mesh, sh: dict | None = None, grad_accum: int = 1,
                    micro_batch: int = 0):
    """`step(state, ref_params, batch)`: the policy state donated, the reference sharded like the policy.
    `sh`: the run's `llm_state_shardings`."""
    sh = sh or llm_state_shardings(cfg, tx, mesh)
    fn = functools.partial(train_step, cfg=cfg, dcfg=dcfg, tx=tx, grad_accum=grad_accum, micro_batch=micro_batch)
    return sharded_step(fn, mesh, (sh, sh["params"]), (sh, sharding.replicated(mesh)), donate=(0,))


def make_eval_step(cfg: LLMConfig, dcfg: DPOConfig, tx, mesh, sh: dict | None = None, micro_batch: int = 0):
    sh = (sh or llm_state_shardings(cfg, tx, mesh))["params"]
    return sharded_step(functools.partial(eval_step, cfg=cfg, dcfg=dcfg, micro_batch=micro_batch), mesh, (sh, sh),
                        sharding.replicated(mesh))


def make_reference_step(cfg: LLMConfig, tx, mesh, sh: dict | None = None, micro_batch: int = 0):
    """`ref(ref_params, batch) -> [2N]` sequence log-probs (the `dpo.precompute_ref` pass), jitted with
    the reference sharded like the policy."""
    sh = (sh or llm_state_shardings(cfg, tx, mesh))["params"]
    return sharded_step(functools.partial(reference_logps, cfg=cfg, micro_batch=micro_batch), mesh, (sh,),
                        sharding.replicated(mesh))


def make_batch(prompts, chosen, rejected, length=None, pad_id: int = 0) -> dict:
    b = batches.pair_batch(prompts, chosen, rejected, length, pad_id)
    return {k: b[k] for k in INPUT_KEYS}


def precompute_reference(ref_params, cfg: LLMConfig, pair_batches, micro_batch: int = 0) -> list[dict]:
    """The batches with "ref_logps" added, one reference pass each (unsharded; a run uses
    `make_reference_step` over its whole pair set, train/runs/dpo.py)."""
    fn = jax.jit(functools.partial(reference_logps, cfg=cfg, micro_batch=micro_batch))
    return [{**b, "ref_logps": np.asarray(fn(ref_params, b))} for b in pair_batches]


def evaluate(eval_fn, params, ref_params, held) -> dict:
    tot, n = {}, 0
    for b in held:
        m = jax.device_get(eval_fn(params, ref_params, b))
        k = b["tokens"].shape[0] // 2
        for key, v in m.items():
            tot[key] = tot.get(key, 0.0) + float(v) * k
        n += k
    return {k: v / max(n, 1) for k, v in tot.items()}
