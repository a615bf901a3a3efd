"""Step1 prefill / decode speed on this machine, against its own memory-bandwidth roofline.

    python tools/bench_llm.py --config configs/llm_mid.yaml --batch 1 --prompt-len 512 --new-tokens 128
    python tools/bench_llm.py --config configs/llm_mid.yaml --quantize int8   # float and int8, same run

Prints compile times, median prefill and decode tokens/s (with --quantize the two variants' repeats
alternate), peak memory, and decode speed as a fraction of the roofline: each decode step must read every weight (one embedding row) and the whole KV cache once, so its floor is
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
    runs = {"float": Runner(llm.split_layers(floats), cfg, gen, args)}  # the form EditX holds
    del floats
    if quantize != "none":
        params, qcfg = quantize_params(host, cfg, quantize)
        del host
        print(f"-- {quantize}: params {tree_bytes(params) / 2**20:.1f} MiB")
        runs[quantize] = Runner(llm.split_layers(jax.device_put(params)), qcfg, gen, args)
    # Alternated repeats, so a change in the machine's load falls on every variant alike.
    for _ in range(args.repeats):
        for runner in runs.values():
            runner.time_once()
    bandwidth = copy_bandwidth(1 << 28)
    speed = {}
    for name, runner in runs.items():
        print(f"-- {name}")
        speed[name] = runner.report(bandwidth)
    if quantize != "none":
        print(f"decode {quantize} / float: {speed[quantize] / speed['float']:.2f}x (medians, alternated)")
    kind, peak = peak_memory_bytes()
    print(f"{kind}: {peak / 2**30:.2f} GiB")


class Runner:
    """One params tree's prefill and decode, compiled once, timed by `time_once`."""

    def __init__(self, params, cfg, gen, args):
        self.params, self.cfg, self.gen = params, cfg, gen
        b, p, n = self.b, self.p, self.n = args.batch, bucket(args.prompt_len, 1), args.new_tokens
        self.cache_len = bucket(p + n, 1)
        rng = np.random.RandomState(0)
        self.tokens = jnp.asarray(rng.randint(5, 65536 if cfg.vocab_size > 65536 else cfg.vocab_size, (b, p)),
                                  jnp.int32)
        self.positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        # host arrays: the decode state is donated, so each run's state must be built from fresh buffers
        self.recent = np.asarray(self.tokens[:, -max(gen.repetition_window, 1):])
        self.lengths = np.full((b,), p, np.int32)
        self.budget = jnp.full((b,), n, jnp.int32)
        self.row_keys = jax.random.split(jax.random.key(1), b)

        t = time.perf_counter()
        self.prefill = prefill_jit(cfg, None).lower(params, self.tokens, self.positions,
                                                    llm.init_cache(cfg, b, self.cache_len)).compile()
        self.compile_prefill = time.perf_counter() - t
        last, cache = self.prefill(params, self.tokens, self.positions, llm.init_cache(cfg, b, self.cache_len))
        t = time.perf_counter()
        self.decode = decode_jit(cfg, gen, None).lower(params, self._state(cache, last), self.row_keys, self.budget,
                                                       p, n).compile()
        self.compile_decode = time.perf_counter() - t
        self.prefill_times, self.decode_times, self.steps, self.cache = [], [], 0, cache

    def _state(self, cache, last):
        return initial_state(self.cfg, cache, last, self.recent, self.lengths, self.budget, self.cache_len - self.p)

    def time_once(self):
        fresh = jax.block_until_ready(llm.init_cache(self.cfg, self.b, self.cache_len))
        (last, cache), seconds = timed(self.prefill, self.params, self.tokens, self.positions, fresh)
        self.prefill_times.append(seconds)
        state, seconds = timed(self.decode, self.params, self._state(cache, last), self.row_keys, self.budget,
                               self.p, self.n)
        self.decode_times.append(seconds)
        self.steps, self.cache = int(state.step), state.cache

    def report(self, bandwidth: float) -> float:
        """Print compile times, median prefill and decode speed against the roofline; return decode tokens/s."""
        b, p, params = self.b, self.p, self.params
        t_prefill, t_decode = float(np.median(self.prefill_times)), float(np.median(self.decode_times))
        # Every weight is read once per step except the embedding table, of which one row per sequence is.
        embedding = params["embed"]["embedding"]
        bytes_per_step = (tree_bytes(params) - embedding.nbytes + b * embedding[0].nbytes
                          + tree_bytes({"k": self.cache["k"], "v": self.cache["v"]}))
        step_time = t_decode / max(self.steps, 1)
        roofline = bytes_per_step / bandwidth
        print(f"compile: prefill {self.compile_prefill:.1f} s, decode {self.compile_decode:.1f} s")
        print(f"prefill: {b * p / t_prefill:,.0f} tokens/s ({t_prefill * 1e3:.1f} ms for {b}x{p})")
        print(f"decode:  {b * self.steps / t_decode:,.1f} tokens/s ({step_time * 1e3:.2f} ms/step over "
              f"{self.steps} steps)")
        print(f"memory bandwidth (measured copy): {bandwidth / 1e9:.1f} GB/s; bytes read per decode step: "
              f"{bytes_per_step / 1e9:.3f} GB -> roofline {roofline * 1e3:.2f} ms/step")
        print(f"decode speed = {roofline / step_time:.1%} of the memory-bandwidth roofline")
        peaks = device_peaks()
        if peaks is not None:
            print(f"decode reads {bytes_per_step / step_time / 1e9:.0f} GB/s = "
                  f"{bytes_per_step / step_time / peaks[1]:.1%} of HBM peak ({peaks[1] / 1e12:.2f} TB/s, "
                  f"{jax.devices()[0].device_kind})")
        return b * self.steps / t_decode


if __name__ == "__main__":
    main()
