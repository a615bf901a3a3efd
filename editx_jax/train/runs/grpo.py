"""GRPO's wiring: train.batch_size prompts x grpo.group_size samples per step over the prompts of
data.train; the policy and its frozen reference are checkpointed as {"policy", "ref"}."""

from __future__ import annotations

from collections.abc import Callable

import jax

from editx_jax import sharding
from editx_jax.config import Config
from editx_jax.train import grpo, micro
from editx_jax.train import state as train_state
from editx_jax.train.init_from import load_policy_params
from editx_jax.train.loop import Run, check_run_folder, has_checkpoint, process_log
from editx_jax.train.runs import rollouts


def setup(cfg: Config, *, resume: bool = False, init_from: str | None = None, log: Callable = print,
          tokenizer=None, devices=None, reward_fns=None, reward_model=None, **_) -> Run:
    log = process_log(log)
    tc = cfg.train
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rows = tc.batch_size * cfg.grpo.group_size
    rollouts.check_rows(mesh, rows, "train.batch_size x grpo.group_size")
    micro.check_run(rows, tc.grad_accum, rows, tc.micro_batch, mesh.shape["data"] * mesh.shape["fsdp"],
                    "train.batch_size x grpo.group_size")
    check_run_folder(cfg, resume, "grpo")
    data = rollouts.read_prompts(cfg, tokenizer, log)
    fns = rollouts.reward_fns("grpo", cfg, reward_fns, reward_model, mesh)
    policy = None if resume and has_checkpoint(cfg) else load_policy_params(init_from, cfg, log, mesh)
    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    sh = train_state.llm_state_shardings(cfg.llm, tx, mesh)
    pol_state, ref = rollouts.policy_and_ref(cfg, policy, tx, sh)
    algo = grpo.GRPO(cfg.llm, cfg.grpo, tx, mesh, fns, gen=cfg.generation, pad_id=cfg.llm.pad_id, sample_mesh=mesh,
                     shardings=sh, grad_accum=tc.grad_accum, micro_batch=tc.micro_batch)
    key0 = jax.random.key(tc.seed)

    def step_fn(state, i):
        new, m = algo.iteration(grpo.GRPOState(policy=state["policy"], ref=state["ref"]), *data.at(i, cfg),
                                jax.random.fold_in(key0, i))
        return {"policy": new.policy, "ref": new.ref}, m  # the checkpointed tree

    return Run("grpo", {"policy": pol_state, "ref": ref}, step_fn,
               evaluate=rollouts.held_out_eval(cfg, data, algo.gen, fns, algo.weights), summary=rollouts.summary)
