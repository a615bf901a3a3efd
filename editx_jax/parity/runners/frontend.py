"""Parity runners for the front-end fixtures: `wav_frontend`, `wav_frontend_online`, `whisper_logmel128`."""

from __future__ import annotations

import numpy as np

from editx_jax.audio import features
from editx_jax.convert.tokenizer import fbank_config_from_reference, whisper_mel_config_from_reference


def run_wav_frontend(fx) -> dict[str, np.ndarray]:
    """Offline funasr WavFrontend on a [B, N] batch (optional `input_lengths`): feats [B, T, D], feats_lens [B].

    Rows of different lengths are padded with zeros after their last frame, as pad_sequence does.
    """
    config = fbank_config_from_reference(fx.config)
    inputs = fx.inputs()
    waves = np.atleast_2d(inputs["waveform"])
    lengths = inputs.get("input_lengths", np.full(waves.shape[0], waves.shape[1]))
    cmvn = inputs.get("cmvn")
    feats = [np.asarray(features.wav_frontend(w[:int(n)], cmvn, config)) for w, n in zip(waves, lengths)]
    lens = np.array([f.shape[0] for f in feats], np.int64)
    out = np.zeros((len(feats), lens.max(), config.feat_dim), np.float32)
    for b, f in enumerate(feats):
        out[b, :f.shape[0]] = f
    return {"feats": out, "feats_lens": lens}


def run_wav_frontend_online(fx) -> dict[str, np.ndarray]:
    """WavFrontendOnline driven as ParaformerStreaming.infer_encoder: feats [1, T, D], chunk_lens [K].

    Uses the step-by-step emulation (the reference itself), and checks it against the fast path.
    """
    config = fbank_config_from_reference(fx.config)
    inputs = fx.inputs()
    wave, cmvn = inputs["waveform"].reshape(-1), inputs.get("cmvn")
    feats, lens = features.wav_frontend_online_stepwise(wave, cmvn, config)
    fast_feats, fast_lens = features.wav_frontend_online(wave, cmvn, config)
    if fast_lens != lens or not np.allclose(np.asarray(fast_feats), feats, atol=1e-4, rtol=1e-5):
        raise AssertionError("fast streaming front end disagrees with the step-by-step emulation")
    return {"feats": feats[None], "chunk_lens": np.asarray(lens, np.int32)}


def run_whisper_logmel(fx) -> dict[str, np.ndarray]:
    """whisper.log_mel_spectrogram(audio, n_mels) -> log_mel [n_mels, N // hop] (or batched [..., N])."""
    config = whisper_mel_config_from_reference(fx.config)
    audio = fx.inputs()["audio"]
    return {"log_mel": np.asarray(features.whisper_log_mel(audio, config))}
