"""GRPO (upstream-training.md §4): G samples per prompt from our sampler, pluggable rewards, group
advantages (r - mean) / (std + 1e-4), the token-mean clipped loss with k3 KL to a frozen reference.

One iteration = one generation batch: sample (host loop around the jitted sampler), score (host),
then `grpo.iterations` optimizer steps on the whole batch (1, upstream: pi_old = pi, so the ratio is 1
and only its gradient matters). The step is jitted with the policy state's and the batch's shardings.
With train.grad_accum = n the gradient is a scan over n micro-batches of rows, each micro-batch's
token sum divided by the WHOLE batch's token count (upstream's global token mean, so accumulated ==
unaccumulated); the reference / pi_old log-prob pass runs train.micro_batch rows per forward.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from editx_jax import sharding
from editx_jax.config import GenerationConfig, GRPOConfig, LLMConfig
from editx_jax.train import batches, losses, micro, rollout
from editx_jax.train.jit import sharded_step
from editx_jax.train.logprobs import token_logps
from editx_jax.train.state import apply_update, llm_state_shardings, master_config

INPUT_KEYS = ("tokens", "targets", "positions", "segment_ids", "action_mask")


def loss_fn(params, cfg: LLMConfig, gcfg: GRPOConfig, batch: dict, num_tokens=None):
    """(loss, metrics); num_tokens: the whole step's loss tokens (default: this batch's)."""
    logp = token_logps(params, cfg, batch, gcfg.temperature)
    old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
    mask = batch["action_mask"]
    loss, metrics = losses.grpo_loss(logp, old, batch["ref_logps"], batch["advantages"], mask, gcfg.clip,
                                     gcfg.beta, num_tokens=num_tokens, clip_high=gcfg.clip_high)
    return loss, metrics


def train_step(state: dict, batch: dict, *, cfg: LLMConfig, gcfg: GRPOConfig, tx, grad_accum: int = 1):
    cfg = master_config(cfg)
    if grad_accum == 1:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], cfg, gcfg, batch)
    else:
        total = jnp.maximum(jnp.sum(batch["action_mask"]), 1.0)

        def share(params, mb):  # token sums over the global count; the token-mean metrics weighted alike
            loss, m = loss_fn(params, cfg, gcfg, mb, num_tokens=total)
            return loss, jax.tree_util.tree_map(lambda v: v * jnp.sum(mb["action_mask"]) / total, m)
        objectives, metrics, grads = micro.accumulate(share, state["params"], batch, grad_accum)
        loss, metrics = jnp.sum(objectives), jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), metrics)
    return apply_update(state, grads, tx), {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}


def ref_step(ref_params, batch: dict, *, cfg: LLMConfig, temperature: float, micro_batch: int = 0):
    cfg = master_config(cfg)
    return micro.map_rows(lambda b: token_logps(ref_params, cfg, b, temperature), batch, micro_batch)


def make_train_step(cfg: LLMConfig, gcfg: GRPOConfig, tx, mesh, sh: dict | None = None, grad_accum: int = 1):
    """`step(state, batch)`, the policy state donated; `sh`: the run's `llm_state_shardings`."""
    sh = sh or llm_state_shardings(cfg, tx, mesh)
    fn = functools.partial(train_step, cfg=cfg, gcfg=gcfg, tx=tx, grad_accum=grad_accum)
    return sharded_step(fn, mesh, (sh,), (sh, sharding.replicated(mesh)), donate=(0,))


def make_ref_step(cfg: LLMConfig, gcfg: GRPOConfig, tx, mesh, sh: dict | None = None, micro_batch: int = 0):
    """`ref(params, batch) -> [N, T]` token log-probs (reference, or pi_old), `micro_batch` rows per forward."""
    sh = (sh or llm_state_shardings(cfg, tx, mesh))["params"]
    return sharded_step(functools.partial(ref_step, cfg=cfg, temperature=gcfg.temperature, micro_batch=micro_batch),
                        mesh, (sh,), sharding.replicated(mesh))


def sampling_config(gcfg: GRPOConfig, base: GenerationConfig | None = None) -> GenerationConfig:
    """Upstream's sampling: temperature 1.0, no top-k / top-p, no repetition rule, max_new_tokens."""
    base = base or GenerationConfig()
    return dataclasses.replace(base, greedy=False, temperature=gcfg.temperature, top_k=0, top_p=1.0,
                               repetition_window=0, max_new_tokens=gcfg.max_new_tokens, drop_last=False)


@flax.struct.dataclass
class GRPOState:
    """What one GRPO iteration reads and returns: the policy train state and the frozen reference."""
    policy: dict
    ref: Any


class GRPO:
    """GRPO's fixed parts: configs, reward functions and the jitted steps (built once).

    `iteration(state, prompts, records, key) -> (state, metrics)` samples G completions per prompt,
    scores them, and trains; it keeps nothing between calls. prompts: a list of id lists (its length
    x G must divide over the batch shards)."""

    def __init__(self, cfg: LLMConfig, gcfg: GRPOConfig, tx, mesh, reward_fns, gen: GenerationConfig | None = None,
                 pad_id: int = 0, sample_mesh=None, shardings: dict | None = None, grad_accum: int = 1,
                 micro_batch: int = 0):
        self.cfg, self.gcfg, self.mesh, self.pad_id = cfg, gcfg, mesh, pad_id
        self.fns = [rollout.resolve(f) for f in reward_fns]
        self.weights = gcfg.reward_weights or None
        self.gen = sampling_config(gcfg, gen)
        sh = shardings or llm_state_shardings(cfg, tx, mesh)
        self.step_fn = make_train_step(cfg, gcfg, tx, mesh, sh, grad_accum)
        self.ref_fn = make_ref_step(cfg, gcfg, tx, mesh, sh, micro_batch)
        self.sample_mesh = sample_mesh

    def iteration(self, state: GRPOState, prompts, records, key) -> tuple[GRPOState, dict]:
        g = self.gcfg.group_size
        policy = state.policy
        t0 = time.perf_counter()
        rows, completions = rollout.sample_completions(policy["params"], self.cfg, self.gen, prompts, key, g,
                                                       mesh=self.sample_mesh)
        t1 = time.perf_counter()
        recs = [r for r in records for _ in range(g)]
        total, parts = rollout.score(self.fns, self.weights, rows, completions, recs)
        t2 = time.perf_counter()
        adv = np.asarray(losses.group_advantages(jnp.asarray(total), g))
        batch = batches.sequence_batch(rows, completions, pad_id=self.pad_id, allow_empty=True)
        batch = {k: batch[k] for k in INPUT_KEYS}
        batch["advantages"] = adv.astype(np.float32)
        batch["ref_logps"] = np.asarray(self.ref_fn(state.ref, batch))
        if self.gcfg.iterations > 1:  # pi_old: the policy that sampled, frozen for the inner steps
            batch["old_logps"] = np.asarray(self.ref_fn(policy["params"], batch))
        t3 = time.perf_counter()
        for _ in range(self.gcfg.iterations):
            policy, m = self.step_fn(policy, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        t4 = time.perf_counter()
        # seconds of this iteration: sampling, reward functions, the reference log-prob pass, updates
        m.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/prepare": t3 - t2, "time/update": t4 - t3})
        groups = total.reshape(-1, g)
        m.update(reward_mean=float(total.mean()), reward_group_std=float(groups.std(axis=1, ddof=1).mean()),
                 completion_length=float(np.mean([len(c) for c in completions])))
        for name, r in parts.items():
            m[f"reward/{name}"] = float(np.nanmean(r))
        return state.replace(policy=policy), m
