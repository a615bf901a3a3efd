"""Bradley-Terry reward-model training: pure step functions and their jitted, sharded forms.

A batch is `batches.pair_batch` (row 2i the chosen response, row 2i + 1 the rejected one, both in
one forward) plus "margin" [2N] (the pair's margin on both of its rows; used when reward.use_margin).
With train.grad_accum = n the step scans n micro-batches of whole pairs; the loss is a mean over
pairs and every micro-batch holds as many, so the step's loss is the mean of theirs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from editx_jax import sharding
from editx_jax.config import LLMConfig, RewardConfig
from editx_jax.models import reward as rm
from editx_jax.train import batches, losses, micro
from editx_jax.train.jit import sharded_step
from editx_jax.train.state import apply_update, master_config, state_shardings

INPUT_KEYS = ("tokens", "positions", "segment_ids", "response_mask")


def pair_rewards(params, cfg: LLMConfig, rcfg: RewardConfig, batch: dict):
    """(chosen rewards [N], rejected rewards [N]) of an interleaved pair batch."""
    s = rm.scores(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"])
    r = rm.readout(s, batch["response_mask"], rcfg.readout)
    return r[0::2], r[1::2]


def loss_fn(params, cfg: LLMConfig, rcfg: RewardConfig, batch: dict):
    rc, rr = pair_rewards(params, cfg, rcfg, batch)
    margin = batch["margin"][0::2] if rcfg.use_margin else None
    return losses.bradley_terry_loss(rc, rr, margin, rcfg.center_coef)


def train_step(state: dict, batch: dict, *, cfg: LLMConfig, rcfg: RewardConfig, tx, grad_accum: int = 1):
    cfg = master_config(cfg)
    if grad_accum == 1:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], cfg, rcfg, batch)
    else:
        def share(params, mb):  # equal pairs per micro-batch: the mean over pairs is the mean of the means
            loss, m = loss_fn(params, cfg, rcfg, mb)
            return loss / grad_accum, m
        objectives, metrics, grads = micro.accumulate(share, state["params"], batch, grad_accum, group=2)
        loss, metrics = jnp.sum(objectives), jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), metrics)
    return apply_update(state, grads, tx), {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}


def eval_step(params, batch: dict, *, cfg: LLMConfig, rcfg: RewardConfig):
    loss, metrics = loss_fn(params, master_config(cfg), rcfg, batch)
    return {"loss": loss, **metrics}


def shardings(cfg: LLMConfig, tx, mesh) -> dict:
    """The reward model's (and the PPO critic's) train-state shardings."""
    cfg = master_config(cfg)
    return state_shardings(rm.param_logical_axes(cfg), rm.abstract_params(cfg), tx, mesh)


def make_train_step(cfg: LLMConfig, rcfg: RewardConfig, tx, mesh, sh: dict | None = None, grad_accum: int = 1):
    """`step(state, batch)`, the state donated; `sh`: the run's `shardings(cfg, tx, mesh)`."""
    sh = sh or shardings(cfg, tx, mesh)
    fn = functools.partial(train_step, cfg=cfg, rcfg=rcfg, tx=tx, grad_accum=grad_accum)
    return sharded_step(fn, mesh, (sh,), (sh, sharding.replicated(mesh)), donate=(0,))


def make_eval_step(cfg: LLMConfig, rcfg: RewardConfig, tx, mesh, sh: dict | None = None):
    sh = (sh or shardings(cfg, tx, mesh))["params"]
    return sharded_step(functools.partial(eval_step, cfg=cfg, rcfg=rcfg), mesh, (sh,), sharding.replicated(mesh))


def make_batch(prompts, chosen, rejected, margins=None, length=None, pad_id: int = 0) -> dict:
    b = batches.pair_batch(prompts, chosen, rejected, length, pad_id)
    m = np.zeros(len(prompts), np.float32) if margins is None else np.asarray(margins, np.float32)
    b["margin"] = np.repeat(m, 2)
    return {k: b[k] for k in (*INPUT_KEYS, "margin")}


def evaluate(eval_fn, params, held) -> dict:
    """Pairwise accuracy / mean margin / loss over held-out batches (weighted by pairs)."""
    tot, n = {}, 0
    for b in held:
        m = jax.device_get(eval_fn(params, b))
        k = b["tokens"].shape[0] // 2
        for key, v in m.items():
            tot[key] = tot.get(key, 0.0) + float(v) * k
        n += k
    return {k: v / max(n, 1) for k, v in tot.items()}


def score_sequences(params, cfg: LLMConfig, rcfg: RewardConfig, batch: dict, micro_batch: int = 0):
    """(one reward per row [N], per-token scores [N, T]) of a `sequence_batch` (the reward-model reward
    of GRPO / PPO), `micro_batch` rows per forward (train.micro_batch; 0: all at once)."""
    def one(b):
        s = rm.scores(params, cfg, b["tokens"], b["positions"], b["segment_ids"])
        return rm.readout(s, b["response_mask"], rcfg.readout), s
    return micro.map_rows(one, batch, micro_batch)


score_jit = jax.jit(score_sequences, static_argnames=("cfg", "rcfg", "micro_batch"))
