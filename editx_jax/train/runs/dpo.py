"""DPO's wiring: pairs, the policy state and its frozen reference (the initial policy; both are
checkpointed, so a resume needs no --init-from), the jitted steps. train.batch_size = pairs per step.

With dpo.precompute_ref the reference's sequence log-probs of every pair of data.train and data.eval
are computed once, before the first step, and kept beside the checkpoints in <output_dir>/REF_FILE
(written atomically, with a fingerprint of the pairs); the steps read them from there, and a resumed
run reads the file back instead of running the reference again. Only a resume of a run that started
without the option computes them, once, from the checkpointed reference.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Callable

import jax
import numpy as np

from editx_jax import sharding
from editx_jax.config import Config
from editx_jax.models import llm
from editx_jax.train import dpo, micro
from editx_jax.train import state as train_state
from editx_jax.train.init_from import load_policy_params
from editx_jax.train.loop import Run, RunError, check_run_folder, has_checkpoint, process_log
from editx_jax.train.runs.preference import PairData, make_mesh, read_pair_data, take

REF_FILE = "dpo_ref_logps.npz"


def _summary(m: dict) -> str:
    return (f"loss {m.get('loss', 0):.4f} acc {m.get('reward_accuracy', 0):.3f} "
            f"margin {m.get('reward_margin', 0):.3f}")


def fingerprint(data: PairData) -> str:
    """A digest of the pairs (and the padded length) a reference table belongs to."""
    h = hashlib.sha256(str(data.length).encode())
    for part in (data.train, data.held):
        if part is None:
            h.update(b"no eval")
            continue
        for rows in part[:3]:
            for r in rows:
                h.update(np.asarray(r, np.int64).tobytes() + b"|")
    return h.hexdigest()


def reference_table(ref_fn, ref_params, pairs: tuple, batch_size: int, batch_at: Callable) -> np.ndarray:
    """[n, 2] (chosen, rejected) reference log-probs of every pair, batch_size pairs per call (the last
    call's batch filled up by wrapping around, so every call has the step's shape)."""
    n, out = len(pairs[0]), []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        got = np.asarray(jax.device_get(ref_fn(ref_params, batch_at(pairs, idx))), np.float32)
        out.append(got.reshape(batch_size, 2)[:min(batch_size, n - start)])
    return np.concatenate(out)


def save_tables(path: pathlib.Path, tables: dict, digest: str) -> None:
    """Written to a temporary file and renamed: a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, fingerprint=np.asarray(digest), **tables)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tables(path: pathlib.Path, digest: str) -> dict | None:
    if not path.is_file():
        return None
    with np.load(path) as f:
        if str(f["fingerprint"]) != digest:
            raise RunError(f"{path}: the precomputed reference log-probs belong to other pairs than data.train / "
                           "data.eval (the data changed since the run started); nothing was overwritten")
        return {k: f[k] for k in f.files if k != "fingerprint"}


def setup(cfg: Config, *, resume: bool = False, init_from: str | None = None, log: Callable = print,
          tokenizer=None, devices=None, **_) -> Run:
    """DPO over the pairs of data.train against the frozen initial policy; held-out metrics on data.eval."""
    log = process_log(log)
    tc = cfg.train
    mesh = make_mesh(cfg, devices, 2 * tc.batch_size, "train.batch_size (pairs)")
    micro.check_run(2 * tc.batch_size, tc.grad_accum, 2 * tc.batch_size, tc.micro_batch,
                    mesh.shape["data"] * mesh.shape["fsdp"], "train.batch_size", group=2)
    check_run_folder(cfg, resume, "dpo")
    data = read_pair_data(cfg, tokenizer, log)
    tx = train_state.make_optimizer(cfg.optimizer, tc.steps)
    policy = None if resume and has_checkpoint(cfg) else load_policy_params(init_from, cfg, log)

    def batch_at(pairs, idx):
        P, C, R, _ = take(pairs, idx)
        return dpo.make_batch(P, C, R, length=data.length, pad_id=cfg.llm.pad_id)

    held_idx = data.held_indices(cfg, log)
    held = [batch_at(data.held, idx) for idx in held_idx]
    sh = train_state.llm_state_shardings(cfg.llm, tx, mesh)
    if policy is not None:
        state = {"policy": train_state.create_state(policy, tx, sh), "ref": sharding.place(policy, sh["params"])}
    else:  # resuming: the loop restores into these
        abstract = llm.abstract_params(train_state.master_config(cfg.llm))
        state = {"policy": train_state.abstract_llm_state(cfg.llm, tx, sh),
                 "ref": train_state.with_shardings(abstract, sh["params"])}
    step = dpo.make_train_step(cfg.llm, cfg.dpo, tx, mesh, sh, tc.grad_accum, tc.micro_batch)
    ev = dpo.make_eval_step(cfg.llm, cfg.dpo, tx, mesh, sh, tc.micro_batch)

    tables: dict = {}  # the precomputed reference log-probs: {"train": [n, 2], "held": [m, 2]}
    path = pathlib.Path(tc.output_dir) / REF_FILE

    def ref_tables(ref_params) -> dict:
        """The precomputed reference log-probs: computed from `ref_params` and written, on first use only."""
        if not tables:
            ref_fn = dpo.make_reference_step(cfg.llm, tx, mesh, sh, tc.micro_batch)
            tables["train"] = reference_table(ref_fn, ref_params, data.train, tc.batch_size, batch_at)
            if data.held is not None:
                tables["held"] = reference_table(ref_fn, ref_params, data.held, tc.batch_size, batch_at)
            if jax.process_index() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_tables(path, tables, fingerprint(data))
            log(f"reference log-probs of {len(tables['train'])} train pairs precomputed into {path}")
        return tables

    if cfg.dpo.precompute_ref and policy is not None:
        ref_tables(state["ref"])  # once, before training
    elif cfg.dpo.precompute_ref:  # resuming: read back (checked against the pairs) before anything compiles
        tables.update(load_tables(path, fingerprint(data)) or {})
        if tables:
            log(f"reference log-probs read back from {path}")

    def with_ref(b, state, split, idx):
        if not cfg.dpo.precompute_ref:
            return b
        return {**b, "ref_logps": ref_tables(state["ref"])[split][idx].reshape(-1)}

    def step_fn(state, i):
        idx = data.train_indices(i, cfg)
        b = with_ref(batch_at(data.train, idx), state, "train", idx)
        policy_state, m = step(state["policy"], state["ref"], b)
        return {"policy": policy_state, "ref": state["ref"]}, m

    def evaluate(state):
        hb = [with_ref(b, state, "held", idx) for b, idx in zip(held, held_idx)]
        return dpo.evaluate(ev, state["policy"]["params"], state["ref"], hb)

    return Run("dpo", state, step_fn, evaluate=evaluate if held else None, summary=_summary)
