"""editx-jax inference entry point.

    python infer.py demo                 # tiny random-weight model, no downloads: shows the pipeline runs

Random weights produce meaningless tokens; see README.md for converting the released weights.
"""

from __future__ import annotations

import argparse
import sys
import time

from editx_jax.config import ConfigError, add_config_args, load_config


def demo(args) -> int:
    import jax
    import numpy as np

    from editx_jax.generate.decode import generate
    from editx_jax.models import llm

    config = load_config(args.config, args.overrides)
    cfg, gen = config.llm, config.generation
    t0 = time.perf_counter()
    params = llm.init_params(cfg, jax.random.key(args.seed))
    jax.block_until_ready(params)
    t_init = time.perf_counter() - t0
    # A chat-shaped prompt: <s><|BOT|> ... audio tokens ... <|EOT|><|BOT|> assistant-ish ids.
    rng = np.random.RandomState(args.seed)
    audio = list(map(int, 65536 + rng.randint(0, 5120, 40)))
    prompt = [cfg.bos_id, 4, *rng.randint(100, 1000, 12).tolist(), *audio, 3, 4, 15886 % cfg.vocab_size, 78]
    print(f"tiny Step1: {cfg.num_params / 1e6:.1f}M params, {cfg.num_layers} layers; prompt {len(prompt)} tokens")
    t0 = time.perf_counter()
    out = generate(params, cfg, gen, [prompt], key=jax.random.key(args.seed))
    t_gen = time.perf_counter() - t0
    tokens = out.tokens[0]
    audio_out = [t for t in tokens if 65536 <= t < 70656]
    print(f"generated {len(tokens)} tokens ({len(audio_out)} audio tokens) in {out.num_steps} steps")
    print(f"timing: init {t_init:.2f} s, generate {t_gen:.2f} s (includes compilation)")
    print("first ids:", tokens[:16])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the tiny random-weight model end to end")
    add_config_args(p, default="configs/tiny.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
