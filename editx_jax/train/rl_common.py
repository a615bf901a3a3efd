"""What the reward-model, DPO, GRPO and PPO steps share: train states for any params tree (sharded by
the rules table like the SFT state), prompt + response batches, per-token log-probs, and the jitted,
sharded step wrapper.

A sequence batch (`sequence_batch`) is right-padded, one sequence per row, batch-major [N, T]:

    tokens, positions (-1 on padding), segment_ids (1 real, 0 padding)
    targets       the next token (what position t predicts)
    action_mask   1 where targets[t] is a response token (the tokens a policy is scored / trained on)
    response_mask 1 where tokens[t] is a response token (where a reward model reads its score)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from editx_jax import sharding
from editx_jax.config import LLMConfig
from editx_jax.models import llm
from editx_jax.models.llm import Step1
from editx_jax.train import losses
from editx_jax.train.state import master_config, state_from_params


class BatchError(ValueError):
    """Prompt / response lists that cannot form a batch (empty responses, mismatched lengths...)."""


# ----------------------------------------------------------------------------- states


def param_shardings(logical_axes, mesh, rules=sharding.LLM_RULES):
    return sharding.logical_to_sharding(logical_axes, mesh, rules)


def state_shardings(logical_axes, abstract_params, tx, mesh) -> dict:
    """Shardings of {step, params, opt_state} for any params tree with logical axes (moments like their
    params, counts replicated), as `train.state.state_shardings` does for the LLM."""
    param_sh = param_shardings(logical_axes, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    abstract_f32 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract_params)
    opt_abstract = jax.eval_shape(tx.init, abstract_f32)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh, transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return {"step": rep, "params": param_sh, "opt_state": opt_sh}


def create_state(params, tx, shardings: dict) -> dict:
    """A train state (float32 master weights, fresh AdamW) around `params`, placed in `shardings`."""
    mesh = jax.tree_util.tree_leaves(shardings["params"])[0].mesh
    with sharding.use_mesh(mesh):
        return jax.jit(lambda p: state_from_params(p, tx), out_shardings=shardings)(params)


def llm_state_shardings(cfg: LLMConfig, tx, mesh) -> dict:
    cfg = master_config(cfg)
    return state_shardings(llm.param_logical_axes(cfg), llm.abstract_params(cfg), tx, mesh)


def place(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)


def apply_update(state: dict, grads, tx) -> dict:
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}


# ----------------------------------------------------------------------------- batches


def sequence_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], length: int | None = None,
                   pad_id: int = 0, multiple: int = 8, allow_empty: bool = False) -> dict:
    """Right-padded [N, T] arrays of prompt + response rows (see the module doc). T = `length`, or the
    longest row rounded up to `multiple`."""
    if len(prompts) != len(responses):
        raise BatchError(f"{len(prompts)} prompts for {len(responses)} responses")
    if not prompts:
        raise BatchError("an empty batch")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0:
            raise BatchError(f"row {i}: empty prompt")
        if len(r) == 0 and not allow_empty:
            raise BatchError(f"row {i}: empty response")
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    if length is None:
        length = -(-longest // multiple) * multiple
    elif longest > length:
        raise BatchError(f"a row of {longest} tokens does not fit the length {length}")
    n = len(prompts)
    out = {"tokens": np.full((n, length), pad_id, np.int32), "targets": np.full((n, length), pad_id, np.int32),
           "positions": np.full((n, length), -1, np.int32), "segment_ids": np.zeros((n, length), np.int32),
           "action_mask": np.zeros((n, length), np.float32), "response_mask": np.zeros((n, length), np.float32)}
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        k, lp = len(seq), len(p)
        out["tokens"][i, :k] = seq
        out["targets"][i, :k - 1] = seq[1:]
        out["positions"][i, :k] = np.arange(k)
        out["segment_ids"][i, :k] = 1
        out["action_mask"][i, lp - 1:k - 1] = 1.0
        out["response_mask"][i, lp:k] = 1.0
    return out


def pair_batch(prompts, chosen, rejected, length: int | None = None, pad_id: int = 0, multiple: int = 8) -> dict:
    """Both sides of each pair in one batch, interleaved (row 2i chosen, 2i + 1 rejected), so a pair
    never straddles two batch shards. Empty or identical responses are errors."""
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        if len(c) == 0 or len(r) == 0:
            raise BatchError(f"pair {i}: empty {'chosen' if len(c) == 0 else 'rejected'} response")
        if list(c) == list(r):
            raise BatchError(f"pair {i}: chosen and rejected responses are identical")
    rows_p, rows_r = [], []
    for p, c, r in zip(prompts, chosen, rejected):
        rows_p += [p, p]
        rows_r += [c, r]
    return sequence_batch(rows_p, rows_r, length, pad_id, multiple)


# ----------------------------------------------------------------------------- model calls


def token_logps(params, cfg: LLMConfig, batch: dict, temperature: float = 1.0, with_entropy: bool = False):
    """log pi(target) per position [N, T] (float32), and the entropy per position when asked."""
    logits, _ = Step1(cfg).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    logp = losses.token_log_probs(logits, batch["targets"], temperature)
    if with_entropy:
        return logp, losses.token_entropy(logits, temperature)
    return logp


def sequence_logps(params, cfg: LLMConfig, batch: dict, temperature: float = 1.0):
    """Summed log-probs of each row's response tokens [N]."""
    return jnp.sum(token_logps(params, cfg, batch, temperature) * batch["action_mask"], axis=1)


# ----------------------------------------------------------------------------- jitted steps


class ShardedStep:
    """`step(*fixed_args, batch)` jitted with the fixed arguments' shardings (states, params), the
    batch's rows over data x fsdp (any batch-major dict; one compile per batch layout), outputs in
    `out_shardings` (a callable of the mesh's replicated sharding, or a tree). Runs under the mesh
    and its rules so the layers' logical constraints apply."""

    def __init__(self, fn: Callable, mesh, fixed_shardings: tuple, out_shardings, donate: tuple = ()):
        self.fn, self.mesh, self.fixed, self.out, self.donate = fn, mesh, fixed_shardings, out_shardings, donate
        self._cache = {}

    def batch_shardings(self, batch):
        return jax.tree_util.tree_map(lambda x: sharding.batch_sharding(self.mesh, np.ndim(x)), batch)

    def __call__(self, *args):
        *fixed, batch = args
        key = jax.tree_util.tree_structure(batch), tuple(np.ndim(x) for x in jax.tree_util.tree_leaves(batch))
        if key not in self._cache:
            self._cache[key] = jax.jit(self.fn, in_shardings=(*self.fixed, self.batch_shardings(batch)),
                                       out_shardings=self.out, donate_argnums=self.donate)
        batch = place(batch, self.batch_shardings(batch))
        with sharding.use_mesh(self.mesh):
            return self._cache[key](*fixed, batch)


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())
