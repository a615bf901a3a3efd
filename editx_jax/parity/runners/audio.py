"""Parity runner for the `audio_preprocess` fixtures (official StepAudioTokenizer.preprocess_wav)."""

from __future__ import annotations

import numpy as np

from editx_jax.audio import io as audio_io


def run_preprocess(fx) -> dict[str, np.ndarray]:
    """For each case X: X_resampled (only when the rate changes), X_energy_normed, X_trim_index, X_out."""
    cfg = fx.config
    target = int(cfg.get("target_sample_rate", audio_io.TOKENIZER_SAMPLE_RATE))
    rs = cfg.get("resample", {})
    norm = cfg.get("energy_norm_fn", {})
    trim = cfg.get("trim_silence", {})
    lib = trim.get("librosa_trim", {})
    inputs = fx.inputs()
    outputs = {}
    for case in cfg["cases"]:
        wave = audio_io.check_wave(inputs[f"{case}_wav"], f"case {case}")
        sr = int(inputs[f"{case}_sr"])
        if sr != target:
            wave = audio_io.resample(wave, sr, target, width=int(rs.get("lowpass_filter_width", 6)),
                                  rolloff=float(rs.get("rolloff", 0.99)))
            outputs[f"{case}_resampled"] = wave[None]
        if cfg.get("energy_norm", True):
            wave = audio_io.energy_norm(wave, peak=float(norm.get("scale", 0.999)),
                                     floor=float(norm.get("floor", 0.01)))
        outputs[f"{case}_energy_normed"] = wave[None]
        if cfg.get("enable_trim", True):
            wave, span = audio_io.trim_silence(
                wave, target, keep_left_time=float(trim.get("keep_left_time", 0.05)),
                keep_right_time=float(trim.get("keep_right_time", 0.22)), hop_size=int(trim.get("hop_size", 240)),
                top_db=float(lib.get("top_db", 20)), frame_length=int(lib.get("frame_length", 512)),
                hop_length=int(lib.get("hop_length", 128)), return_span=True)
            outputs[f"{case}_trim_index"] = np.asarray(span, np.int64)
        outputs[f"{case}_out"] = wave[None]
    return outputs
