"""DPO / GRPO / PPO memory at a model's size (tools/plan_memory.py --algo): every phase of one step
(no-grad passes, gradient steps) lowered and compiled on abstract shapes, nothing allocated, at
upstream's batch, for each target; the first (largest micro-batch) configuration whose peak fits.

Per device, a phase's peak = every role resident for the whole run (policy train state, frozen
reference, PPO critic state: all on one mesh) + the phase's XLA temporaries + its batch + its
outputs that do not reuse a donated input. The rollout sampler's KV cache is added analytically.
Figures are XLA:CPU's (fake devices); temporaries differ somewhat by backend.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from editx_jax import sharding
from editx_jax.config import MeshConfig
from editx_jax.models import llm
from editx_jax.models import reward as rm
from editx_jax.train import dpo, grpo, ppo
from editx_jax.train import reward as rw
from editx_jax.train import state as st
from editx_jax.train.jit import sharded_step

GiB = 1024 ** 3
HEADROOM = 0.9  # plan to 90 % of the memory: allocator fragmentation, the runtime, the sampler's extras
TARGETS = {"h200": (1, 141e9, "one H200 (141 GB)"), "v5p-8": (4, 95e9, "TPU v5p-8 (4 chips x 95 GB), fsdp 4")}
# upstream-training.md: DPO 64 pairs of 1536 tokens; GRPO 2 prompts x G 16 of 512 prompt + 1024 new
# tokens; PPO's batch is unpublished: the GRPO rollout batch, in ppo.minibatches 2.
BATCH_SETS = {"dpo": "train.batch_size=64", "grpo": "train.batch_size=2 --set grpo.group_size=16",
              "ppo": "train.batch_size=32 --set ppo.minibatches=2"}
UPSTREAM = {"dpo": (128, 1536, 1, "64 pairs x 1536 tokens (upstream's DPO)"),
            "grpo": (32, 1536, 1, "2 prompts x G 16 = 32 samples x (512 + 1024) tokens (upstream's GRPO)"),
            "ppo": (32, 1536, 2, "32 rollouts x (512 + 1024) tokens, ppo.minibatches 2")}
INT_KEYS = ("tokens", "targets", "positions", "segment_ids")


def _bytes(tree) -> int:
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        n = 1
        for d in x.sharding.shard_shape(x.shape):
            n *= d
        total += n * jnp.dtype(x.dtype).itemsize
    return total


def _batch(mesh, rows: int, seq: int, token_keys, row_keys=(), float_token_keys=()):
    def leaf(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), 0))
    out = {k: leaf((rows, seq), jnp.int32 if k in INT_KEYS else jnp.float32) for k in token_keys}
    out.update({k: leaf((rows, seq), jnp.float32) for k in float_token_keys})
    out.update({k: leaf((rows,), jnp.float32) for k in row_keys})
    return out


def _phases(cfg, algo: str, mesh, rows: int, seq: int, minibatches: int, accum: int, micro_rows: int):
    """{phase: (jitted step, abstract args)} and the resident roles' bytes per device."""
    c, tx = cfg.llm, st.make_optimizer(cfg.optimizer, cfg.train.steps)
    sh = st.llm_state_shardings(c, tx, mesh)
    policy = st.abstract_llm_state(c, tx, sh)
    # PPO's frozen roles are stored as ppo.frozen_dtype (what runs/ppo.py places); DPO's and GRPO's float32
    ref = st.frozen(llm.abstract_params(st.master_config(c)), sh["params"],
                    cfg.ppo.frozen_dtype if algo == "ppo" else "float32")
    roles = {"policy state": _bytes(policy), "reference": _bytes(ref)}
    rep = sharding.replicated(mesh)
    if algo == "dpo":
        b = _batch(mesh, rows, seq, dpo.INPUT_KEYS)
        step = dpo.make_train_step(c, cfg.dpo, tx, mesh, sh, accum, micro_rows)
        return {"train step (+ reference pass)": (step, (policy, ref, b))}, roles
    if algo == "grpo":
        ref_b = _batch(mesh, rows, seq, grpo.INPUT_KEYS, ("advantages",))
        b = _batch(mesh, rows, seq, grpo.INPUT_KEYS, ("advantages",), ("ref_logps",))
        return {"reference pass": (grpo.make_ref_step(c, cfg.grpo, tx, mesh, sh, micro_rows), (ref, ref_b)),
                "train step": (grpo.make_train_step(c, cfg.grpo, tx, mesh, sh, accum), (policy, b))}, roles
    vtx = st.make_optimizer(cfg.optimizer, cfg.train.steps)
    vsh = rw.shardings(c, vtx, mesh)
    critic = st.with_shardings(st.abstract_state(rm.abstract_params(st.master_config(c)), vtx), vsh)
    roles["critic state"] = _bytes(critic)
    sides = _batch(mesh, rows, seq, ppo.INPUT_KEYS, ("scores",))
    mb = _batch(mesh, rows // minibatches, seq, ppo.INPUT_KEYS, (),
                ("old_logps", "old_values", "advantages", "returns"))
    pcfg = cfg.ppo
    return {
        "policy + reference pass": (sharded_step(lambda p, r, b: ppo.policy_side(p, r, b, cfg=c, pcfg=pcfg,
                                                                                micro_batch=micro_rows),
                                                 mesh, (sh["params"], sh["params"]), rep),
                                    (policy["params"], ref, sides)),
        "value pass": (sharded_step(lambda v, b: ppo.critic_side(v, b, cfg=c, micro_batch=micro_rows), mesh,
                                    (vsh["params"],), rep), (critic["params"], sides)),
        "policy step": (sharded_step(lambda s, b: ppo.policy_step(s, b, cfg=c, pcfg=pcfg, tx=tx, grad_accum=accum),
                                     mesh, (sh,), (sh, rep), donate=(0,)), (policy, mb)),
        "value step": (sharded_step(lambda s, b: ppo.value_step(s, b, cfg=c, pcfg=pcfg, tx=vtx, grad_accum=accum),
                                    mesh, (vsh,), (vsh, rep), donate=(0,)), (critic, mb)),
    }, roles


