"""Parity runners for the vocoder fixtures: `hift` (HiFTGenerator.inference) and `bigvgan`."""

from __future__ import annotations

import numpy as np

from editx_jax.convert import bigvgan as convert_bigvgan
from editx_jax.convert import hift as convert_hift
from editx_jax.convert.bigvgan import bigvgan_config_from_reference
from editx_jax.convert.hift import hift_config_from_reference
from editx_jax.decoder.bigvgan import bigvgan_inference
from editx_jax.decoder.hift import NSFNoise, hift_inference


def run_hift(fx) -> dict[str, np.ndarray]:
    """speech (B, L), source (B, 1, L), f0 (B, T) from speech_feat (B, 80, T) and the recorded NSF draws.

    `nsf_source_noise` is drawn by the reference but never read, so it is not used here.
    """
    config = hift_config_from_reference(fx.config)
    params = convert_hift.from_state_dict(fx.weights(), config)
    inputs = fx.inputs()
    noise = NSFNoise(inputs["nsf_phase_rand"], inputs["nsf_sine_noise"])
    out = hift_inference(params, inputs["speech_feat"], config, noise=noise)
    return {"speech": np.asarray(out.speech), "source": np.asarray(out.source)[:, None, :],
            "f0": np.asarray(out.f0)}


def run_bigvgan(fx) -> dict[str, np.ndarray]:
    """wav (B, 1, (T - 6) * 480) from mel (B, 80, T)."""
    config = bigvgan_config_from_reference(fx.config)
    params = convert_bigvgan.from_state_dict(fx.weights(), config)
    wav = bigvgan_inference(params, fx.inputs()["mel"], config)
    return {"wav": np.asarray(wav)[:, None, :]}
