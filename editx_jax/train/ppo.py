"""PPO with a frozen reference, a reward (a reward model or any reward function) and a critic.

Roles: the policy (a train state), the reference (frozen params, the initial policy), the reward
(`rollout.RewardFn`: `rollout.reward_model_fn(...)` for the Bradley-Terry model), the critic (a
`models.reward` score model with per-token outputs, a train state; initialised from the reward model,
`ppo.value_init="reward"`, or from the policy trunk with a zero head). The policy and the reference
live on one mesh; the critic on the same mesh or on its own (`value_mesh`, `ppo.critic_devices`);
the reward model wherever its params are. Rollout arrays cross between meshes through the host.

One iteration:
  1. rollouts from the jitted sampler (temperature, top-k, the repetition rule of `generation`);
  2. `prepare` (jitted; split into `policy_side`, `critic_side`, `advantages`): per-token log-probs of policy and reference, values, entropy; per-token rewards
     -kl_beta * (logp - ref_logp) with the sequence reward added at the last response token; GAE
     (reverse `lax.scan`); advantage whitening;
  3. `ppo.epochs` passes of `ppo.minibatches` minibatches: the clipped value loss for the critic and,
     after `ppo.critic_warmup` iterations, the clipped policy loss.
Memory: the no-grad passes of step 2 run train.micro_batch rows per forward (a `lax.map`); each
minibatch's gradient is a scan over train.grad_accum micro-batches whose token sums are divided by the
minibatch's token count (the token means of the unsplit minibatch, so accumulated == unaccumulated).
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
from editx_jax.config import GenerationConfig, LLMConfig, PPOConfig
from editx_jax.models import reward as rm
from editx_jax.train import batches, losses, micro, rollout
from editx_jax.train.jit import sharded_step
from editx_jax.train.logprobs import token_logps
from editx_jax.train.reward import shardings as value_shardings
from editx_jax.train.state import apply_update, llm_state_shardings, master_config

INPUT_KEYS = ("tokens", "targets", "positions", "segment_ids", "action_mask", "response_mask")


def critic_values(params, cfg: LLMConfig, batch: dict):
    """V at each position [N, T]: the value of the state before the token at t + 1 is chosen."""
    return rm.scores(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"])


def policy_side(policy_params, ref_params, batch: dict, *, cfg: LLMConfig, pcfg: PPOConfig, micro_batch: int = 0):
    """Per-token log-probs of the policy and the reference, and the policy's entropy ([N, T] each),
    `micro_batch` rows per forward (0: all at once)."""
    cfg = master_config(cfg)

    def one(b):
        logp, entropy = token_logps(policy_params, cfg, b, pcfg.temperature, with_entropy=True)
        return {"logp": logp, "ref_logp": token_logps(ref_params, cfg, b, pcfg.temperature), "entropy": entropy}
    return micro.map_rows(one, batch, micro_batch)


def critic_side(value_params, batch: dict, *, cfg: LLMConfig, micro_batch: int = 0):
    cfg = master_config(cfg)
    return micro.map_rows(lambda b: critic_values(value_params, cfg, b) * b["action_mask"], batch, micro_batch)


def advantages(batch: dict, *, pcfg: PPOConfig):
    """The rollout batch with "logp", "ref_logp", "entropy", "values" [N, T] and sequence "scores" [N]
    -> everything the update needs (all [N, T]) and statistics: per-token KL penalty, the score at the
    last response token, GAE, optional whitening."""
    mask, logp, ref, values = batch["action_mask"], batch["logp"], batch["ref_logp"], batch["values"]
    kl = (logp - ref) * mask
    cols = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, cols, -1), axis=1)
    rewards = -pcfg.kl_beta * kl + jnp.where(cols[None] == last[:, None], batch["scores"][:, None], 0.0)
    adv, returns = losses.gae(rewards * mask, values, mask, pcfg.gamma, pcfg.lam)
    if pcfg.whiten_advantages:
        adv = losses.whiten(adv, mask)
    stats = {"kl": jnp.mean(jnp.sum(kl, axis=1)), "kl_k3_token": losses.masked_mean(losses.k3_kl(logp, ref), mask),
             "entropy": losses.masked_mean(batch["entropy"], mask), "response_length": jnp.mean(jnp.sum(mask, axis=1)),
             "value_mean": losses.masked_mean(values, mask)}
    return {"old_logps": logp * mask, "old_values": values, "advantages": adv, "returns": returns}, stats


def prepare(policy_params, ref_params, value_params, batch: dict, *, cfg: LLMConfig, pcfg: PPOConfig):
    """Rollout batch + sequence "scores" [N] -> everything the update needs, all roles on one device set."""
    sides = {**policy_side(policy_params, ref_params, batch, cfg=cfg, pcfg=pcfg),
             "values": critic_side(value_params, batch, cfg=cfg)}
    return advantages({**batch, **sides}, pcfg=pcfg)


def policy_loss(params, cfg: LLMConfig, pcfg: PPOConfig, mb: dict):
    logp = token_logps(params, cfg, mb, pcfg.temperature)
    loss, clipfrac, approx_kl = losses.ppo_policy_loss(logp, mb["old_logps"], mb["advantages"], mb["action_mask"],
                                                       pcfg.clip)
    return loss, {"policy_loss": loss, "clip_fraction": clipfrac, "approx_kl": approx_kl}


def value_loss(params, cfg: LLMConfig, pcfg: PPOConfig, mb: dict):
    v = critic_values(params, cfg, mb)
    loss, vclip = losses.ppo_value_loss(v, mb["old_values"], mb["returns"], mb["action_mask"], pcfg.value_clip)
    ev = losses.explained_variance(v, mb["returns"], mb["action_mask"])
    return loss, {"value_loss": loss, "value_clip_fraction": vclip, "explained_variance": ev, "values": v}


def _token_share(loss_fn, mb: dict):
    """loss_fn's token-mean loss and metrics as this micro-batch's share of the minibatch's token mean."""
    total = jnp.maximum(jnp.sum(mb["action_mask"]), 1.0)

    def share(params, m):
        loss, metrics = loss_fn(params, m)
        w = jnp.sum(m["action_mask"]) / total
        values = metrics.pop("values", None)
        weighted = {k: v * w for k, v in metrics.items() if k != "explained_variance"}
        return loss * w, (weighted, values)
    return share


