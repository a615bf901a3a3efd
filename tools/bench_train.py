"""Speed of the SFT step: tokens/s, step time, and model FLOPs utilisation from XLA's FLOP count.

    python tools/bench_train.py                                   # performance.md's SFT step: LLM mid, 2 x 512
    python tools/bench_train.py --config configs/sft_step_audio_editx.yaml --batch 8 --seq 1536   # 3.5B

Random tokens, full loss mask, packed rows of one example each; the state is created on the devices
(no checkpoint needed). MFU = model FLOPs per step (`sft.model_flops_per_token`: 6 x matmul params +
attention, the PaLM convention) / step time / (devices x peak). The peak is `--peak-tflops`, else the
device's bf16 datasheet figure (editx_jax/benchmarking.py DEVICE_PEAKS: H100, H200), else (a CPU) a
matmul measured here in the model's compute dtype. XLA's own count is printed too, but
it counts a loop body once, so for the scanned layers it is one layer's worth.
Imports no data pipeline (grain) or audio code: it runs on a bare jax + flax + optax image.

The step time is the median of steps run while the rest of the machine was quiet
(`benchmarking.guarded_runs`); `--json PATH` (or env BENCH_OUT) also writes the figures with the keys of
shared/bench-official/bench_train.py (the official step: 2 x 512 tokens of LLM mid, AdamW). Ours is one
jitted step (forward, backward, AdamW with the SFT preset's gradient clipping), so it has no split into
forward / backward / optimizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository, not an installed copy

import jax  # noqa: E402
import numpy as np  # noqa: E402

from editx_jax import sharding  # noqa: E402
from editx_jax.benchmarking import (device_peaks, guarded_runs, matmul_flops, median, peak_memory_bytes,  # noqa: E402
                                    results_path, timed, wait_quiet, write_results)
from editx_jax.config import ConfigError, load_config  # noqa: E402
from editx_jax.train import sft  # noqa: E402
from editx_jax.train import state as st  # noqa: E402

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/llm_mid.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                   help="config overrides, e.g. llm.num_layers=4")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is kept)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak for MFU (0: the device's datasheet bf16 peak, or measured on a CPU)")
    p.add_argument("--json", help="write the figures here (default: $BENCH_OUT/results_train.json if set)")
    args = p.parse_args(argv)
    overrides = args.overrides or []
    try:
        cfg = load_config(args.config, overrides)
        mesh = sharding.make_mesh(cfg.mesh)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tx = st.make_optimizer(cfg.optimizer, 1000)
    sh = st.llm_state_shardings(cfg.llm, tx, mesh)
    state = st.init_llm_state(cfg.llm, tx, sh, jax.random.key(0))
    step = sft.make_train_step(cfg.llm, tx, mesh, cfg.train.loss_norm, shardings=sh)
    rng = np.random.RandomState(0)
    shape = (args.grad_accum, args.batch // args.grad_accum, args.seq)
    batch = {"tokens": rng.randint(4, cfg.llm.vocab_size, shape).astype(np.int32),
             "targets": rng.randint(4, cfg.llm.vocab_size, shape).astype(np.int32),
             "weights": np.ones(shape, np.float32),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy(),
             "segment_ids": np.ones(shape, np.int32)}
    # one process: the host batch straight onto its [grad_accum, rows, length] sharding, rows over data x fsdp
    gbatch = jax.device_put(batch, sharding.batch_sharding(mesh, ndim=3, axis=1))
    compiled = step.lower(state, gbatch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) * len(mesh.devices.flat)  # cost analysis is per device
    flops = sft.model_flops_per_token(cfg.llm, args.seq) * args.batch * args.seq
    waited = wait_quiet()
    (state, m), first = timed(step, state, gbatch)
    carry = {"state": state}

    def one_step():
        (carry["state"], metrics), seconds = timed(step, carry["state"], gbatch)
        return seconds, float(metrics["loss"])

    runs, info = guarded_runs(one_step, args.steps)
    dt = median(t for t, _ in runs)
    tokens = args.batch * args.seq
    n_params = cfg.llm.num_params
    print(f"model {n_params / 1e6:.1f}M params ({cfg.llm.dtype} compute), {len(mesh.devices.flat)} "
          f"{jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}")
    print(f"batch {args.batch} x {args.seq} tokens: step {dt * 1e3:.1f} ms (first {first:.2f} s), "
          f"{tokens / dt:,.0f} tokens/s, loss {runs[-1][1]:.3f} (median of {len(runs)} steps)")
    print(f"model FLOPs/step {flops:.4g} ({flops / dt / 1e12:.3f} TFLOP/s achieved); XLA count "
          f"{xla_flops:.4g} (one layer of one micro-batch: loop bodies count once)")
    peak, source = peak_flops(args.peak_tflops, cfg.llm.dtype)
    print(f"MFU {flops / dt / (len(mesh.devices.flat) * peak) * 100:.1f} % (peak {peak / 1e12:.3g} TFLOP/s per "
          f"device, {source})")
    kind, peak = peak_memory_bytes()
    print(f"{kind}: {peak / 2**30:.2f} GiB")
    write_results(results_path(args.json, "train"), {
        "harness": "editx_jax tools/bench_train.py", "config": args.config, "overrides": overrides,
        "n_params": n_params, "batch": args.batch, "seq": args.seq, "grad_accum": args.grad_accum,
        "optimizer": dataclasses.asdict(cfg.optimizer), "waited_for_idle_at_start_s": round(waited, 1),
        "first_step_s": first, "timed_runs": len(runs), "guard": info, "median_s": {"step_s": dt},
        "tokens_per_s": tokens / dt, "runs": [{"step_s": t, "loss": loss} for t, loss in runs],
        "model_flops_per_step": flops, "achieved_TFLOPs": flops / dt / 1e12, "peak_memory_GiB": peak / 2**30})
    return 0


def peak_flops(given_tflops: float, dtype: str) -> tuple[float, str]:
    """(per-device peak FLOP/s for MFU, where it comes from)."""
    if given_tflops:
        return given_tflops * 1e12, "--peak-tflops"
    peaks = device_peaks()
    if peaks is not None:
        return peaks[0], f"bf16 dense datasheet, {jax.devices()[0].device_kind}"
    return matmul_flops(dtype=dtype), f"a {dtype} matmul measured now"


if __name__ == "__main__":
    sys.exit(main())
