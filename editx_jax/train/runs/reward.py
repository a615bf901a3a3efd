"""The Bradley-Terry reward model's wiring: pairs, a reward-model state from the policy / SFT trunk,
the jitted steps. train.batch_size = pairs per step (2 rows each)."""

from __future__ import annotations

from collections.abc import Callable

from editx_jax.config import Config
from editx_jax.models import reward as rm
from editx_jax.train import micro, reward
from editx_jax.train import state as train_state
from editx_jax.train.init_from import load_policy_params
from editx_jax.train.loop import Run, check_run_folder, has_checkpoint, process_log
from editx_jax.train.runs.preference import make_mesh, read_pair_data, take


def _summary(m: dict) -> str:
    return f"loss {m.get('loss', 0):.4f} acc {m.get('accuracy', 0):.3f} margin {m.get('margin', 0):.3f}"


def setup(cfg: Config, *, resume: bool = False, init_from: str | None = None, log: Callable = print,
          tokenizer=None, devices=None, **_) -> Run:
    """The reward model over the pairs of data.train, initialised from the policy (--init-from); held-out
    accuracy / margin / loss on data.eval."""
    log = process_log(log)
    tc = cfg.train
    mesh = make_mesh(cfg, devices, 2 * tc.batch_size, "train.batch_size (pairs)")
    micro.check_run(2 * tc.batch_size, tc.grad_accum, 2 * tc.batch_size, 0, mesh.shape["data"] * mesh.shape["fsdp"],
                    "train.batch_size", group=2)
    check_run_folder(cfg, resume, "reward")
    data = read_pair_data(cfg, tokenizer, log)
    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    policy = None if resume and has_checkpoint(cfg) else load_policy_params(init_from, cfg, log)

    def batch_at(pairs, idx):
        P, C, R, M = take(pairs, idx)
        return reward.make_batch(P, C, R, M, length=data.length, pad_id=cfg.llm.pad_id)

    held = [batch_at(data.held, idx) for idx in data.held_indices(cfg, log)]
    sh = reward.shardings(cfg.llm, tx, mesh)
    if policy is not None:
        state = train_state.create_state(rm.from_llm_params(policy), tx, sh)
    else:  # resuming: the loop restores into these
        abstract = rm.abstract_params(train_state.master_config(cfg.llm))
        state = train_state.with_shardings(train_state.abstract_state(abstract, tx), sh)
    step = reward.make_train_step(cfg.llm, cfg.reward, tx, mesh, sh, tc.grad_accum)
    ev = reward.make_eval_step(cfg.llm, cfg.reward, tx, mesh, sh)

    def step_fn(state, i):
        return step(state, batch_at(data.train, data.train_indices(i, cfg)))

    evaluate = (lambda s: reward.evaluate(ev, s["params"], held)) if held else None
    return Run("reward", state, step_fn, evaluate=evaluate, summary=_summary)
