"""Pure loss and advantage functions of the preference / RL stage (reward model, DPO, PPO, GRPO).

Conventions: arrays are float32; a `mask` is 1.0 on the tokens that count and 0.0 elsewhere; per-token
arrays are [B, T] aligned with next-token targets (position t scores the token at t + 1). The exact
upstream formulas are cited from `upstream-training.md` (§3 DPO, §4 GRPO); the reward-model and PPO
pieces follow the usual RLHF definitions (the paper's own are unpublished, training.md §1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class LossInputError(ValueError):
    """Arguments of a loss do not fit together (e.g. a group size that does not divide the batch)."""


def masked_sum(x, mask, axis=None):
    return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None):
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def token_log_probs(logits, targets, temperature: float = 1.0):
    """log p(target) per token [B, T] from logits [B, T, V] (float32; logits / temperature first, as
    TRL does for GRPO so the scored distribution is the sampled one)."""
    logits = logits.astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits, temperature: float = 1.0):
    """Entropy of the next-token distribution per position [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ---------------------------------------------------------------------------- reward model


def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
    """-log sigmoid(r_c - r_r - margin), mean over pairs, + center_coef * mean((r_c + r_r)^2).

    The optional margin (per pair, e.g. from a judge's score difference) asks the chosen reward to lead
    by at least that much (Llama-2's margin loss); the centering term keeps rewards near zero (TRL's
    `center_rewards_coefficient`). Returns (loss, metrics): accuracy = share of pairs with r_c > r_r,
    margin = mean(r_c - r_r).
    """
    diff = r_chosen - r_rejected
    shifted = diff if margin is None else diff - margin
    loss = -jnp.mean(jax.nn.log_sigmoid(shifted))
    if center_coef:
        loss = loss + center_coef * jnp.mean((r_chosen + r_rejected) ** 2)
    metrics = {"accuracy": jnp.mean((diff > 0).astype(jnp.float32)), "margin": jnp.mean(diff),
               "reward_chosen": jnp.mean(r_chosen), "reward_rejected": jnp.mean(r_rejected)}
    return loss, metrics


# ---------------------------------------------------------------------------- DPO


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """TRL's sigmoid DPO loss (upstream-training.md §3.2) on sequence log-probs [B]:
    L = -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]), mean over pairs (with label smoothing
    eps: (1 - eps) * that + eps * -log sigmoid(-beta * ...); upstream uses 0).

    Metrics: implicit rewards beta * (pi - ref) of both sides, reward accuracy (chosen > rejected) and
    reward margin (their mean difference)."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
              - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
    chosen_r = beta * jax.lax.stop_gradient(policy_chosen - ref_chosen)
    rejected_r = beta * jax.lax.stop_gradient(policy_rejected - ref_rejected)
    metrics = {"rewards_chosen": jnp.mean(chosen_r), "rewards_rejected": jnp.mean(rejected_r),
               "reward_accuracy": jnp.mean((chosen_r > rejected_r).astype(jnp.float32)),
               "reward_margin": jnp.mean(chosen_r - rejected_r)}
    return jnp.mean(losses), metrics


# ---------------------------------------------------------------------------- PPO


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over [B, T] with a reverse `lax.scan`.

    `mask` marks the action tokens of each row (one contiguous run; the episode ends after the last one,
    so the value after it is 0). Returns (advantages, returns = advantages + values), both 0 off the mask.
    delta_t = r_t + gamma * V_{t+1} m_{t+1} - V_t,  A_t = delta_t + gamma * lam * m_{t+1} A_{t+1}.
    """
    rewards, values, mask = (jnp.asarray(a, jnp.float32) for a in (rewards, values, mask))
    next_values = jnp.concatenate([values[:, 1:] * mask[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(carry, xs):
        delta, nm = xs
        adv = delta + gamma * lam * nm * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32), (deltas.T, next_mask.T), reverse=True)
    adv = adv.T * mask
    return adv, (adv + values) * mask


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over the masked entries (population variance, as TRL's `masked_whiten`);
    shift_mean=False keeps the mean (used for rewards)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2):
    """Clipped surrogate, token mean: max(-A rho, -A clip(rho, 1 -+ clip)). Returns (loss, clip fraction,
    approximate KL to the rollout policy (k3))."""
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(loss1, loss2), mask)
    clipfrac = masked_mean((loss2 > loss1).astype(jnp.float32), mask)
    approx_kl = masked_mean(jnp.exp(-log_ratio) - 1.0 + log_ratio, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss, token mean: 0.5 * max((V - R)^2, (clip(V, V_old -+ clip) - R)^2).
    Returns (loss, fraction of tokens where the clipped term won)."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask)
    return loss, masked_mean((l2 > l1).astype(jnp.float32), mask)


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the masked tokens (1 = perfect critic, <= 0 = no better than a constant)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return 1.0 - var_e / jnp.maximum(var_r, 1e-8)


# ---------------------------------------------------------------------------- KL, GRPO


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0; TRL's GRPO)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """(r - mean_G) / (std_G + eps) per group of `group_size` consecutive rows, std unbiased (n - 1)
    (TRL `scale_rewards="group"`, upstream-training.md §4.1)."""
    n = rewards.shape[0]
    if group_size < 2:
        raise LossInputError(f"GRPO needs at least 2 samples per group, got group_size={group_size}")
    if n % group_size:
        raise LossInputError(f"group size {group_size} does not divide the batch of {n} samples")
    g = rewards.reshape(n // group_size, group_size)
    mean = jnp.mean(g, axis=1, keepdims=True)
    std = jnp.std(g, axis=1, keepdims=True, ddof=1)
    return ((g - mean) / (std + eps)).reshape(n)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip: float = 0.2, beta: float = 0.1,
              num_tokens=None, clip_high: float | None = None):
    """TRL's `dapo` GRPO loss (upstream-training.md §4.1): per token
    l_t = -min(rho A, clip(rho, 1 - clip, 1 + clip_high) A) + beta * k3_t, summed over this batch's
    masked tokens / `num_tokens` (the whole generation batch's token count; default: this batch's).

    advantages: [B] (one per sequence). Returns (loss, metrics)."""
    clip_high = clip if clip_high is None else clip_high
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip, 1.0 + clip_high) * adv)
    kl = k3_kl(logp, ref_logp)
    per_token = -surrogate + beta * kl
    n = jnp.sum(mask) if num_tokens is None else num_tokens
    n = jnp.maximum(n, 1.0)
    loss = jnp.sum(per_token * mask) / n
    clipped = ((ratio < 1.0 - clip) & (adv < 0)) | ((ratio > 1.0 + clip_high) & (adv > 0))
    metrics = {"kl": masked_mean(kl, mask), "clip_fraction": masked_mean(clipped.astype(jnp.float32), mask)}
    return loss, metrics
