"""DPO: the sigmoid loss against a frozen reference (upstream-training.md §3), as a jitted, sharded step.

A batch is `batches.pair_batch` (row 2i chosen, 2i + 1 rejected). The reference's sequence log-probs
are computed inside the step from the frozen reference params (upstream's default), or, with
`dpo.precompute_ref`, once before training (`precompute_reference`) and carried in the batch as
"ref_logps" [2N]; the step then never touches the reference.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from editx_jax import sharding
from editx_jax.config import DPOConfig, LLMConfig
from editx_jax.train import batches, losses
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


def reference_logps(ref_params, cfg: LLMConfig, batch: dict):
    return jax.lax.stop_gradient(sequence_logps(ref_params, master_config(cfg), batch))


def train_step(state: dict, ref_params, batch: dict, *, cfg: LLMConfig, dcfg: DPOConfig, tx):
    """One optimizer step. ref_params may be None when the batch carries "ref_logps"."""
    cfg = master_config(cfg)
    ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(ref_params, cfg, batch)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], ref, cfg, dcfg, batch)
    return apply_update(state, grads, tx), {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}


def eval_step(params, ref_params, batch: dict, *, cfg: LLMConfig, dcfg: DPOConfig):
    cfg = master_config(cfg)
    ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(ref_params, cfg, batch)
    loss, metrics = loss_fn(params, ref, cfg, dcfg, batch)
    return {"loss": loss, **metrics}


def make_train_step(cfg: LLMConfig, dcfg: DPOConfig, tx, mesh, sh: dict | None = None):
    """`step(state, ref_params, batch)`: the policy state donated, the reference sharded like the policy.
    `sh`: the run's `llm_state_shardings`."""
    sh = sh or llm_state_shardings(cfg, tx, mesh)
    fn = functools.partial(train_step, cfg=cfg, dcfg=dcfg, tx=tx)
    return sharded_step(fn, mesh, (sh, sh["params"]), (sh, sharding.replicated(mesh)), donate=(0,))


def make_eval_step(cfg: LLMConfig, dcfg: DPOConfig, tx, mesh, sh: dict | None = None):
    sh = (sh or llm_state_shardings(cfg, tx, mesh))["params"]
    return sharded_step(functools.partial(eval_step, cfg=cfg, dcfg=dcfg), mesh, (sh, sh), sharding.replicated(mesh))


def make_batch(prompts, chosen, rejected, length=None, pad_id: int = 0) -> dict:
    b = batches.pair_batch(prompts, chosen, rejected, length, pad_id)
    return {k: b[k] for k in INPUT_KEYS}


def precompute_reference(ref_params, cfg: LLMConfig, pair_batches, mesh=None) -> list[dict]:
    """The batches with "ref_logps" added (the `dpo.precompute_ref` option): one reference pass each."""
    fn = jax.jit(functools.partial(reference_logps, cfg=cfg))
    out = []
    for b in pair_batches:
        out.append({**b, "ref_logps": np.asarray(fn(ref_params, batch=b))})
    return out


def evaluate(eval_fn, params, ref_params, held) -> dict:
    tot, n = {}, 0
    for b in held:
        m = jax.device_get(eval_fn(params, ref_params, b))
        k = b["tokens"].shape[0] // 2
        for key, v in m.items():
            tot[key] = tot.get(key, 0.0) + float(v) * k
        n += k
    return {k: v / max(n, 1) for k, v in tot.items()}
