"""Starting points of a run: a converted LLM folder (checkpoint.save_llm), an SFT / RL run folder (its
last checkpoint), or a fresh init; a reward model from a reward run folder. Shapes (and a reward
model's config) are checked against the config before anything is read; params are read straight
into their shardings on the run's mesh, never gathered into a host copy."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp

from editx_jax import checkpoint as model_ckpt
from editx_jax import sharding
from editx_jax.config import Config
from editx_jax.models import llm
from editx_jax.models import reward as rm
from editx_jax.train.loop import RunError
from editx_jax.train.state import check_shapes, frozen, master_config, with_shardings


def is_run_dir(path) -> bool:
    return path is not None and (pathlib.Path(path) / "checkpoints").is_dir()


def check_converted_folder(folder, cfg: Config) -> None:
    """A converted folder's stored LLM config against `cfg.llm` (sizes only; dtypes may differ)."""
    stored = model_ckpt.read_config(folder)
    sizes = {k: v for k, v in dataclasses.asdict(cfg.llm).items() if k not in ("dtype", "param_dtype", "remat_policy")}
    diff = sorted(k for k, v in sizes.items() if stored.get(k, v) != v)
    if diff:
        raise RunError(f"--init-from {folder}: its config differs from llm in "
                       f"{', '.join(f'{k} ({stored[k]} vs {sizes[k]})' for k in diff)}")


def _restore_params(run_dir, target, what: str):
    """The params of a run folder's last checkpoint read straight into `target`'s shardings (a partial
    restore of state["policy"]["params"] or state["params"]): no host copy of the whole tree."""
    mgr = ocp.CheckpointManager((pathlib.Path(run_dir) / "checkpoints").absolute(),
                                item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    try:
        step = mgr.latest_step()
        if step is None:
            raise RunError(f"{what} {run_dir}: no checkpoint under {run_dir}/checkpoints")
        stored = mgr.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored)
        path = ("policy", "params") if "policy" in stored else ("params",)
        node = stored
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            raise RunError(f"{what} {run_dir}: its checkpoint holds no params")
        node = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), node)
        check_shapes(node, target, f"{what} {run_dir}", RunError)
        tree = target
        for k in reversed(path):
            tree = {k: tree}
        args = jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                                     dtype=a.dtype), tree)
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            tree, restore_args=args, partial_restore=True)))["state"]
    finally:
        mgr.close()
    for k in path:
        out = out[k]
    return out


def policy_target(cfg: Config, mesh):
    """The policy's float32 params as sharded ShapeDtypeStructs (the rules table on `mesh`)."""
    mcfg = master_config(cfg.llm)
    shardings = sharding.logical_to_sharding(llm.param_logical_axes(mcfg), mesh)
    return with_shardings(llm.abstract_params(mcfg), shardings)


def load_policy_params(init_from, cfg: Config, log: Callable = print, mesh=None):
    """The policy's float32 params, read or initialised straight into their shardings on `mesh` (default:
    cfg.mesh over all devices): from an SFT / RL run folder (its last checkpoint), a converted
    checkpoint folder (checkpoint.save_llm), or a fresh init (seed train.seed) when none is given.
    Nothing is gathered to the host, so no process ever holds a float32 copy of the whole policy."""
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    target = policy_target(cfg, mesh)
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, target)
    if init_from is None:
        log("policy: fresh initialisation (no --init-from)")
        with sharding.use_mesh(mesh):
            return jax.jit(lambda k: llm.init_params(master_config(cfg.llm), k),
                           out_shardings=shardings)(jax.random.key(cfg.train.seed))
    if is_run_dir(init_from):
        params = _restore_params(init_from, target, "--init-from")
    else:
        check_converted_folder(init_from, cfg)
        try:
            _, params = model_ckpt.load_llm(init_from, shardings, param_dtype="float32")
        except model_ckpt.CheckpointError as e:
            raise RunError(f"--init-from {init_from}: {e}") from None
    log(f"policy initialised from {init_from}")
    return params


SIZE_KEYS = ("vocab_size", "hidden_size")  # what a reward model must share with the policy to score it


def check_reward_model(path, cfg: Config) -> None:
    """A reward run folder against the policy, from its run_config.json, before anything is read or
    compiled: it must be a reward run, and its llm must be the policy's (its vocabulary reads the
    policy's ids; it is scored with the policy's llm config)."""
    if not is_run_dir(path):
        raise RunError(f"--reward-model {path}: not a run folder with checkpoints (train.py --algo reward output)")
    run_config = pathlib.Path(path) / "run_config.json"
    if not run_config.is_file():
        raise RunError(f"--reward-model {path}: no run_config.json (train.py --algo reward output)")
    stored = json.loads(run_config.read_text())
    if stored.get("algo") != "reward":
        raise RunError(f"--reward-model {path}: a {stored.get('algo', 'sft')} run, not a reward model "
                       "(train.py --algo reward output)")
    theirs, ours = stored.get("llm", {}), dataclasses.asdict(cfg.llm)
    diff = [k for k in SIZE_KEYS if theirs.get(k) != ours[k]]
    diff += sorted(k for k in ours if k not in SIZE_KEYS and k not in ("dtype", "param_dtype", "remat_policy")
                   and k in theirs and theirs[k] != ours[k])
    if diff:
        raise RunError(f"--reward-model {path}: its llm differs from the policy's in "
                       f"{', '.join(f'{k} ({theirs.get(k)} vs {ours[k]})' for k in diff)}; a reward model must "
                       "share the policy's vocabulary and sizes to score its tokens")


def load_reward_params(path, cfg: Config, mesh=None, dtype: str = "float32"):
    """A reward model's params (as `dtype`: Orbax casts while reading) from a reward run folder
    (`--algo reward` output), read straight into the rules table's shardings on `mesh` (default:
    cfg.mesh over all devices); no host copy."""
    check_reward_model(path, cfg)
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    mcfg = master_config(cfg.llm)
    target = frozen(rm.abstract_params(mcfg), sharding.logical_to_sharding(rm.param_logical_axes(mcfg), mesh), dtype)
    return _restore_params(path, target, "--reward-model")
