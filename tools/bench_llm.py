"""Step1 prefill / decode speed on this machine, against its own memory-bandwidth roofline.

    python tools/bench_llm.py --config configs/llm_mid.yaml --batch 1 --prompt-len 512 --new-tokens 128
    python tools/bench_llm.py --config configs/llm_mid.yaml --quantize int8   # float, then int8, same run

Prints compile times, prefill and decode tokens/s, peak memory, and decode speed as a fraction of
the roofline: each decode step must read every weight (one embedding row) and the whole KV cache once, so its floor is
(param bytes + cache bytes) / copy bandwidth, with the bandwidth measured here in the same run.
On a device with a datasheet peak (editx_jax/benchmarking.py DEVICE_PEAKS: H100, H200) the bytes
read per second are also given as a percent of its HBM bandwidth. The weights are drawn on the device.
Random weights; the numbers are about speed, not output.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from editx_jax.benchmarking import copy_bandwidth, device_peaks, peak_memory_bytes, timed, tree_bytes  # noqa: E402
from editx_jax.config import add_config_args, load_config  # noqa: E402
from editx_jax.generate.decode import bucket, decode_jit, initial_state, prefill_jit  # noqa: E402
from editx_jax.models import llm  # noqa: E402
from editx_jax.models.quantize import check_quantize, quantize_params  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser, default="configs/llm_mid.yaml")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantize", help="int8: time the int8 weights after the float ones, in the same run")
    args = parser.parse_args(argv)
    try:
        quantize = check_quantize(args.quantize)
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")

    config = load_config(args.config, args.overrides)
    # No early stop: an EOS id the random model will practically never sample.
    cfg = dataclasses.replace(config.llm, eos_id=config.llm.vocab_size - 1)
    gen = dataclasses.replace(config.generation, max_new_tokens=args.new_tokens)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  params: {cfg.num_params / 1e6:.1f}M "
          f"{cfg.param_dtype}/{cfg.dtype}  batch {args.batch}  prompt {bucket(args.prompt_len, 1)}  "
          f"new {args.new_tokens}")
    floats = llm.init_params(cfg, jax.random.key(0))
    host = jax.tree_util.tree_map(np.asarray, floats) if quantize != "none" else None
    speed = {"float": bench(llm.split_layers(floats), cfg, gen, args)}  # the form EditX holds
    del floats
    if quantize != "none":
        params, qcfg = quantize_params(host, cfg, quantize)
        print(f"-- {quantize}: params {tree_bytes(params) / 2**20:.1f} MiB")
        speed[quantize] = bench(llm.split_layers(jax.device_put(params)), qcfg, gen, args)
        print(f"decode {quantize} / float: {speed[quantize] / speed['float']:.2f}x")


def bench(params, cfg, gen, args) -> float:
    """Compile and time prefill and decode; print them; return decode tokens/s."""
    b, p, n = args.batch, bucket(args.prompt_len, 1), args.new_tokens
    cache_len = bucket(p + n, 1)
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(5, 65536 if cfg.vocab_size > 65536 else cfg.vocab_size, (b, p)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    # host arrays: the decode state is donated, so each run's state must be built from fresh buffers
    recent = np.asarray(tokens[:, -max(gen.repetition_window, 1):])
    lengths = np.full((b,), p, np.int32)
    budget = jnp.full((b,), n, jnp.int32)

    t = time.perf_counter()
    c_prefill = prefill_jit(cfg, None).lower(params, tokens, positions, llm.init_cache(cfg, b, cache_len)).compile()
    t_compile_prefill = time.perf_counter() - t
    last, cache = c_prefill(params, tokens, positions, llm.init_cache(cfg, b, cache_len))
    row_keys = jax.random.split(jax.random.key(1), b)
    t = time.perf_counter()
    c_decode = decode_jit(cfg, gen, None).lower(
        params, initial_state(cfg, cache, last, recent, lengths, budget, cache_len - p), row_keys, budget, p,
        n).compile()
    t_compile_decode = time.perf_counter() - t

    prefill_times, decode_times = [], []
    for _ in range(args.repeats):
        fresh = jax.block_until_ready(llm.init_cache(cfg, b, cache_len))
        (last, cache), seconds = timed(c_prefill, params, tokens, positions, fresh)
        prefill_times.append(seconds)
        state = initial_state(cfg, cache, last, recent, lengths, budget, cache_len - p)
        state, seconds = timed(c_decode, params, state, row_keys, budget, p, n)
        steps, cache = state.step, state.cache
        decode_times.append(seconds)
    steps = int(steps)
    t_prefill, t_decode = min(prefill_times), min(decode_times)

    bandwidth = copy_bandwidth(1 << 28)
    # Every weight is read once per step except the embedding table, of which one row per sequence is.
    embedding = params["embed"]["embedding"]
    bytes_per_step = (tree_bytes(params) - embedding.nbytes + b * embedding[0].nbytes
                      + tree_bytes({"k": cache["k"], "v": cache["v"]}))
    step_time = t_decode / max(steps, 1)
    roofline = bytes_per_step / bandwidth
    kind, peak = peak_memory_bytes()
    print(f"compile: prefill {t_compile_prefill:.1f} s, decode {t_compile_decode:.1f} s")
    print(f"prefill: {b * p / t_prefill:,.0f} tokens/s ({t_prefill * 1e3:.1f} ms for {b}x{p})")
    print(f"decode:  {b * steps / t_decode:,.1f} tokens/s ({step_time * 1e3:.2f} ms/step over {steps} steps)")
    print(f"memory bandwidth (measured copy): {bandwidth / 1e9:.1f} GB/s; bytes read per decode step: "
          f"{bytes_per_step / 1e9:.3f} GB -> roofline {roofline * 1e3:.2f} ms/step")
    print(f"decode speed = {roofline / step_time:.1%} of the memory-bandwidth roofline")
    peaks = device_peaks()
    if peaks is not None:
        print(f"decode reads {bytes_per_step / step_time / 1e9:.0f} GB/s = {bytes_per_step / step_time / peaks[1]:.1%} "
              f"of HBM peak ({peaks[1] / 1e12:.2f} TB/s, {jax.devices()[0].device_kind})")
    print(f"{kind}: {peak / 2**30:.2f} GiB")
    return b * steps / t_decode


if __name__ == "__main__":
    main()
