"""The vocoders a decoder can end with, decided once: one table keyed by `token2wav.vocoder`.

Everything that differs between HiFT (the released vocoder) and BigVGAN lives in its entry here, and
the decoder (`Decoder.__init__` / `from_pretrained` / `vocode`), the stream (`Token2WavStream`) and the
pipeline (`EditX.from_pretrained` / `random`) look the entry up instead of branching on the name. The
converters have their own table keyed by the same names (`editx_jax/convert/decoder.py: CONVERTERS`),
so this file imports nothing from `convert/`.

Adding a vocoder (say Vocos): its module in `decoder/` (config class, `init_params`,
`abstract_params`, an inference function), its converter in `convert/`, one entry in `REGISTRY`
and one in `convert/decoder.py: CONVERTERS`, its name in `config.VOCODERS` and a config section
of that name in `config.Config`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, NamedTuple

import numpy as np

from editx_jax.config import BIGVGAN_CONTEXT, ConfigError
from editx_jax.decoder import bigvgan, hift
from editx_jax.decoder.bigvgan import BigVGANConfig, bigvgan_inference
from editx_jax.decoder.hift import HiFTConfig, draw_nsf_noise, hift_decode, hift_inference, hift_source


class NSF(NamedTuple):
    """What a vocoder with a neural-source-filter excitation adds: its random draws and its two halves,
    so that the stream can carry the excitation across chunk boundaries (the reference's cache_source)."""

    draw: Callable  # (key, batch, frames, config) -> the draws (a pytree with the batch first)
    source: Callable  # (params, mel_bct, draws, config) -> excitation (B, hop*T)
    decode: Callable  # (params, mel_bct, excitation, config) -> speech (B, hop*T)


@dataclasses.dataclass(frozen=True)
class Vocoder:
    """One vocoder: what the decoder needs to build, load, check and run it."""

    name: str  # token2wav.vocoder, and the name of its config section
    title: str  # for messages
    config_class: type
    module: types.ModuleType  # has init_params(key, config) and abstract_params(config)
    mel_channels_field: str  # the config field that must equal the flow's output_size
    context: int  # mel frames reflect-padded at each end of an utterance (0: none)
    inference: Callable  # (params, mel_bct (B, n_mels, T + 2 context), config, draws) -> speech (B, hop*T)
    nsf: NSF | None = None  # None: deterministic (draws are None)

    def mel_channels(self, config) -> int:
        return getattr(config, self.mel_channels_field)

    def pad(self, mel_bct: np.ndarray, start: bool = True, end: bool = True) -> np.ndarray:
        """Reflect-pad `context` frames at the start and/or end of mel (B, n_mels, T)."""
        if not self.context or not (start or end):
            return mel_bct
        return np.pad(mel_bct, ((0, 0), (0, 0), (self.context if start else 0, self.context if end else 0)),
                      mode="reflect")


def _hift(params, mel_bct, config, draws):
    return hift_inference(params, mel_bct, config, noise=draws).speech


def _bigvgan(params, mel_bct, config, draws):
    del draws  # deterministic
    return bigvgan_inference(params, mel_bct, config)


REGISTRY: dict[str, Vocoder] = {
    "hift": Vocoder("hift", "HiFT", HiFTConfig, hift, "in_channels", context=0, inference=_hift,
                    nsf=NSF(draw_nsf_noise, hift_source, hift_decode)),
    "bigvgan": Vocoder("bigvgan", "BigVGAN", BigVGANConfig, bigvgan, "num_mels", context=BIGVGAN_CONTEXT,
                       inference=_bigvgan),
}


def get(name: str) -> Vocoder:
    """The entry of `token2wav.vocoder` = name (ConfigError, one line, for an unknown name)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"token2wav.vocoder: one of {tuple(REGISTRY)}, got {name!r}") from None


def for_config(config) -> Vocoder:
    """The entry whose config class `config` is an instance of."""
    for vocoder in REGISTRY.values():
        if isinstance(config, vocoder.config_class):
            return vocoder
    names = " or ".join(v.config_class.__name__ for v in REGISTRY.values())
    raise ConfigError(f"token2wav.vocoder: a {names}, got {type(config).__name__}")
