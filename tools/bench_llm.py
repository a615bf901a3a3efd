"""Step1 prefill / decode speed on this machine, against its own memory-bandwidth roofline.

    python tools/bench_llm.py                          # performance.md: LLM mid, 512-token prompt, batch 1 and 4
    python tools/bench_llm.py --batch 1 --quantize int8   # float, then int8, same run
    python tools/bench_llm.py --json results_llm.json     # also the figures as JSON (or env BENCH_OUT)

The same work as shared/bench-official/bench_llm.py: prefill of a 512-token prompt at batch 1, then
per batch size the 128 new tokens of greedy `generate`, run through the functions `generate` calls
(`prefill`, then `decode` in three pieces, to time the first 8 and the last 8 steps as well), with the
cache `generate` picks, and `generate` itself end to end. Every figure is the median of runs made
while the rest of the machine was quiet (`benchmarking.guarded_runs`). Prints compile times, prefill
and decode tokens/s, peak memory, and decode speed as a fraction of the roofline: each decode step must
read every weight (one embedding row) and the whole KV cache once, so its floor is
(param bytes + cache bytes) / read bandwidth (`benchmarking.read_bandwidth`: decode reads, it hardly
writes), measured just before and just after each timed decode, the higher figure kept for that run;
the fraction against the highest figure of all runs is printed too, and so is the copy bandwidth
(read and write counted), with the fraction of that.
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
import numpy as np  # noqa: E402

from editx_jax.benchmarking import (copy_bandwidth, device_peaks, guarded_runs, median, peak_memory_bytes,  # noqa: E402
                                    read_bandwidth, results_path, timed, tree_bytes, wait_quiet, write_results)
from editx_jax.config import add_config_args, load_config  # noqa: E402
from editx_jax.generate.decode import decode, generate, initial_state, prefill, widths  # noqa: E402
from editx_jax.models import llm  # noqa: E402
from editx_jax.models.quantize import check_quantize, quantize_params  # noqa: E402


EDGE = 8  # steps timed on their own at the start and at the end of the decode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser, default="configs/llm_mid.yaml")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per batch size (median kept)")
    parser.add_argument("--prefill-repeats", type=int, default=5, help="timed batch-1 prefills (median kept)")
    parser.add_argument("--quantize", help="int8: time the int8 weights after the float ones, in the same run")
    parser.add_argument("--json", help="write the figures here (default: $BENCH_OUT/results_llm.json if set)")
    args = parser.parse_args(argv)
    try:
        quantize = check_quantize(args.quantize)
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")
    if args.new_tokens <= 2 * EDGE:
        parser.exit(1, f"error: --new-tokens must be more than {2 * EDGE}\n")

    config = load_config(args.config, args.overrides)
    # No early stop: an EOS id the random model will practically never sample.
    cfg = dataclasses.replace(config.llm, eos_id=config.llm.vocab_size - 1)
    gen = dataclasses.replace(config.generation, max_new_tokens=args.new_tokens)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  params: {cfg.num_params / 1e6:.1f}M "
          f"{cfg.param_dtype}/{cfg.dtype}  batch {args.batch}  prompt {args.prompt_len}  new {args.new_tokens}")
    floats = llm.init_params(cfg, jax.random.key(0))
    host = jax.tree_util.tree_map(np.asarray, floats) if quantize != "none" else None
    res = {"harness": "editx_jax tools/bench_llm.py", "config": args.config, "n_params": cfg.num_params,
           "dtype": cfg.param_dtype, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "waited_for_idle_at_start_s": round(wait_quiet(), 1)}
    res.update(bench(llm.split_layers(floats), cfg, gen, args))  # the form EditX holds
    del floats
    if quantize != "none":
        params, qcfg = quantize_params(host, cfg, quantize)
        print(f"-- {quantize}: params {tree_bytes(params) / 2**20:.1f} MiB")
        res[quantize] = bench(llm.split_layers(jax.device_put(params)), qcfg, gen, args)
        for b in args.batch:
            ratio = res[quantize][f"decode_b{b}"]["decode_tokens_per_s"] / res[f"decode_b{b}"]["decode_tokens_per_s"]
            print(f"decode {quantize} / float, batch {b}: {ratio:.2f}x")
    write_results(results_path(args.json, "llm"), res)


def bench(params, cfg, gen, args) -> dict:
    """Time prefill (batch 1) and, per batch size, decode and `generate`; print and return the figures
    under the official JSON keys (prefill_b1, decode_b<B>)."""
    p, n = args.prompt_len, args.new_tokens
    limit = min(gen.max_length, cfg.max_seq_len)
    bucketed, cache_len, room = widths(p, n, limit, gen.min_prompt_bucket)  # what `generate` compiles
    rng = np.random.RandomState(0)
    high = 65536 if cfg.vocab_size > 65536 else cfg.vocab_size
    out = {}
    for b in sorted(set([1] + list(args.batch))):
        prompts = rng.randint(5, high, (b, p)).astype(np.int32)  # equal lengths: no padding when p is bucketed
        tokens = np.full((b, bucketed), cfg.pad_id, np.int32)
        tokens[:, bucketed - p:] = prompts
        positions = np.full((b, bucketed), -1, np.int32)
        positions[:, bucketed - p:] = np.arange(p)
        recent = prompts[:, -max(gen.repetition_window, 1):]
        lengths = np.full((b,), p, np.int32)
        budget = np.full((b,), n, np.int32)
        row_keys = jax.random.split(jax.random.key(1), b)

        def run_prefill():
            return prefill(params, cfg, tokens, positions, llm.init_cache(cfg, b, cache_len))

        def run_decode(last, cache):
            """The decode of `generate`, in three calls (steps [0, 8), [8, n - 8), [n - 8, n)): seconds each."""
            state = initial_state(cfg, cache, last, recent, lengths, budget, room)
            seconds = []
            for stop in (EDGE, n - EDGE, n):
                state, t = timed(decode, params, cfg, gen, state, row_keys=row_keys, budget=budget, start=bucketed,
                                 max_steps=stop)
                seconds.append(t)
            assert int(state.step) == n, int(state.step)
            return seconds, state.cache

        t = time.perf_counter()
        last, cache = jax.block_until_ready(run_prefill())
        t_compile_prefill = time.perf_counter() - t
        t = time.perf_counter()
        _, cache = run_decode(last, cache)
        t_compile_decode = time.perf_counter() - t
        print(f"batch {b}: compile + first run: prefill {t_compile_prefill:.1f} s, decode {t_compile_decode:.1f} s",
              flush=True)

        if b == 1:
            times, info = guarded_runs(lambda: timed(run_prefill)[1], args.prefill_repeats)
            t_prefill = median(times)
            out["prefill_b1"] = {"prompt_len": p, "runs_s": times, "guard": info, "median_s": t_prefill,
                                 "tokens_per_s": p / t_prefill, "logits": "last position only (as generate)"}
            print(f"prefill: {p / t_prefill:,.0f} tokens/s ({t_prefill * 1e3:.1f} ms for 1x{p}, median of "
                  f"{len(times)})", flush=True)
        if b not in args.batch:
            continue

        def run_generation():
            (last, cache), t_pre = timed(run_prefill)
            # The read bandwidth this host gives moves within a minute (28-42 GB/s seen here): the
            # decode's roofline is measured beside it, just before and just after.
            before = read_bandwidth()
            seconds, cache = run_decode(last, cache)
            return t_pre, seconds, cache, max(before, read_bandwidth())

        runs, info = guarded_runs(run_generation, args.repeats)
        cache = runs[-1][2]
        per_step = median(sum(r[1]) / n for r in runs)  # n forward steps (the last one's logits unused)
        start_ms = 1e3 * median(r[1][0] / EDGE for r in runs)
        end_ms = 1e3 * median(r[1][2] / EDGE for r in runs)
        prompt_list = [list(map(int, row)) for row in prompts]
        generate(params, cfg, gen, prompt_list)  # compiles nothing new: the same shapes as above
        totals, _ = guarded_runs(lambda: timed(generate, params, cfg, gen, prompt_list)[1], args.repeats)
        t_generate = median(totals)

        copy = copy_bandwidth(1 << 28)
        # Every weight is read once per step except the embedding table, of which one row per sequence is.
        embedding = params["embed"]["embedding"]
        bytes_per_step = (tree_bytes(params) - embedding.nbytes + b * embedding[0].nbytes
                          + tree_bytes({"k": cache["k"], "v": cache["v"]}))
        # Each run against the bandwidth measured beside it (the median of those fractions), and, the
        # strictest figure, the median run against the highest bandwidth measured in any of them.
        bandwidths = [r[3] for r in runs]
        fraction = median(bytes_per_step / (sum(r[1]) / n) / r[3] for r in runs)
        bandwidth = max(bandwidths)
        roofline = bytes_per_step / bandwidth
        out[f"decode_b{b}"] = {
            "batch": b, "prompt_len": p, "new_tokens": n, "timed_runs": len(runs), "guard": info,
            "decode_steps": n - 1,
            # The official figure times the n - 1 forward steps after the prefill's token; our loop runs n
            # (its last token is fed through the model too): its median per-step time x (n - 1).
            "decode_s_median": per_step * (n - 1), "decode_tokens_per_s": b / per_step,
            "decode_steps_per_s": 1 / per_step,
            "generate_total_s_median": t_generate, "generate_tokens_per_s_incl_prefill": b * n / t_generate,
            "prefill_in_generate_s_median": median(r[0] for r in runs),
            "per_step_ms_start": start_ms, "per_step_ms_end": end_ms,
            "cache_slots": cache_len, "compile_s": {"prefill": t_compile_prefill, "decode": t_compile_decode},
            "read_bandwidth_GBps_per_run": [x / 1e9 for x in bandwidths], "roofline_fraction": fraction,
            "read_bandwidth_GBps_highest": bandwidth / 1e9, "roofline_ms_per_step_highest": roofline * 1e3,
            "roofline_fraction_highest": roofline / per_step, "copy_bandwidth_GBps": copy / 1e9,
            "copy_roofline_fraction": bytes_per_step / copy / per_step,
        }
        print(f"decode batch {b}: {b / per_step:,.1f} tokens/s ({per_step * 1e3:.2f} ms/step over {n} steps, "
              f"first {EDGE} {start_ms:.1f} ms, last {EDGE} {end_ms:.1f} ms; median of {len(runs)}); generate() "
              f"end to end {b * n / t_generate:,.1f} tokens/s")
        print(f"memory bandwidth (measured): read {', '.join(f'{x / 1e9:.1f}' for x in bandwidths)} GB/s beside "
              f"the runs, copy {copy / 1e9:.1f} GB/s (read and write counted); bytes read per decode step: "
              f"{bytes_per_step / 1e9:.3f} GB; decode reads {bytes_per_step / per_step / 1e9:.1f} GB/s")
        print(f"decode speed = {fraction:.1%} of the memory-bandwidth roofline (read, measured beside each run; "
              f"{roofline / per_step:.1%} of the highest read figure, {bandwidth / 1e9:.1f} GB/s -> "
              f"{roofline * 1e3:.2f} ms/step; {bytes_per_step / copy / per_step:.1%} of the copy figure)", flush=True)
        peaks = device_peaks()
        if peaks is not None:
            out[f"decode_b{b}"]["hbm_fraction"] = bytes_per_step / per_step / peaks[1]
            print(f"decode reads {bytes_per_step / per_step / 1e9:.0f} GB/s = {bytes_per_step / per_step / peaks[1]:.1%} "
                  f"of HBM peak ({peaks[1] / 1e12:.2f} TB/s, {jax.devices()[0].device_kind})", flush=True)
    kind, peak = peak_memory_bytes()
    print(f"{kind}: {peak / 2**30:.2f} GiB")
    out["peak_memory_GiB"] = peak / 2**30
    return out


if __name__ == "__main__":
    main()
