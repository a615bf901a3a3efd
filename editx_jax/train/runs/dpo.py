"""DPO's wiring: pairs, the policy state and its frozen reference (the initial policy; both are
checkpointed, so a resume needs no --init-from), the jitted steps. train.batch_size = pairs per step."""

from __future__ import annotations

from collections.abc import Callable

from editx_jax import sharding
from editx_jax.config import Config
from editx_jax.models import llm
from editx_jax.train import dpo
from editx_jax.train import state as train_state
from editx_jax.train.init_from import load_policy_params
from editx_jax.train.loop import Run, check_run_folder, has_checkpoint, process_log
from editx_jax.train.runs.preference import make_mesh, read_pair_data, take


def _summary(m: dict) -> str:
    return (f"loss {m.get('loss', 0):.4f} acc {m.get('reward_accuracy', 0):.3f} "
            f"margin {m.get('reward_margin', 0):.3f}")


def setup(cfg: Config, *, resume: bool = False, init_from: str | None = None, log: Callable = print,
          tokenizer=None, devices=None, **_) -> Run:
    """DPO over the pairs of data.train against the frozen initial policy; held-out metrics on data.eval."""
    log = process_log(log)
    tc = cfg.train
    mesh = make_mesh(cfg, devices, 2 * tc.batch_size, "train.batch_size (pairs)")
    check_run_folder(cfg, resume, "dpo")
    data = read_pair_data(cfg, tokenizer, log)
    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    policy = None if resume and has_checkpoint(cfg) else load_policy_params(init_from, cfg, log)

    def batch_at(pairs, idx):
        P, C, R, _ = take(pairs, idx)
        return dpo.make_batch(P, C, R, length=data.length, pad_id=cfg.llm.pad_id)

    held = [batch_at(data.held, idx) for idx in data.held_indices(cfg, log)]
    sh = train_state.llm_state_shardings(cfg.llm, tx, mesh)
    if policy is not None:
        state = {"policy": train_state.create_state(policy, tx, sh), "ref": sharding.place(policy, sh["params"])}
    else:  # resuming: the loop restores into these
        abstract = llm.abstract_params(train_state.master_config(cfg.llm))
        state = {"policy": train_state.abstract_llm_state(cfg.llm, tx, sh),
                 "ref": train_state.with_shardings(abstract, sh["params"])}
    step = dpo.make_train_step(cfg.llm, cfg.dpo, tx, mesh, sh)
    ev = dpo.make_eval_step(cfg.llm, cfg.dpo, tx, mesh, sh)
    if cfg.dpo.precompute_ref and policy is not None:
        held = dpo.precompute_reference(policy, cfg.llm, held)

    def step_fn(state, i):
        b = batch_at(data.train, data.train_indices(i, cfg))
        if cfg.dpo.precompute_ref:
            b = dpo.precompute_reference(state["ref"], cfg.llm, [b])[0]
        policy_state, m = step(state["policy"], state["ref"], b)
        return {"policy": policy_state, "ref": state["ref"]}, m

    evaluate = (lambda s: dpo.evaluate(ev, s["policy"]["params"], s["ref"], held)) if held else None
    return Run("dpo", state, step_fn, evaluate=evaluate, summary=_summary)
