"""What the rollout runs (GRPO, PPO) share: the prompts of data.train / data.eval, the reward
functions, the policy state and its frozen reference, the per-step prompt batch and the held-out
evaluation (mean reward of one sample per data.eval prompt, a fixed key per evaluation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from editx_jax.config import Config, GenerationConfig
from editx_jax.data.dataset import epoch_indices
from editx_jax.data.records import read_prompt_records
from editx_jax.models import llm
from editx_jax.train import rollout
from editx_jax.train import state as train_state
from editx_jax.train.init_from import check_reward_model, load_reward_params
from editx_jax.train.loop import RunError


def check_rows(mesh, rows: int, what: str) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise RunError(f"{what}: {rows} rows per step must divide over data x fsdp = {shards} devices")


def reward_fns(algo: str, cfg: Config, specs, reward_model, mesh=None, dtype: str = "float32") -> list:
    """GRPO: grpo.rewards unless --reward-fn / --reward-model are given; PPO: those flags (one needed).
    A reward model is checked against the policy first (before anything is read or compiled), then
    read straight into its shardings on `mesh` (the policy's), stored as `dtype`, and scored there."""
    fns = list(specs or [])
    if reward_model:
        check_reward_model(reward_model, cfg)
        params = load_reward_params(reward_model, cfg, mesh, dtype)
        fns.append(rollout.reward_model_fn(params, cfg.llm, cfg.reward, cfg.llm, cfg.llm.pad_id, mesh=mesh,
                                           micro_batch=cfg.train.micro_batch))
    if not fns and algo == "grpo":
        fns = list(cfg.grpo.rewards)
    if not fns:
        raise RunError("ppo needs a reward: --reward-model RUN_DIR (an --algo reward run) and/or --reward-fn "
                       "NAME|module:function")
    return [rollout.resolve(f) for f in fns]


@dataclasses.dataclass
class Prompts:
    """The prompts and records of data.train, and of data.eval (None without one)."""
    prompts: list
    records: list
    held: tuple | None

    def at(self, step: int, cfg: Config):
        """The train.batch_size (prompts, records) of `step`."""
        idx = epoch_indices(len(self.prompts), cfg.train.batch_size, step, cfg.train.seed)
        return [self.prompts[j] for j in idx], [self.records[j] for j in idx]


def read_prompts(cfg: Config, tokenizer, log) -> Prompts:
    prompts, records, report = read_prompt_records(cfg.data.train, cfg, tokenizer)
    log(f"prompts from {cfg.data.train}: {report.summary()}")
    held = read_prompt_records(cfg.data.eval, cfg, tokenizer)[:2] if cfg.data.eval else None
    return Prompts(prompts, records, held)


def policy_and_ref(cfg: Config, policy, tx, sh: dict, ref_dtype: str = "float32") -> tuple:
    """The policy train state and the frozen reference params (stored as `ref_dtype`) from `policy`
    params; sharded abstract leaves when resuming (policy None: the loop restores into them)."""
    if policy is not None:
        return train_state.create_state(policy, tx, sh), train_state.frozen(policy, sh["params"], ref_dtype)
    abstract = llm.abstract_params(train_state.master_config(cfg.llm))
    return train_state.abstract_llm_state(cfg.llm, tx, sh), train_state.frozen(abstract, sh["params"], ref_dtype)


def held_out_eval(cfg: Config, data: Prompts, gen: GenerationConfig, fns, weights) -> Callable | None:
    if data.held is None:
        return None

    def evaluate(state):
        hp, hr = data.held
        # on the policy's mesh (the one its params are placed on), like the training rollouts
        rows, comps = rollout.sample_completions(state["policy"]["params"], cfg.llm, gen, hp,
                                                 jax.random.key(cfg.train.seed + 1))
        total, parts = rollout.score(fns, weights, rows, comps, hr)
        m = {"reward_mean": float(np.mean(total)), "completion_length": float(np.mean([len(c) for c in comps]))}
        m.update({f"reward/{k}": float(np.nanmean(v)) for k, v in parts.items()})
        return m

    return evaluate


def summary(m: dict) -> str:
    return (f"reward {m.get('reward_mean', 0):.3f} kl {m.get('kl', 0):.3f} "
            f"len {m.get('completion_length', m.get('response_length', 0)):.1f}")
