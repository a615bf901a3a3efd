"""The 24 kHz log-mel of the flow model's prompt (`speech_feat`; architecture.md §3.3.1, §5 item 4).

matcha's `mel_spectrogram` as CosyVoice calls it: the wave is reflect-padded by (n_fft - hop)/2 on each
side, framed without centring (`center=False`), windowed by a *periodic* Hann window, and the STFT
**magnitude** sqrt(re² + im² + 1e-9) (not the power) goes through librosa's Slaney mel filters; the
result is ln(max(x, 1e-5)). Frames: T = (N + 2·pad - n_fft)//hop + 1 (= N//480 for the real config).

The maths is plain `jnp` and jit-friendly (shapes depend only on the sample count); the filter bank is
built once in float64 numpy. The mel matmul uses HIGHEST precision so accelerators do not drop to
bf16/tf32 passes on a parity-critical sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config.decoder import MelConfig
from editx_jax.audio.features import bucket_length, slaney_mel_filters

_HIGHEST = jax.lax.Precision.HIGHEST


class MelError(ValueError):
    """Bad input to the 24 kHz mel (too short, wrong rank); the message says what."""


def num_mel_frames(num_samples: int, config: MelConfig = MelConfig()) -> int:
    return (num_samples + 2 * config.pad - config.n_fft) // config.hop_size + 1


@functools.lru_cache(maxsize=8)
def mel_basis(config: MelConfig = MelConfig()) -> np.ndarray:
    """[n_fft//2 + 1, num_mels] float32: `librosa.filters.mel` (Slaney scale and area norm)."""
    filters = slaney_mel_filters(config.sampling_rate, config.n_fft, config.num_mels, float(config.fmin),
                                 float(config.fmax))
    return np.ascontiguousarray(filters.T)


@functools.lru_cache(maxsize=8)
def _window(config: MelConfig) -> np.ndarray:
    """torch.hann_window(win_size) (periodic), zero-padded to n_fft in the centre like torch.stft."""
    n = np.arange(config.win_size)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * n / config.win_size)
    left = (config.n_fft - config.win_size) // 2
    return np.pad(win, (left, config.n_fft - config.win_size - left)).astype(np.float32)


def log_mel_jnp(padded, config: MelConfig = MelConfig()) -> jax.Array:
    """Traceable core on an already reflect-padded wave [..., M]: every frame that fits,
    [..., (M - n_fft)//hop + 1, num_mels]. Callers cut zero-padding frames off (a jit bucket)."""
    n_frames = (padded.shape[-1] - config.n_fft) // config.hop_size + 1
    idx = np.arange(n_frames)[:, None] * config.hop_size + np.arange(config.n_fft)[None, :]
    frames = padded[..., idx].astype(jnp.float32) * _window(config)  # [..., T, n_fft]
    spec = jnp.fft.rfft(frames, axis=-1)
    magnitude = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + config.magnitude_eps)
    mel = jnp.matmul(magnitude, mel_basis(config), precision=_HIGHEST)
    return jnp.log(jnp.maximum(mel, config.log_floor))


def reflect_pad(wave, config: MelConfig = MelConfig()):
    """Reflect-pad the last axis by `config.pad` on each side (torch's 'reflect', edge not repeated)."""
    pad = [(0, 0)] * (wave.ndim - 1) + [(config.pad, config.pad)]
    return jnp.pad(wave, pad, mode="reflect") if isinstance(wave, jax.Array) else np.pad(wave, pad, "reflect")


def mel_spectrogram_jnp(wave, config: MelConfig = MelConfig()) -> jax.Array:
    """Fully traceable [..., N] -> [..., T, num_mels] (for use inside your own jit)."""
    padded = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(config.pad, config.pad)], mode="reflect")
    return log_mel_jnp(padded, config)


_log_mel_jit = jax.jit(log_mel_jnp, static_argnames=("config",))


def mel_spectrogram(wave, config: MelConfig = MelConfig()) -> jax.Array:
    """The flow's prompt mel: waves [..., N] at `config.sampling_rate` -> [..., T, num_mels] float32.

    Batched over leading axes (equal lengths). The reflect-padded wave is zero-padded to a bucket
    length before the jitted core (a frame only reads its own window), so clips of many lengths
    share a few compiled shapes. Reflect padding needs N > pad (720 samples for the real config).
    """
    wave = np.asarray(wave, np.float32)
    if wave.ndim < 1:
        raise MelError("mel needs a wave [..., N], got a scalar")
    n = wave.shape[-1]
    if n <= config.pad or num_mel_frames(n, config) < 1:
        raise MelError(f"mel needs more than {config.pad} samples (reflect pad) and at least one "
                       f"{config.n_fft}-sample frame, got shape {wave.shape}")
    padded = reflect_pad(wave, config)
    bucket = bucket_length(padded.shape[-1])
    padded = np.pad(padded, [(0, 0)] * (wave.ndim - 1) + [(0, bucket - padded.shape[-1])])
    return _log_mel_jit(padded, config)[..., :num_mel_frames(n, config), :]
