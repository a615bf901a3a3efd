"""Parity runners for the prompt features: `mel_24k`, `campplus_fbank`, `campplus`."""

from __future__ import annotations

import numpy as np

from editx_jax.audio.features import kaldi_fbank
from editx_jax.audio.io import cap_peak, resample
from editx_jax.config import ConfigError
from editx_jax.convert.campplus import campplus_config_from_reference, from_state_dict
from editx_jax.convert.decoder import mel_config_from_reference
from editx_jax.decoder import campplus, mel


def run_mel_24k(fx) -> dict[str, np.ndarray]:
    """0.6 peak cap, then the flow's log-mel: wav [B, N], speech_feat [B, T, 80], speech_feat_len [B]."""
    config = mel_config_from_reference(fx.config["mel_conf"])
    inputs = fx.inputs()
    wav = np.atleast_2d(inputs["wav_raw"])
    sr = int(inputs.get("sample_rate", config.sampling_rate))
    wav = np.stack([cap_peak(w) for w in wav])  # the cap is per utterance (tts.py preprocess_prompt_wav)
    if sr != config.sampling_rate:
        wav = resample(wav, sr, config.sampling_rate)
    feat = np.asarray(mel.mel_spectrogram(wav, config))
    return {"wav": wav, "speech_feat": feat, "speech_feat_len": np.full(wav.shape[0], feat.shape[1], np.int64)}


def run_campplus_fbank(fx) -> dict[str, np.ndarray]:
    """Resample to 16 kHz, Kaldi fbank (Povey), CMN: wav_16k [1, M], fbank [T, 80], feat [T, 80]."""
    cfg = fx.config
    fbank_cfg = cfg.get("fbank", {})
    if float(fbank_cfg.get("dither", 0.0)) != 0.0:
        raise ConfigError("campplus_fbank.dither: only dither 0 is reproducible")
    target = int(cfg.get("resample_to", campplus.SAMPLE_RATE))
    if int(fbank_cfg.get("sample_frequency", target)) != campplus.SAMPLE_RATE or target != campplus.SAMPLE_RATE:
        raise ConfigError("campplus_fbank.sample_frequency: the CAM++ front end runs at 16 kHz")
    inputs = fx.inputs()
    wav16k = resample(inputs["wav"], int(inputs["sample_rate"]), target)
    n_mels = int(fbank_cfg.get("num_mel_bins", 80))
    fbank = np.asarray(kaldi_fbank(wav16k, campplus.fbank_config(n_mels)))
    feat = fbank - fbank.mean(axis=-2, keepdims=True)
    squeeze = (lambda a: a[0]) if fbank.ndim == 3 and fbank.shape[0] == 1 else (lambda a: a)
    return {"wav_16k": wav16k, "fbank": squeeze(fbank), "feat": squeeze(feat)}


def run_campplus(fx) -> dict[str, np.ndarray]:
    """CAM++ on feat [B, T, 80]: embedding [B, E], frame_features [B, C, ceil(T/2)] (torch layout)."""
    config = campplus_config_from_reference(fx.config)
    params = from_state_dict(fx.weights(), config)
    emb, frames = campplus.embed_feats(params, fx.inputs()["feat"], config, return_frames=True)
    return {"embedding": np.asarray(emb), "frame_features": np.asarray(frames).transpose(0, 2, 1)}
