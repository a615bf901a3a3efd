"""The train state for any params tree (the LLM, the reward model, the PPO critic), the optimizer
preset, and the state's shardings from the rules table.

    state = {"step": int32 scalar, "params": float32 master weights, "opt_state": optax state}

A plain dict, so Orbax saves it as is and the abstract state restores into it. The forward computes
in `llm.dtype` (bf16 for real runs): the layers cast the float32 master weights on use, so gradients
and AdamW moments stay float32. A run computes its shardings once (`state_shardings` /
`llm_state_shardings`) and passes them to everything that places, restores or jits the state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from editx_jax import sharding
from editx_jax.config import ConfigError, LLMConfig, OptimizerConfig
from editx_jax.models import llm


def lr_schedule(cfg: OptimizerConfig, steps: int):
    """Linear warmup from 0 over ceil(warmup_ratio * steps) (HF's rule), then cosine / linear decay."""
    warmup = math.ceil(cfg.warmup_ratio * steps)
    end = cfg.learning_rate * cfg.end_lr_ratio
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, max(1, steps - warmup),
                                            alpha=cfg.end_lr_ratio)
    else:
        decay = optax.linear_schedule(cfg.learning_rate, end, max(1, steps - warmup))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def _decay_mask(params):
    # Weight decay on matrices only (not norm scales), as is usual; upstream's preset has wd 0 anyway.
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the schedule."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(lr_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def master_config(cfg: LLMConfig) -> LLMConfig:
    """Training keeps float32 master weights whatever the checkpoint's storage dtype."""
    return dataclasses.replace(cfg, param_dtype="float32")


# ----------------------------------------------------------------------------- any params tree


def state_from_params(params, tx: optax.GradientTransformation) -> dict:
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state(abstract_params, tx) -> dict:
    """The state around `abstract_params` as ShapeDtypeStructs (no allocation)."""
    return jax.eval_shape(lambda p: state_from_params(p, tx), abstract_params)


def state_shardings(logical_axes, abstract_params, tx, mesh, rules=sharding.LLM_RULES) -> dict:
    """NamedShardings for every leaf of the state: params by the rules table, AdamW moments like their
    params, scalars (step, counts) replicated."""
    param_sh = sharding.logical_to_sharding(logical_axes, mesh, rules)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state(abstract_params, tx)["opt_state"], param_sh,
                                   transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    return {"step": rep, "params": param_sh, "opt_state": opt_sh}


def with_shardings(abstract, shardings):
    """Abstract leaves that carry their shardings: the target an Orbax restore reads into."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def frozen(params, shardings, dtype: str):
    """A frozen role's params (a reference: no optimizer) in storage `dtype`, placed in `shardings`;
    abstract leaves (a resume's restore target) retyped. The cast runs in one jit on the devices."""
    dtype = jnp.dtype(dtype)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params)):
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), params, shardings)
    return jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x.astype(dtype), t), out_shardings=shardings)(params)


def create_state(params, tx, shardings: dict) -> dict:
    """A train state (float32 master weights, fresh AdamW) around `params`, placed in `shardings`."""
    mesh = jax.tree_util.tree_leaves(shardings["params"])[0].mesh
    # Host arrays or arrays on another mesh (a critic made from the policy, on its own devices) move
    # shard by shard into place first: the jit then reads them where they are.
    params = jax.device_put(params, shardings["params"])
    with sharding.use_mesh(mesh):
        return jax.jit(lambda p: state_from_params(p, tx), out_shardings=shardings)(params)


def apply_update(state: dict, grads, tx) -> dict:
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}


def check_shapes(params, abstract, what: str, error=ConfigError) -> None:
    """`error` naming the first leaf whose shape differs between `params` and `abstract`."""
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(k): tuple(jnp.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))[0]
        raise error(f"{what}: {bad} is {got.get(bad)}, the config expects {want.get(bad)} (another llm config?)")


# ----------------------------------------------------------------------------- the LLM


def llm_state_shardings(cfg: LLMConfig, tx, mesh) -> dict:
    cfg = master_config(cfg)
    return state_shardings(llm.param_logical_axes(cfg), llm.abstract_params(cfg), tx, mesh)


def init_state(cfg: LLMConfig, tx, key) -> dict:
    return state_from_params(llm.init_params(master_config(cfg), key), tx)


def abstract_llm_state(cfg: LLMConfig, tx, shardings: dict) -> dict:
    """The LLM state as sharded ShapeDtypeStructs (no allocation)."""
    return with_shardings(abstract_state(llm.abstract_params(master_config(cfg)), tx), shardings)


def init_llm_state(cfg: LLMConfig, tx, shardings: dict, key) -> dict:
    """A fresh LLM state, initialised directly into its shardings (no full host copy)."""
    mesh = jax.tree_util.tree_leaves(shardings["params"])[0].mesh
    with sharding.use_mesh(mesh):
        return jax.jit(lambda k: init_state(cfg, tx, k), out_shardings=shardings)(key)