def _reward_model(cfg, mesh):
    mcfg = st.master_config(cfg.llm)
    return st.frozen(rm.abstract_params(mcfg), sharding.logical_to_sharding(rm.param_logical_axes(mcfg), mesh),
                     cfg.ppo.frozen_dtype)


def _peak(step, args, resident: int) -> tuple[float, float]:
    """(peak GiB, temporaries GiB) of one phase per device."""
    mem = step.lower(*args).compile().memory_analysis()
    batch = _bytes(args[-1])
    out = max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
    return (resident + mem.temp_size_in_bytes + batch + out + mem.generated_code_size_in_bytes) / GiB, \
        mem.temp_size_in_bytes / GiB


def _kv_cache(c, rows: int, seq: int, devices: int) -> float:
    head_dim = c.hidden_size // c.num_heads
    return rows * seq * c.num_layers * 2 * c.num_groups * head_dim * jnp.dtype(c.dtype).itemsize / devices / GiB


def plan(cfg, algo: str, targets) -> int:
    rows, seq, minibatches, what = UPSTREAM[algo]
    grad_rows = rows // minibatches
    c = cfg.llm
    print(f"{algo.upper()} at {c.num_params / 1e9:.2f}B (fp32 master + AdamW, compute {c.dtype}): {what}; "
          f"GiB per device, XLA:CPU memory analysis on abstract shapes")
    best = {}
    for target in targets:
        n_dev, capacity, name = TARGETS[target]
        mesh = sharding.make_mesh(MeshConfig(1, n_dev, 1), jax.devices()[:n_dev])
        budget = HEADROOM * capacity / GiB
        print(f"\n{name}: mesh data 1 x fsdp {n_dev} x tensor 1; budget {budget:.1f} GiB "
              f"({HEADROOM:.0%} of {capacity / GiB:.1f})")
        header = None
        # PPO also tries its frozen roles (reference, reward model) in bfloat16 storage (ppo.frozen_dtype)
        frozen = dict.fromkeys((cfg.ppo.frozen_dtype, "bfloat16") if algo == "ppo" else (cfg.ppo.frozen_dtype,))
        for frozen_dtype, remat in ((f, r) for f in frozen for r in dict.fromkeys((c.remat_policy, "full"))):
            run_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(c, remat_policy=remat),
                                          ppo=dataclasses.replace(cfg.ppo, frozen_dtype=frozen_dtype))
            fitted = False
            for micro_rows in (16, 8, 4, 2, 1):
                if micro_rows > grad_rows or micro_rows % n_dev or (algo == "dpo" and micro_rows % 2):
                    continue
                accum = grad_rows // micro_rows
                phases, roles = _phases(run_cfg, algo, mesh, rows, seq, minibatches, accum, micro_rows)
                resident = sum(roles.values())
                if header != (list(phases), roles):
                    header = (list(phases), roles)
                    print("resident: " + ", ".join(f"{k} {v / GiB:.1f}" for k, v in roles.items())
                          + f"; rollout KV cache (bf16, {rows} x {seq}) "
                          f"{_kv_cache(c, rows, seq, n_dev):.2f}" * (algo != "dpo"))
                    if algo == "ppo":  # the reward here is a --reward-fn; a --reward-model stays resident too
                        print(f"  (a --reward-model as the reward would add {_bytes(_reward_model(run_cfg, mesh)) / GiB:.1f}"
                              " resident, not counted here)")
                    print(f"{'remat':>32} {'grad_accum':>10} {'micro_batch':>11} "
                          + " ".join(f"{h[:24]:>24}" for h in header[0]) + "  fits")
                peaks = [_peak(step, args, resident) for step, args in phases.values()]
                worst = max(p for p, _ in peaks)
                fits = worst <= budget
                print(f"{remat:>32} {accum:>10} {micro_rows:>11} "
                      + " ".join(f"{f'{p:.1f} (tmp {t:.1f})':>24}" for p, t in peaks) + f"  {'yes' if fits else 'no'}")
                if fits:
                    best[target] = (remat, accum, micro_rows, n_dev, worst,
                                    f" --set ppo.frozen_dtype={frozen_dtype}" * (algo == "ppo"))
                    fitted = True
                    break
            if fitted:
                break
        if target not in best:
            print(f"nothing fits {name}: the resident roles alone take {sum(roles.values()) / GiB:.1f} GiB")
    print("\nconfig that fits (the largest micro-batch):")
    for target in targets:
        if target in best:
            remat, accum, micro_rows, n_dev, worst, frozen_set = best[target]
            print(f"  {target}: --set {BATCH_SETS[algo]} --set mesh.fsdp={n_dev} --set llm.remat_policy={remat} "
                  f"--set train.grad_accum={accum} --set train.micro_batch={micro_rows}{frozen_set}   "
                  f"(peak {worst:.1f} GiB)")
        else:
            print(f"  {target}: none")
    return 0
