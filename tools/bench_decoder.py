"""Real-time factor of token2wav (flow with 10 Euler steps + HiFT) at the released sizes, random weights.

    python tools/bench_decoder.py                         # performance.md: 5 s and 20 s of speech, batch 1
    python tools/bench_decoder.py --seconds 5 --batch 1 8 --dtype bfloat16
    python tools/bench_decoder.py --config configs/tiny.yaml --seconds 1 --batch 1   # toy sizes (smoke)
    python tools/bench_decoder.py --json results_decoder.json  # also the figures as JSON (or env BENCH_OUT)

Prints seconds per stage (encoder, ODE, vocoder) as the median of `--repeats` timed calls after one
warm-up call per shape; compile time is reported separately (the warm-up call minus the median call),
with the machine's load average around the timed calls (the box is shared: compare runs made side by
side), and RTF = median wall time / seconds of audio produced (all items of the batch).
The prompt (default 3 s) is part of every item, as in real use. `--dtype bfloat16` runs the DiT
projections in bf16 (norms and softmax stay float32); the encoder and HiFT stay float32.
The same work as shared/bench-official/bench_decoder.py: its 5 s case is 208 LLM tokens, padded to 42
groups of 5 = 126 frames at 25 Hz (252 mel frames, 5.04 s), after a 75-frame (3 s) prompt. Timed calls
are kept only while the rest of the machine was quiet (`benchmarking.guarded_runs`); the JSON has the
official keys (cases -> "5s" -> median_s / rtf of flow, encoder, cfm, vocoder, total; batch B > 1
cases as "5s_b8").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from editx_jax.benchmarking import (guarded_runs, matmul_flops, peak_memory_bytes, results_path, timed,  # noqa: E402
                                    wait_quiet, write_results)
from editx_jax.config import add_config_args, load_config  # noqa: E402
from editx_jax.decoder.dit import estimator  # noqa: E402
from editx_jax.decoder.flow import FlowModel, abstract_params, cfg_velocity, cosine_t_span, solve_euler  # noqa: E402
from editx_jax.decoder.hift import abstract_params as hift_abstract, draw_nsf_noise, hift_inference  # noqa: E402
from editx_jax.decoder.token2wav import _encode  # noqa: E402
from editx_jax.random_init import random_params  # noqa: E402


def dit_flops(config, frames: int, batch: int) -> float:
    """Matmul FLOPs of one DiT pass over `batch` rows of `frames` frames (projections, the k=3 convs,
    attention scores and values; norms, activations and the per-row adaLN are left out)."""
    d, inner, mlp = config.hidden_size, config.attn_inner, config.mlp_hidden
    per_block = 2 * frames * (3 * d * inner + inner * d + 2 * 3 * d * d + 2 * d * mlp) + 4 * frames * frames * inner
    return batch * (2 * frames * (config.in_channels * d + d * config.out_channels) + config.depth * per_block)


TOKENS_PER_S = 125 / 3  # LLM audio tokens: groups of 2 vq02 + 3 vq06 per 3 frames at 25 Hz


def frames(seconds: float) -> int:
    """Frames at 25 Hz of `seconds` of LLM tokens, their last group padded whole (as token2wav does)."""
    return 3 * math.ceil(round(seconds * TOKENS_PER_S) / 5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(ap)  # the flow: and hift: sections (default: the released sizes)
    ap.add_argument("--seconds", type=float, nargs="+", default=[5.0, 20.0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-seconds", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per shape (the median is kept)")
    ap.add_argument("--json", help="write the figures here (default: $BENCH_OUT/results_decoder.json if set)")
    args = ap.parse_args(argv)

    config = load_config(args.config, args.overrides)
    cfg = dataclasses.replace(config.flow, estimator=dataclasses.replace(config.flow.estimator, dtype=args.dtype))
    hcfg = config.hift
    print(f"devices: {jax.devices()}  flow: DiT {cfg.estimator.depth}x{cfg.estimator.hidden_size} ({args.dtype}), "
          f"encoder {cfg.encoder.num_blocks}+{cfg.encoder.num_up_blocks}x{cfg.encoder.output_size}; "
          f"HiFT base {hcfg.base_channels}; {args.steps} steps", flush=True)
    fp = jax.device_put(random_params(abstract_params(cfg), 0))
    hp = jax.device_put(random_params(hift_abstract(hcfg), 1, kernel_scale=0.3))
    model = FlowModel(cfg)

    encode = jax.jit(lambda p, pairs, lengths, emb: model.apply({"params": p}, pairs, lengths, emb, method=_encode))

    @functools.partial(jax.jit, static_argnames=("steps",))
    def ode(p, mu, spks, valid, cond, z, steps):
        est = estimator(p["estimator"], cfg.estimator)  # as flow/token2wav: blocks sliced once, outside the loop

        def velocity(x, t):
            return cfg_velocity(est, x, valid, mu, t, spks, cond, cfg.inference_cfg_rate)
        return solve_euler(velocity, z, cosine_t_span(steps))

    gemm = matmul_flops()
    print(f"machine: float32 GEMM {gemm / 1e9:.0f} GFLOP/s (measured now; other load lowers it)", flush=True)

    rows = []
    res = {"harness": "editx_jax tools/bench_decoder.py", "dtype": args.dtype, "n_timesteps": args.steps,
           "cfg_rate": cfg.inference_cfg_rate, "prompt_seconds": args.prompt_seconds,
           "waited_for_idle_at_start_s": round(wait_quiet(), 1), "cases": {}}
    rng = np.random.default_rng(0)
    for seconds in args.seconds:
        for batch in args.batch:
            lp, lg = frames(args.prompt_seconds), frames(seconds)  # pair frames at 25 Hz
            length = lp + lg
            pairs = np.stack([rng.integers(0, 1025, (batch, length)), rng.integers(1025, 5121, (batch, length))], -1)
            pairs = jnp.asarray(pairs, jnp.int32)
            lengths = jnp.full((batch,), length, jnp.int32)
            emb = jnp.asarray(rng.standard_normal((batch, 192)), jnp.float32)
            cond = jnp.zeros((batch, 2 * length, 80)).at[:, :2 * lp].set(-5.0)
            z = jax.random.normal(jax.random.key(0), (1, 2 * length, 80)).repeat(batch, 0)
            nsf = draw_nsf_noise(jax.random.key(1), batch, 2 * lg, hcfg)

            def run():
                (mu, spks, valid), t_enc = timed(encode, fp, pairs, lengths, emb)
                x, t_ode = timed(lambda *a: ode(*a, steps=args.steps), fp, mu, spks, valid, cond, z)
                mel = jnp.swapaxes(x[:, 2 * lp:], 1, 2)
                _, t_voc = timed(lambda m: hift_inference(hp, m, hcfg, noise=nsf).speech, mel)
                return t_enc, t_ode, t_voc

            t0 = time.perf_counter()
            run()  # compiles every stage
            first = time.perf_counter() - t0
            load0 = os.getloadavg()[0]
            runs, info = guarded_runs(run, max(1, args.repeats))
            runs = np.array(runs)
            med = np.median(runs, axis=0)  # per stage
            total = float(np.median(runs.sum(axis=1)))
            audio = batch * 2 * lg * 480 / 24000
            load = (load0 + os.getloadavg()[0]) / 2
            ode_gflops = args.steps * dit_flops(cfg.estimator, 2 * length, 2 * batch) / med[1] / 1e9
            rows.append((seconds, batch, first - total, *med, total, total / audio, load))
            stages = {"encoder": med[0], "cfm": med[1], "flow": float(np.median(runs[:, :2].sum(axis=1))),
                      "vocoder": med[2], "total": total}
            res["cases"][f"{seconds:g}s" + (f"_b{batch}" if batch > 1 else "")] = {
                "target_seconds": seconds, "batch": batch, "mixed_tokens": round(seconds * TOKENS_PER_S),
                "token_frames_25hz": lg, "mel_frames": 2 * lg, "audio_seconds": audio / batch,
                "compile_s": first - total, "timed_runs": len(runs), "guard": info, "median_s": stages,
                "rtf": {k: v / audio for k, v in stages.items()}, "runs": runs.tolist()}
            print(f"{seconds:5.1f} s  batch {batch:2d}  compile {first - total:6.1f} s | median of {len(runs)}: "
                  f"encoder {med[0]:7.2f} s  ODE {med[1]:7.2f} s  vocoder {med[2]:7.2f} s  total {total:7.2f} s  "
                  f"RTF {total / audio:6.3f}  ODE {ode_gflops:5.0f} GFLOP/s = {100e9 * ode_gflops / gemm:3.0f} % of GEMM  "
                  f"(load average {load:.1f} on {os.cpu_count()} cores)", flush=True)
    kind, peak = peak_memory_bytes()
    print(f"{kind}: {peak / 2**30:.2f} GiB")
    res["peak_memory_GiB"] = peak / 2**30
    write_results(results_path(args.json, "decoder"), res)
    return rows


if __name__ == "__main__":
    main()
