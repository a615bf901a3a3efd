"""Seconds per PPO and GRPO iteration, split into rollout (the jitted sampler), scoring (the reward
functions: here a reward model's forward), prepare (log-probs of policy / reference, values, GAE; for
GRPO the reference log-probs) and update (the optimizer steps).

    python tools/bench_rl.py                                      # mid-size model on CPU (see MID)
    python tools/bench_rl.py --config configs/sft_step_audio_editx.yaml --set llm.dtype=bfloat16 \\
        --rollouts 64 --group 16 --prompt-len 512 --new-tokens 512    # 3.5B on a GPU

Random prompts over the audio ids, a random policy (its own copy as reference), a reward model and a
critic made from its trunk; sampling runs to max new tokens (the stop token is banned by nothing, but
random weights rarely emit it). The first iteration (compilation) is reported apart; the figures are
the mean of the remaining iterations.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np

from editx_jax import sharding
from editx_jax.config import ConfigError, GRPOConfig, PPOConfig, load_config
from editx_jax.models import llm
from editx_jax.models import reward as rm
from editx_jax.train import grpo, ppo, rollout
from editx_jax.train import state as st

MID = ["llm.vocab_size=74752", "llm.hidden_size=512", "llm.intermediate_size=1408", "llm.num_heads=8",
       "llm.num_groups=2", "llm.num_layers=4", "llm.max_seq_len=4096"]
PARTS = ("rollout", "scoring", "prepare", "update")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/sft_tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                   help="overrides (default for sft_tiny: a mid-size model, see MID)")
    p.add_argument("--rollouts", type=int, default=8, help="PPO rollouts per iteration")
    p.add_argument("--prompts", type=int, default=2, help="GRPO prompts per iteration (x --group samples)")
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs over each rollout batch")
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--algos", nargs="*", default=["ppo", "grpo"])
    args = p.parse_args(argv)
    overrides = args.overrides if args.overrides is not None else (MID if args.config.endswith("sft_tiny.yaml") else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lcfg = cfg.llm
    mesh = sharding.make_mesh(cfg.mesh)
    print(f"model: {lcfg.num_params / 1e6:.1f}M params, {lcfg.num_layers} layers, hidden {lcfg.hidden_size}, "
          f"vocab {lcfg.vocab_size}, dtype {lcfg.dtype}; {jax.device_count()} x {jax.devices()[0].platform}")
    rng = np.random.RandomState(0)
    lo = min(cfg.data.audio_id_base, lcfg.vocab_size - 1024)
    prompt = lambda: rng.randint(lo, lcfg.vocab_size, args.prompt_len).tolist()  # noqa: E731
    gen = dataclasses.replace(cfg.generation, max_length=args.prompt_len + args.new_tokens + 1,
                              max_new_tokens=args.new_tokens, min_prompt_bucket=16, drop_last=False)
    tx = st.make_optimizer(cfg.optimizer, 1000)
    params = llm.init_params(st.master_config(lcfg), jax.random.key(0))
    rm_params = jax.tree_util.tree_map(lambda x: x + 0.01, rm.from_llm_params(params))
    rfn = rollout.reward_model_fn(rm_params, lcfg, cfg.reward, lcfg, lcfg.pad_id)
    results = {}
    for algo in args.algos:
        sh = st.llm_state_shardings(lcfg, tx, mesh)
        pol = st.create_state(params, tx, sh)
        ref = sharding.place(params, sh["params"])
        if algo == "ppo":
            pcfg = PPOConfig(max_new_tokens=args.new_tokens, critic_warmup=0, epochs=args.epochs,
                             minibatches=args.minibatches)
            vsh = ppo.value_shardings(lcfg, tx, mesh)
            value = st.create_state(rm_params, tx, vsh)
            trainer = ppo.PPO(lcfg, pcfg, gen, tx, tx, mesh, [rfn], pad_id=lcfg.pad_id, sample_mesh=mesh)
            state = ppo.PPOState(pol, ref, value)
            batch = lambda: ([prompt() for _ in range(args.rollouts)], [{}] * args.rollouts)  # noqa: E731
            what = f"PPO: {args.rollouts} rollouts, {args.epochs} epoch(s) x {args.minibatches} minibatch(es)"
        else:
            gcfg = GRPOConfig(group_size=args.group, max_new_tokens=args.new_tokens)
            trainer = grpo.GRPO(lcfg, gcfg, tx, mesh, [rfn], gen=gen, pad_id=lcfg.pad_id, sample_mesh=mesh)
            state = grpo.GRPOState(pol, ref)
            batch = lambda: ([prompt() for _ in range(args.prompts)], [{}] * args.prompts)  # noqa: E731
            what = f"GRPO: {args.prompts} prompts x G {args.group}"
        times = []
        for i in range(args.iters):
            state, m = trainer.iteration(state, *batch(), jax.random.key(i))
            times.append({k: m[f"time/{k}"] for k in PARTS})
            tag = "first (compiles)" if i == 0 else f"iteration {i}"
            print(f"  {algo} {tag}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times[-1].items())
                  + f", total {sum(times[-1].values()):.2f} s")
        rest = times[1:] or times
        mean = {k: float(np.mean([t[k] for t in rest])) for k in PARTS}
        results[algo] = mean
        print(f"{what}, prompt {args.prompt_len} + {args.new_tokens} new tokens: seconds per iteration "
              + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()) + f", total {sum(mean.values()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