def policy_step(state, mb, *, cfg, pcfg, tx, grad_accum: int = 1):
    cfg = master_config(cfg)
    if grad_accum == 1:
        (_, m), g = jax.value_and_grad(policy_loss, has_aux=True)(state["params"], cfg, pcfg, mb)
    else:
        share = _token_share(lambda p, m: policy_loss(p, cfg, pcfg, m), mb)
        _, (m, _), g = micro.accumulate(share, state["params"], mb, grad_accum)
        m = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), m)
    return apply_update(state, g, tx), {**m, "policy_grad_norm": optax.tree.norm(g)}


def value_step(state, mb, *, cfg, pcfg, tx, grad_accum: int = 1):
    cfg = master_config(cfg)
    if grad_accum == 1:
        (_, m), g = jax.value_and_grad(value_loss, has_aux=True)(state["params"], cfg, pcfg, mb)
        m.pop("values")
    else:
        share = _token_share(lambda p, m: value_loss(p, cfg, pcfg, m), mb)
        _, (m, values), g = micro.accumulate(share, state["params"], mb, grad_accum)
        m = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), m)
        # explained variance is not a token mean: computed once over the whole minibatch's values
        m["explained_variance"] = losses.explained_variance(micro.merge(values), mb["returns"], mb["action_mask"])
    return apply_update(state, g, tx), {**m, "value_grad_norm": optax.tree.norm(g)}


@flax.struct.dataclass
class PPOState:
    """What one PPO iteration reads and returns. `iterations` (done so far) gates the critic warm-up;
    a run sets it from the step, so a resumed run needs nothing but its checkpointed trees."""
    policy: dict
    ref: Any
    value: dict
    iterations: int = flax.struct.field(pytree_node=False, default=0)


