"""One edit end to end, per stage, with random weights at the released sizes (by default).

    python tools/bench_edit.py [--config configs/step_audio_editx.yaml] [--seconds 5] [--new-tokens N]
        [--dtype float32|bfloat16] [--quantize int8] [--runs 1|2]

Prints seconds per stage (tokenize, generate, decode) and the real-time factor (stage seconds per
second of output audio) for a warm run, after a first run that compiles. Random weights never stop
at EOS, so the LLM writes exactly --new-tokens tokens (default: as many as the clip has, about
41.7 per second, like an edit that keeps the length). Ends with the process's peak memory against the
LLM's params bytes (the issue-10 budget: at most the params plus 5 GB), and, on Linux, the host
peak RSS while the model is built (the weights drawn, the LLM put in its inference form) and inside
each stage of both runs (tokenize, speaker prompt, generate, token2wav), to show which sets the peak.
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
import soundfile as sf  # noqa: E402

from editx_jax.benchmarking import peak_memory_bytes, reset_peak_rss, tree_bytes, window_peak_rss  # noqa: E402
from editx_jax.config import add_config_args, load_config  # noqa: E402
from editx_jax.models.quantize import check_quantize  # noqa: E402
from editx_jax.pipeline import EditX  # noqa: E402

DEMO_CLIP = pathlib.Path(__file__).resolve().parents[1] / "editx_jax" / "assets" / "demo_prompt.wav"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser, default="configs/step_audio_editx.yaml")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the input clip")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--dtype", help="LLM weights and compute: float32 or bfloat16 (default: the config's)")
    parser.add_argument("--quantize", help="int8: int8 LLM weights (random float weights quantized)")
    parser.add_argument("--runs", type=int, choices=(1, 2), default=2,
                        help="2: a first run that compiles, then a warm run; 1: the first run only")
    args = parser.parse_args(argv)
    try:
        quantize = check_quantize(args.quantize)
        if args.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")

    config = load_config(args.config, args.overrides)
    n_new = args.new_tokens or int(round(args.seconds * 25 / 3 * 5))  # 41.67 audio tokens per second
    dtypes = {"dtype": args.dtype, "param_dtype": args.dtype} if args.dtype else {}
    config = dataclasses.replace(
        config, llm=dataclasses.replace(config.llm, eos_id=config.llm.vocab_size - 1, quantize=quantize, **dtypes),
        generation=dataclasses.replace(config.generation, max_new_tokens=n_new))
    print(f"device {jax.devices()[0].device_kind}; LLM {config.llm.num_params / 1e9:.2f}B "
          f"{config.llm.param_dtype} (quantize {quantize}); clip {args.seconds:.1f} s; {n_new} new tokens")
    t = time.perf_counter()
    model = EditX.random(config)
    params_bytes = tree_bytes(model._llm_weights)
    tok, dec = model.audio_tokenizer, model.decoder
    other_bytes = tree_bytes([tok.paraformer_params, tok.vq02_codebook, tok.s3_params, dec.flow_params,
                              dec.vocoder_params, dec.campplus_params])
    _, build_peak = peak_memory_bytes()  # before the stages reset the high-water mark
    print(f"random model built in {time.perf_counter() - t:.1f} s; LLM params {params_bytes / 2**30:.2f} GiB; "
          f"tokenizer and decoder params {other_bytes / 2**30:.2f} GiB (inside the params + 5 GB budget); "
          f"host peak RSS while building: LLM params + {(build_peak - params_bytes) / 2**30:.2f} GiB")

    base, sr = sf.read(DEMO_CLIP, dtype="float32")
    reps = int(np.ceil(args.seconds * sr / len(base)))
    clip = np.tile(base, reps)[:int(args.seconds * sr)]

    stage_peaks = watch_stage_peaks(model)
    peaks = [build_peak]
    for label in ("first run (compiles)", "warm run")[:args.runs]:
        stage_peaks.clear()
        t = time.perf_counter()
        wave, out_sr = model.edit(clip, "the weather is nice today", "emotion", "happy", sample_rate=sr)
        total = time.perf_counter() - t
        timings = model.last_info["timings"]
        out_seconds = len(wave) / out_sr
        print(f"{label}: total {total:.2f} s for {out_seconds:.2f} s of output (RTF {total / out_seconds:.3f}), "
              f"of which compiling {model.last_info['compile_seconds']:.2f} s")
        for stage, seconds in timings.items():
            print(f"  {stage:9s} {seconds:8.2f} s   RTF {seconds / out_seconds:.3f}")
        if stage_peaks:
            print("  host peak RSS inside each stage, over the LLM params: " + ", ".join(
                f"{stage} +{(peak - params_bytes) / 2**30:.2f}" for stage, peak in stage_peaks.items()) + " GiB")
            peaks += stage_peaks.values()
    kind, peak = peak_memory_bytes()
    peak = max(peak, *peaks)  # the high-water mark was reset before each stage: the highest of them all
    print(f"{kind}: {peak / 2**30:.2f} GiB = LLM params {params_bytes / 2**30:.2f} GiB + "
          f"{(peak - params_bytes) / 2**30:.2f} GiB (budget: params + 5 GB = {(params_bytes + 5e9) / 2**30:.2f} GiB)")


def watch_stage_peaks(model) -> dict:
    """Wrap the model's stages so each call records the host peak RSS inside it; returns the dict
    they fill ({stage: bytes}), empty where the peak can't be reset per stage (not Linux)."""
    peaks: dict[str, int] = {}
    if not reset_peak_rss():
        return peaks
    stages = ((model.audio_tokenizer, "tokenize", "tokenize"), (model.decoder, "prompt_features", "speaker prompt"),
              (model, "_generate", "generate"), (model.decoder, "token2wav", "token2wav"))
    for owner, name, stage in stages:
        def watched(*args, _call=getattr(owner, name), _stage=stage, **kwargs):
            reset_peak_rss()
            out = _call(*args, **kwargs)
            peaks[_stage] = max(peaks.get(_stage, 0), window_peak_rss())
            return out
        setattr(owner, name, watched)
    return peaks


if __name__ == "__main__":
    main()
