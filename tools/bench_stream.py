"""Streaming token2wav (`Token2WavStream`) at the released sizes, random weights: latency and compiles.

    python tools/bench_stream.py [--seconds 10] [--prompt-seconds 3 3.5] [--config configs/tiny.yaml]

Streams `--seconds` of LLM audio ids, pushed one id at a time as generation produces them, after a
prompt of each `--prompt-seconds` (one stream per value, one after another in this process). Per
stream it prints the time to the first audio, and per chunk its mel frames, wall seconds and the
seconds of it spent compiling (`compile_cache.compile_seconds`); then how many times each jitted
chunk function compiled. Prompts that fall in one bucket (PROMPT_BUCKET pairs) share every chunk
compilation but the last chunk's vocoder, so the second stream should compile (almost) nothing.
The persistent compilation cache is off here, so the first stream shows the cold compile cost.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("EDITX_JAX_CACHE", "off")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from editx_jax.compile_cache import compile_seconds  # noqa: E402
from editx_jax.config import add_config_args, load_config  # noqa: E402
from editx_jax.decoder import flow, hift, stream  # noqa: E402
from editx_jax.decoder.stream import Token2WavStream  # noqa: E402
from editx_jax.decoder.token2wav import Decoder  # noqa: E402
from editx_jax.random_init import random_params  # noqa: E402
from editx_jax.vocab import AUDIO_ID_OFFSET  # noqa: E402

TOKENS_PER_S = 125 / 3  # 5 ids per 3 pair frames at 25 Hz


def audio_ids(n: int, seed: int) -> np.ndarray:
    """n LLM audio ids in the group pattern [vq02, vq02, vq06, vq06, vq06]."""
    rng = np.random.default_rng(seed)
    values = [int(rng.integers(0, 1024)) if i % 5 < 2 else 1024 + int(rng.integers(0, 4096)) for i in range(n)]
    return AUDIO_ID_OFFSET + np.asarray(values, np.int64)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)  # the flow:, hift: and token2wav: sections (default: the released sizes)
    parser.add_argument("--seconds", type=float, default=10.0, help="speech per stream")
    parser.add_argument("--prompt-seconds", type=float, nargs="+", default=[3.0, 3.5])
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    fp = jax.device_put(random_params(flow.abstract_params(config.flow), 0))
    hp = jax.device_put(random_params(hift.abstract_params(config.hift), 1, kernel_scale=0.3))
    decoder = Decoder(fp, config.flow, hp, config.hift, config=config.token2wav)
    print(f"device {jax.devices()[0].device_kind}; chunks {list(config.token2wav.chunk_size_list)} pair frames; "
          f"{args.seconds:g} s per stream, ids pushed one at a time", flush=True)
    gen = audio_ids(int(round(args.seconds * TOKENS_PER_S)), seed=1)
    rng = np.random.default_rng(2)
    functions = {"encoder chunk": stream.encoder_chunk, "DiT chunk ODE": stream.dit_chunk_ode}
    for i, prompt_seconds in enumerate(args.prompt_seconds):
        prompt = audio_ids(5 * int(round(prompt_seconds * TOKENS_PER_S / 5)), seed=10 + i)
        prompt_mel = rng.normal(-5, 2, (2 * 3 * len(prompt) // 5, 80)).astype(np.float32)
        embedding = rng.normal(size=192).astype(np.float32)
        before = {name: f._cache_size() for name, f in functions.items()}
        st = Token2WavStream(decoder, prompt, prompt_mel, embedding)
        start = time.perf_counter()
        first_audio, chunks, samples = None, [], 0
        for j, token in enumerate(gen):
            t, c = time.perf_counter(), compile_seconds()
            out = st.push([token], last=j == len(gen) - 1)
            if out.size:
                first_audio = first_audio or time.perf_counter() - start
                chunks.append((st.mels[-1].shape[0], time.perf_counter() - t, compile_seconds() - c))
                samples += out.size
        total = time.perf_counter() - start
        print(f"stream {i + 1}: prompt {prompt_seconds:g} s ({len(prompt)} ids); first audio after {first_audio:.2f} s; "
              f"{samples / 24000:.2f} s of speech in {total:.2f} s (RTF {total / (samples / 24000):.3f}), "
              f"compiling {sum(c for _, _, c in chunks):.2f} s of it", flush=True)
        for k, (frames, seconds, compiling) in enumerate(chunks):
            print(f"  chunk {k + 1:2d}: {frames:3d} mel frames  {seconds:6.2f} s  (compiling {compiling:5.2f} s)")
        print("  compilations in this stream: " + ", ".join(
            f"{name} {f._cache_size() - before[name]}" for name, f in functions.items()), flush=True)


if __name__ == "__main__":
    main()
