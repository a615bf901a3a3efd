"""The train state pytree, the optimizer preset, and the state's shardings from the rules table.

    state = {"step": int32 scalar, "params": float32 master weights, "opt_state": optax state}

A plain dict, so Orbax saves it as is and the abstract state (`jax.eval_shape`) restores into it.
The forward computes in `llm.dtype` (bf16 for real runs): the layers cast the float32 master weights
on use, so gradients and AdamW moments stay float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

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
    import dataclasses
    return dataclasses.replace(cfg, param_dtype="float32")


def state_from_params(params, tx: optax.GradientTransformation) -> dict:
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def init_state(cfg: LLMConfig, tx, key) -> dict:
    return state_from_params(llm.init_params(master_config(cfg), key), tx)


def abstract_state(cfg: LLMConfig, tx) -> dict:
    """The state as ShapeDtypeStructs (no allocation)."""
    return jax.eval_shape(lambda: init_state(cfg, tx, jax.random.key(0)))


def state_shardings(cfg: LLMConfig, tx, mesh, rules=sharding.LLM_RULES) -> dict:
    """NamedShardings for every leaf: params by the rules table, AdamW moments like their params,
    scalars (step, counts) replicated."""
    param_sh = sharding.logical_to_sharding(llm.param_logical_axes(master_config(cfg)), mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = abstract_state(cfg, tx)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], param_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return {"step": replicated, "params": param_sh, "opt_state": opt_sh}


def abstract_sharded_state(cfg: LLMConfig, tx, mesh) -> dict:
    """Abstract state whose leaves carry their shardings: the target an Orbax restore reads into."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state(cfg, tx), state_shardings(cfg, tx, mesh))


def create_state(cfg: LLMConfig, tx, mesh, key) -> dict:
    """A fresh state, initialised directly into its shardings (no full host copy)."""
    shardings = state_shardings(cfg, tx, mesh)
    with sharding.use_mesh(mesh):
        return jax.jit(lambda k: init_state(cfg, tx, k), out_shardings=shardings)(key)


def state_from_loaded_params(params, cfg: LLMConfig, tx, mesh) -> dict:
    """A fresh optimizer state around loaded (e.g. converted released) params, sharded."""
    def shapes(tree):
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    want, got = shapes(llm.abstract_params(master_config(cfg))), shapes(params)
    if want != got:
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ConfigError(f"init-from params do not match the llm config: {bad[0]} is {got.get(bad[0])}, "
                          f"the model expects {want.get(bad[0])}")
    shardings = state_shardings(cfg, tx, mesh)
    with sharding.use_mesh(mesh):
        return jax.jit(lambda p: state_from_params(p, tx), out_shardings=shardings)(params)