class PPO:
    """PPO's fixed parts: configs, reward functions and the jitted steps (built once).
    `iteration(state, prompts, records, key) -> (state, metrics)` runs one rollout batch (see the
    module doc) and keeps nothing between calls."""

    def __init__(self, cfg: LLMConfig, pcfg: PPOConfig, gen: GenerationConfig, policy_tx, value_tx, mesh,
                 reward_fns, reward_weights=None, pad_id: int = 0, sample_mesh=None, value_mesh=None,
                 policy_shardings: dict | None = None, value_state_shardings: dict | None = None,
                 grad_accum: int = 1, micro_batch: int = 0):
        """mesh: the policy's and the reference's. value_mesh: the critic's (state placed with
        `value_shardings(cfg, value_tx, value_mesh)`); by default the same mesh. Rollout arrays move
        between the two through the host. The shardings default to the ones derived from the meshes."""
        self.cfg, self.pcfg, self.gen, self.mesh, self.pad_id = cfg, pcfg, gen, mesh, pad_id
        self.fns, self.weights = [rollout.resolve(f) for f in reward_fns], reward_weights
        self.sample_mesh = sample_mesh
        self.value_mesh = value_mesh or mesh
        psh = policy_shardings or llm_state_shardings(cfg, policy_tx, mesh)
        vsh = value_state_shardings or value_shardings(cfg, value_tx, self.value_mesh)
        rep, vrep = sharding.replicated(mesh), sharding.replicated(self.value_mesh)
        self.policy_side_fn = sharded_step(functools.partial(policy_side, cfg=cfg, pcfg=pcfg, micro_batch=micro_batch),
                                           mesh, (psh["params"], psh["params"]), rep)
        self.critic_side_fn = sharded_step(functools.partial(critic_side, cfg=cfg, micro_batch=micro_batch),
                                           self.value_mesh, (vsh["params"],), vrep)
        self.advantages_fn = sharded_step(functools.partial(advantages, pcfg=pcfg), mesh, (), rep)
        self.policy_fn = sharded_step(functools.partial(policy_step, cfg=cfg, pcfg=pcfg, tx=policy_tx,
                                                        grad_accum=grad_accum), mesh, (psh,), (psh, rep), donate=(0,))
        self.value_fn = sharded_step(functools.partial(value_step, cfg=cfg, pcfg=pcfg, tx=value_tx,
                                                       grad_accum=grad_accum), self.value_mesh, (vsh,), (vsh, vrep),
                                     donate=(0,))

    def iteration(self, state: PPOState, prompts, records, key) -> tuple[PPOState, dict]:
        pcfg = self.pcfg
        policy, value = state.policy, state.value
        k_sample, k_perm = jax.random.split(key)
        gen = self.gen if self.gen.max_new_tokens == pcfg.max_new_tokens else \
            dataclasses.replace(self.gen, max_new_tokens=pcfg.max_new_tokens)
        t0 = time.perf_counter()
        rows, completions = rollout.sample_completions(policy["params"], self.cfg, gen, prompts, k_sample,
                                                       mesh=self.sample_mesh)
        t1 = time.perf_counter()
        scores, parts = rollout.score(self.fns, self.weights, rows, completions, records)
        t2 = time.perf_counter()
        batch = batches.sequence_batch(rows, completions, pad_id=self.pad_id, allow_empty=True)
        batch = {k: batch[k] for k in INPUT_KEYS}
        batch["scores"] = scores
        sides = jax.device_get(self.policy_side_fn(policy["params"], state.ref, batch))
        sides["values"] = np.asarray(self.critic_side_fn(value["params"], batch))
        prepared, stats = self.advantages_fn({**batch, **sides})
        data = {**batch, **{k: np.asarray(v) for k, v in prepared.items()}}
        t3 = time.perf_counter()
        del data["scores"]
        n = len(rows)
        if n % pcfg.minibatches:
            raise ValueError(f"ppo.minibatches {pcfg.minibatches} does not divide the rollout batch of {n}")
        size = n // pcfg.minibatches
        train_policy = state.iterations >= pcfg.critic_warmup
        metrics = []
        perm_key = k_perm
        for _ in range(pcfg.epochs):
            perm_key, sub = jax.random.split(perm_key)
            order = np.asarray(jax.random.permutation(sub, n))
            for i in range(pcfg.minibatches):
                idx = order[i * size:(i + 1) * size]
                mb = {k: v[idx] for k, v in data.items()}
                value, mv = self.value_fn(value, mb)
                m = dict(mv)
                if train_policy:
                    policy, mp = self.policy_fn(policy, mb)
                    m.update(mp)
                metrics.append(m)
        out = {k: float(np.mean([float(x[k]) for x in metrics])) for k in metrics[-1]}  # (waits for the steps)
        t4 = time.perf_counter()
        # seconds of this iteration: sampling, reward functions, the log-prob / value / GAE pass, updates
        out.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/prepare": t3 - t2, "time/update": t4 - t3})
        out.update({k: float(v) for k, v in jax.device_get(stats).items()})
        out["reward_mean"] = float(np.mean(scores))
        out["policy_trained"] = float(train_policy)
        for name, r in parts.items():
            out[f"reward/{name}"] = float(np.nanmean(r))
        if pcfg.kl_bound and out["kl"] > pcfg.kl_bound:
            out["kl_over_bound"] = 1.0
        return state.replace(policy=policy, value=value, iterations=state.iterations + 1), out


def init_value_params(reward_params=None, policy_params=None) -> dict:
    """The critic's initial params: a copy of the reward model (ppo.value_init="reward"), or the policy's
    trunk with a zero head ("policy")."""
    if reward_params is not None:
        return jax.tree_util.tree_map(jnp.array, reward_params)
    if policy_params is None:
        raise ValueError("the critic needs reward-model params or policy params to start from")
    return rm.from_llm_params(policy_params)
