"""The reward model and the PPO critic: the Step1 trunk plus a scalar head.

Params tree: `trunk/...` is exactly the LLM's tree without `lm_head` (so an SFT checkpoint initialises
it by dropping `lm_head`), `score/kernel` [E] and `score/bias` [] the head.

The module returns one score per token [B, T] (the dense, per-token output, and the critic's values);
`readout` turns it into one reward per sequence: the score at the last response token (default) or
the mean over the response tokens.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from editx_jax.config import ConfigError, LLMConfig
from editx_jax.models.llm import Step1


class ScoreModel(nn.Module):
    """tokens, positions, segment_ids [B, T] -> scores [B, T] (float32)."""

    cfg: LLMConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids=None):
        hidden = Step1(self.cfg, name="trunk")(tokens, positions, segment_ids, return_hidden=True)
        # A zero-initialised head: every sequence starts at reward 0, and a critic made from a policy
        # starts at value 0 rather than at noise.
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                            (self.cfg.hidden_size,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (), jnp.float32)
        return jnp.einsum("bte,e->bt", hidden.astype(jnp.float32), kernel) + bias


def _wrap(params):
    """The Score head lives beside the trunk under the module root: {trunk, kernel, bias} ->
    readable {trunk, score: {kernel, bias}} for users, and back."""
    return {"trunk": params["trunk"], "score": {"kernel": params["kernel"], "bias": params["bias"]}}


def _unwrap(params):
    return {"trunk": params["trunk"], "kernel": params["score"]["kernel"], "bias": params["score"]["bias"]}


def scores(params, cfg: LLMConfig, tokens, positions, segment_ids=None):
    """Per-token scores [B, T] of a {trunk, score} params tree."""
    return ScoreModel(cfg).apply({"params": _unwrap(params)}, tokens, positions, segment_ids)


def readout(token_scores, response_mask, mode: str = "last"):
    """One reward per row [B]: the score at the last token where response_mask is 1, or the mean over them.
    (A row without response tokens reads the score of its column 0 / gives 0.)"""
    mask = response_mask.astype(jnp.float32)
    if mode == "mean":
        return jnp.sum(token_scores * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    if mode != "last":
        raise ConfigError(f"reward.readout: one of ('last', 'mean'), got {mode!r}")
    cols = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, cols, 0), axis=1)
    return jnp.take_along_axis(token_scores, last[:, None], axis=1)[:, 0]


def _boxed(cfg: LLMConfig):
    t = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: ScoreModel(cfg).init(jax.random.key(0), t, t)["params"])


def param_logical_axes(cfg: LLMConfig):
    spec = nn.get_partition_spec(_boxed(cfg))
    return _wrap(spec)


def abstract_params(cfg: LLMConfig):
    return _wrap(nn.meta.unbox(_boxed(cfg)))


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_params(cfg: LLMConfig, key) -> dict:
    t = jnp.zeros((1, 1), jnp.int32)
    return _wrap(nn.meta.unbox(ScoreModel(cfg).init(key, t, t)["params"]))


def from_llm_params(llm_params: dict, head: dict | None = None) -> dict:
    """A score model whose trunk is an LLM's params (the SFT checkpoint; `lm_head` dropped) and whose
    head is `head` (default zeros)."""
    trunk = {k: v for k, v in llm_params.items() if k != "lm_head"}
    e = trunk["final_norm"]["scale"].shape[-1]
    head = head or {"kernel": jnp.zeros((e,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}
    return {"trunk": trunk, "score": dict(head)}


def check_compatible(score_cfg: LLMConfig, policy_cfg: LLMConfig, role: str = "reward model") -> None:
    """A reward model / critic reads the policy's token ids: its vocabulary must be the policy's."""
    if score_cfg.vocab_size != policy_cfg.vocab_size:
        raise ConfigError(f"{role}: its trunk has vocab_size {score_cfg.vocab_size} but the policy has "
                          f"{policy_cfg.vocab_size}; it cannot score the policy's tokens")
