"""Parity runners for `token2wav` (flow + BigVGAN) and `token2wav_hift` (flow + HiFT):
`CosyVoice_stream_impl_.token2wav_nonstream` end to end through `editx_jax.decoder.token2wav.Decoder`.

The fixture's `token` / `prompt_token` are LLM ids - AUDIO_ID_OFFSET (what tts.py passes); the Decoder
takes LLM ids, so the offset is added back. Weights are the impl's state dict: `flow.*` (= flow.pt) and
`hift.*` (= hift.pt, or the BigVGAN state dict), converted with our converters.
"""

from __future__ import annotations

import numpy as np

from editx_jax.convert.decoder import CONVERTERS
from editx_jax.convert.flow import convert_flow, flow_config_from_reference
from editx_jax.decoder.hift import NSFNoise
from editx_jax.decoder.token2wav import Decoder, Token2WavConfig
from editx_jax.vocab import AUDIO_ID_OFFSET


def _split(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _decoder(fx, vocoder: str):
    cfg = fx.config
    weights = fx.weights()
    unknown = sorted(k for k in weights if not k.startswith(("flow.", "hift.")))
    if unknown:
        raise KeyError(f"unexpected weight {unknown[0]!r} (expected flow.* and hift.*)")
    flow_config = flow_config_from_reference(cfg["flow"])
    flow_params = convert_flow(_split(weights, "flow."), flow_config)
    conv = CONVERTERS[vocoder]  # the vocoder's block and weights are `hift` whichever vocoder it is
    voc_config = conv.config_from_reference(cfg["hift"])
    voc_params = conv.from_state_dict(_split(weights, "hift."), voc_config)
    # constructor arguments of CosyVoice_stream_impl_, all recorded in the manifest: no defaults here
    t2w = Token2WavConfig(vocoder=vocoder, n_timesteps=int(cfg["n_timesteps"]),
                          chunk_size_list=tuple(cfg["chunk_size_list"]), mel_cache_len=int(cfg["mel_cache_len"]))
    return Decoder(flow_params, flow_config, voc_params, voc_config, config=t2w)


def _run(fx, vocoder: str) -> dict[str, np.ndarray]:
    decoder = _decoder(fx, vocoder)
    inputs = fx.inputs()
    # the recorded NSF draws, for a vocoder that takes them (the HiFT fixture)
    nsf = NSFNoise(inputs["nsf_phase_rand"], inputs["nsf_sine_noise"]) if decoder.vocoder.nsf is not None else None
    out = decoder.token2wav(inputs["token"][0] + AUDIO_ID_OFFSET, inputs["prompt_token"][0] + AUDIO_ID_OFFSET,
                            inputs["prompt_feat"][0], inputs["embedding"][0],
                            noise=np.swapaxes(inputs["rand_noise"], 1, 2), nsf_noise=nsf)
    return {"speech": out.speech[:, :int(out.lengths[0])],
            "mel": np.swapaxes(out.mel[:, :int(out.mel_lengths[0])], 1, 2)}


def run_token2wav(fx) -> dict[str, np.ndarray]:
    """speech (1, 2T*480) and mel (1, 80, 2T): flow + BigVGAN (mel reflect-padded by 3 frames)."""
    return _run(fx, "bigvgan")


def run_token2wav_hift(fx) -> dict[str, np.ndarray]:
    """speech (1, 2T*480) and mel (1, 80, 2T): flow + HiFT with the recorded NSF draws."""
    return _run(fx, "hift")
