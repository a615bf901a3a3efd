"""PPO's wiring: train.batch_size rollouts per step over the prompts of data.train; the critic from
--reward-model when ppo.value_init="reward" and one is given, else from the policy's trunk, on its
own devices with ppo.critic_devices. Checkpointed as {"policy", "ref", "value"}."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from editx_jax import sharding
from editx_jax.config import Config, MeshConfig
from editx_jax.models import reward as rm
from editx_jax.train import micro, ppo, reward
from editx_jax.train import state as train_state
from editx_jax.train.init_from import load_policy_params, load_reward_params
from editx_jax.train.loop import Run, RunError, check_run_folder, has_checkpoint, process_log
from editx_jax.train.runs import rollouts


def _meshes(cfg: Config, devices):
    """The policy's mesh and the critic's (None: the same), from ppo.critic_devices."""
    devices = list(jax.devices() if devices is None else devices)
    value_mesh = None
    if cfg.ppo.critic_devices:
        n = cfg.ppo.critic_devices
        if n >= len(devices):
            raise RunError(f"ppo.critic_devices {n} leaves no device for the policy ({len(devices)} devices)")
        value_mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices[-n:])
        devices = devices[:-n]
    return sharding.make_mesh(cfg.mesh, devices), value_mesh


def setup(cfg: Config, *, resume: bool = False, init_from: str | None = None, log: Callable = print,
          tokenizer=None, devices=None, reward_fns=None, reward_model=None, **_) -> Run:
    log = process_log(log)
    tc = cfg.train
    mesh, value_mesh = _meshes(cfg, devices)
    rollouts.check_rows(mesh, tc.batch_size, "train.batch_size")
    if tc.batch_size % cfg.ppo.minibatches:
        raise RunError(f"ppo.minibatches {cfg.ppo.minibatches} does not divide train.batch_size {tc.batch_size}")
    for m in (mesh, value_mesh or mesh):
        micro.check_run(tc.batch_size // cfg.ppo.minibatches, tc.grad_accum, tc.batch_size, tc.micro_batch,
                        m.shape["data"] * m.shape["fsdp"], "a minibatch (train.batch_size / ppo.minibatches)")
    check_run_folder(cfg, resume, "ppo")
    data = rollouts.read_prompts(cfg, tokenizer, log)
    fns = rollouts.reward_fns("ppo", cfg, reward_fns, reward_model, mesh, cfg.ppo.frozen_dtype)
    fresh = not (resume and has_checkpoint(cfg))
    policy = load_policy_params(init_from, cfg, log, mesh) if fresh else None
    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    sh = train_state.llm_state_shardings(cfg.llm, tx, mesh)
    pol_state, ref = rollouts.policy_and_ref(cfg, policy, tx, sh, cfg.ppo.frozen_dtype)
    vtx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    vsh = reward.shardings(cfg.llm, vtx, value_mesh or mesh)
    if fresh:
        from_rm = reward_model and cfg.ppo.value_init == "reward"
        rparams = load_reward_params(reward_model, cfg, value_mesh or mesh) if from_rm else None
        value = train_state.create_state(ppo.init_value_params(rparams, None if rparams is not None else policy),
                                         vtx, vsh)
    else:  # resuming: the loop restores into it
        abstract = rm.abstract_params(train_state.master_config(cfg.llm))
        value = train_state.with_shardings(train_state.abstract_state(abstract, vtx), vsh)
    gen = dataclasses.replace(cfg.generation, max_new_tokens=cfg.ppo.max_new_tokens, drop_last=False)
    algo = ppo.PPO(cfg.llm, cfg.ppo, gen, tx, vtx, mesh, fns, pad_id=cfg.llm.pad_id, sample_mesh=mesh,
                   value_mesh=value_mesh, policy_shardings=sh, value_state_shardings=vsh, grad_accum=tc.grad_accum,
                   micro_batch=tc.micro_batch)
    key0 = jax.random.key(tc.seed)

    def step_fn(state, i):
        # iterations = the step: the critic warm-up counts iterations, and a resume starts at its step
        new, m = algo.iteration(ppo.PPOState(state["policy"], state["ref"], state["value"], iterations=i),
                                *data.at(i, cfg), jax.random.fold_in(key0, i))
        return {"policy": new.policy, "ref": new.ref, "value": new.value}, m  # the checkpointed tree

    return Run("ppo", {"policy": pol_state, "ref": ref, "value": value}, step_fn,
               evaluate=rollouts.held_out_eval(cfg, data, gen, fns, None), summary=rollouts.summary)
