"""Audio tokenizer speed: seconds of audio tokenized per second (vq02 and vq06 encoders, interleave), at the
released sizes with random weights (drawn in numpy: no real weights needed), for each batch size.

    python tools/bench_tokenizer.py                          # performance.md: first 10 s of denoise_prompt.wav
    python tools/bench_tokenizer.py a.wav b.wav --seconds 0 --batch 1 4 --repeats 3 [--tiny]
    python tools/bench_tokenizer.py --json results_tokenizer.json   # also the figures as JSON (or env BENCH_OUT)

`--seconds S` (default 10, the work of shared/bench-official/bench_tokenizer.py) tokenizes the first S s
of each 16 kHz file, energy-normalised and not trimmed, so every pass has exactly S s per item;
`--seconds 0` runs end to end from the files (read, resample, normalise, trim) and times that too.
Prints the machine's measured GEMM FLOP/s and copy bandwidth, then per batch size: the compile time
(the first pass minus the median pass), the median of `--repeats` timed passes split into
preprocessing / vq02 / vq06 (each stage's own median; passes made while other processes were busy are
discarded and repeated, see `benchmarking.guarded_runs`), the machine's load average during them, the
throughput in audio seconds per second, the real-time factor (wall time / audio time; below 1 is
faster than real time) overall and per stream, and each stream's useful FLOP/s as a share of GEMM.
The JSON has the official keys for batch 1 (vq02 / vq06 -> median_s / rtf -> total_s).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from editx_jax.audio import io as audio_io  # noqa: E402
from editx_jax.benchmarking import (copy_bandwidth, guarded_runs, matmul_flops, peak_memory_bytes,  # noqa: E402
                                    results_path, wait_quiet, write_results)
from editx_jax.codes import interleave_ids  # noqa: E402
from editx_jax.tokenizer import s3tokenizer as s3  # noqa: E402
from editx_jax.tokenizer.audio_tokenizer import AudioTokenizer, AudioTokenizerConfig, _logmel  # noqa: E402
from editx_jax.tokenizer.vq02 import vq02_codes_from_features, vq02_features  # noqa: E402


def first_seconds(tok, path: pathlib.Path, seconds: float) -> np.ndarray:
    """The first `seconds` of a 16 kHz file, mono, energy-normalised, untrimmed (the official harness's input)."""
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != tok.config.sample_rate or wave.shape[0] < seconds * sr:
        raise SystemExit(f"error: {path}: need {tok.config.sample_rate} Hz audio of at least {seconds} s "
                         f"(got {sr} Hz, {wave.shape[0] / sr:.2f} s); or pass --seconds 0")
    return audio_io.energy_norm(wave.mean(1)[: round(seconds * sr)], peak=tok.config.energy_peak)


def vq02_flops(cfg, chunk_lens) -> float:
    """Matmul + attention FLOPs the streaming vq02 encoder must do (every call's window of
    overlap + new frames through every layer, then the k-means distances of the new frames)."""
    d, f = cfg.output_size, cfg.linear_units
    total = 0.0
    for lens in chunk_lens:
        cache = 0
        for n in lens:
            w = cfg.overlap_frames + n
            keys = cache + w
            layer = lambda din: 2 * w * (din * 3 * d + d * d + 2 * d * f + d * cfg.kernel_size) + 4 * w * keys * d  # noqa: E731
            total += layer(cfg.input_size) + (cfg.num_blocks - 1) * layer(d) + 2 * n * d * 1024
            cache = min(cfg.cache_frames, cache + cfg.chunk_size[0] + n) if cache or n else cache
    return total


def vq06_flops(cfg, waves) -> float:
    """FLOPs of the S3 encoder and VQ over the official 30 s pieces (no padding counted)."""
    d = cfg.n_audio_state
    total = 0.0
    for wave in waves:
        for piece in s3.split_chunks(wave, cfg):
            t = piece.shape[0] // cfg.hop_length
            t1 = s3.conv_out_len(t, cfg.conv1_stride)
            t2 = s3.conv_out_len(t1, 2)
            total += 2 * t1 * cfg.n_mels * 3 * d + 2 * t2 * d * 3 * d
            total += cfg.n_audio_layer * (2 * t2 * 12 * d * d + 4 * t2 * t2 * d)
            total += 2 * t2 * d * cfg.codebook_size
    return total


def run_once(tok, load) -> dict:
    """One pass over the waves `load()` gives, timed per stage (each stage waits for its results)."""
    cfg = tok.config
    t0 = time.perf_counter()
    waves = load()
    t1 = time.perf_counter()
    feats, lens = zip(*(vq02_features(w, tok.cmvn, cfg.fbank) for w in waves))
    vq02 = vq02_codes_from_features(tok.paraformer_params, tok.vq02_codebook, cfg.paraformer, feats, lens,
                                    cfg.vq02_block_calls)
    t2 = time.perf_counter()
    vq06 = s3.tokenize_waveforms(tok.s3_params, waves, cfg.s3, batch_size=cfg.vq06_batch,
                                 logmel_fn=functools.partial(_logmel, config=cfg.whisper_mel))
    t3 = time.perf_counter()
    ids = [interleave_ids(a, b) for a, b in zip(vq02, vq06)]
    t4 = time.perf_counter()
    return {"pre": t1 - t0, "vq02": t2 - t1, "vq06": t3 - t2, "total": t4 - t0,
            "tokens": sum(i.size for i in ids), "vq02_flops": vq02_flops(cfg.paraformer, lens),
            "vq06_flops": vq06_flops(cfg.s3, waves)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_tokenizer.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=pathlib.Path, default=[ROOT / "tests" / "audio" / "denoise_prompt.wav"],
                        help="audio files (default: tests/audio/denoise_prompt.wav)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="tokenize the first S s of each file, untrimmed (default 10; 0: whole files, end to end)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per batch size (the median is kept)")
    parser.add_argument("--tiny", action="store_true", help="tiny encoders instead of the released sizes")
    parser.add_argument("--json", help="write the figures here (default: $BENCH_OUT/results_tokenizer.json if set)")
    args = parser.parse_args(argv)

    files = args.files
    config = AudioTokenizerConfig.tiny() if args.tiny else AudioTokenizerConfig()
    t = time.perf_counter()
    tok = AudioTokenizer.random(config)
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tok.params))
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  sizes: "
          f"{'tiny' if args.tiny else 'released'} ({n_params / 1e6:.1f}M params, random)  "
          f"init: {time.perf_counter() - t:.1f} s")
    peak = matmul_flops()
    print(f"machine: float32 GEMM {peak / 1e9:.0f} GFLOP/s, copy bandwidth {copy_bandwidth() / 1e9:.1f} GB/s "
          f"(measured now; other load on the machine lowers both)")
    if args.seconds > 0:
        fixed = {f: first_seconds(tok, f, args.seconds) for f in files}
        durations = {f: args.seconds for f in files}
    else:
        durations = {f: sf.info(str(f)).duration for f in files}
    print(f"files: {len(files)}, {min(durations.values()):.1f}-{max(durations.values()):.1f} s each")
    print(f"{'batch':>5} {'audio s':>8} {'compile':>8} {'pre s':>6} {'vq02 s':>7} {'vq06 s':>7} {'total s':>8} "
          f"{'audio s/s':>9} {'RTF':>6} {'RTF02':>6} {'RTF06':>6} {'%GEMM02':>7} {'%GEMM06':>7} {'load':>5}")
    res = {"harness": "editx_jax tools/bench_tokenizer.py", "tiny": args.tiny, "files": [str(f) for f in files],
           "seconds": args.seconds, "gemm_flops": peak, "waited_for_idle_at_start_s": round(wait_quiet(), 1)}
    for batch in args.batch:
        chosen = [files[i % len(files)] for i in range(batch)]
        audio_seconds = sum(durations[f] for f in chosen)
        if args.seconds > 0:
            load = lambda chosen=chosen: [fixed[f] for f in chosen]  # noqa: E731
        else:
            load = lambda chosen=chosen: [tok.load(f) for f in chosen]  # noqa: E731
        first = run_once(tok, load)["total"]  # compiles the shapes of this batch
        load0 = os.getloadavg()[0]
        runs, info = guarded_runs(lambda load=load: run_once(tok, load), max(1, args.repeats))
        med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}  # median per stage
        load = (load0 + os.getloadavg()[0]) / 2
        rate = audio_seconds / med["total"]
        print(f"{batch:>5} {audio_seconds:>8.1f} {first - med['total']:>8.2f} {med['pre']:>6.2f} {med['vq02']:>7.2f} "
              f"{med['vq06']:>7.2f} {med['total']:>8.2f} {rate:>9.1f} {1 / rate:>6.3f} "
              f"{med['vq02'] / audio_seconds:>6.3f} {med['vq06'] / audio_seconds:>6.3f} "
              f"{100 * med['vq02_flops'] / med['vq02'] / peak:>6.0f}% "
              f"{100 * med['vq06_flops'] / med['vq06'] / peak:>6.0f}% {load:>5.1f}", flush=True)
        if batch == 1:  # the official keys: one item of `seconds` audio
            for stream in ("vq02", "vq06"):
                res[stream] = {"timed_runs": len(runs), "guard": info, "compile_s": first - med["total"],
                               "median_s": {"total_s": med[stream]}, "rtf": {"total_s": med[stream] / audio_seconds},
                               "gemm_fraction": med[f"{stream}_flops"] / med[stream] / peak,
                               "runs_s": [r[stream] for r in runs]}
    kind, peak_bytes = peak_memory_bytes()
    print(f"{kind}: {peak_bytes / 2**20:.0f} MiB")
    res["peak_memory_GiB"] = peak_bytes / 2**30
    print(f"load: the 1-minute load average during the timed passes ({os.cpu_count()} cores); compile: the "
          "first pass minus the median pass")
    print("RTF = wall / audio time (RTF02 / RTF06: each stream's stage incl. its front end); %GEMM: the "
          "stream's useful FLOP/s as a share of the measured GEMM FLOP/s (performance.md targets: "
          "vq02 RTF <= 0.11, vq06 RTF <= 0.036 on 10 s at batch 1, 2 idle vCPUs)")
    write_results(results_path(args.json, "tokenizer"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
