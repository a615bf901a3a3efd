"""Per-token and per-sequence log-probs of a policy on a `batches.sequence_batch` (DPO, GRPO, PPO)."""

from __future__ import annotations

import jax.numpy as jnp

from editx_jax.config import LLMConfig
from editx_jax.models.llm import Step1
from editx_jax.train import losses


def token_logps(params, cfg: LLMConfig, batch: dict, temperature: float = 1.0, with_entropy: bool = False):
    """log pi(target) per position [N, T] (float32), and the entropy per position when asked."""
    logits = Step1(cfg).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    logp = losses.token_log_probs(logits, batch["targets"], temperature)
    if with_entropy:
        return logp, losses.token_entropy(logits, temperature)
    return logp


def sequence_logps(params, cfg: LLMConfig, batch: dict, temperature: float = 1.0):
    """Summed log-probs of each row's response tokens [N]."""
    return jnp.sum(token_logps(params, cfg, batch, temperature) * batch["action_mask"], axis=1)
