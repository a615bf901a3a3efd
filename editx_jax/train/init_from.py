"""Starting points of a run: a converted LLM folder (checkpoint.save_llm), an SFT / RL run folder (its
last checkpoint), or a fresh init; a reward model from a reward run folder. Shapes are checked
against the config before anything is placed on devices."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import numpy as np

from editx_jax import checkpoint as model_ckpt
from editx_jax.config import Config
from editx_jax.models import llm
from editx_jax.models import reward as rm
from editx_jax.train.loop import RunError, restore_run_params
from editx_jax.train.state import check_shapes, master_config


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


def load_policy_params(init_from, cfg: Config, log: Callable = print):
    """Host float32 LLM params: from an SFT / RL run folder (its last checkpoint), a converted
    checkpoint folder (checkpoint.save_llm), or a fresh init (seed train.seed) when none is given."""
    abstract = llm.abstract_params(master_config(cfg.llm))
    if init_from is None:
        log("policy: fresh initialisation (no --init-from)")
        return jax.device_get(llm.init_params(master_config(cfg.llm), jax.random.key(cfg.train.seed)))
    if is_run_dir(init_from):
        params = restore_run_params(init_from)
    else:
        check_converted_folder(init_from, cfg)
        _, params = model_ckpt.load_llm(init_from, param_dtype="float32")
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    check_shapes(params, abstract, f"--init-from {init_from}", RunError)
    log(f"policy initialised from {init_from}")
    return params


def load_reward_params(path, cfg: Config):
    """A reward model's params from a reward run folder (`--algo reward` output)."""
    if not is_run_dir(path):
        raise RunError(f"--reward-model {path}: not a run folder with checkpoints (train.py --algo reward output)")
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(restore_run_params(path)))
    if "trunk" not in params:
        raise RunError(f"--reward-model {path}: its checkpoint is not a reward model (no trunk/score params)")
    vocab = np.shape(params["trunk"]["embed"]["embedding"])[0]
    if vocab != cfg.llm.vocab_size:
        raise RunError(f"--reward-model {path}: its trunk has a vocabulary of {vocab} ids, the policy's "
                       f"llm.vocab_size is {cfg.llm.vocab_size}")
    check_shapes(params, rm.abstract_params(master_config(cfg.llm)), f"--reward-model {path}", RunError)
    return params
