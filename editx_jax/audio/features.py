"""Feature front ends of the two tokenizer streams (architecture.md §2.1.1-2.1.2, §2.2, §7.1, §7.3).

* vq02 (linguistic): a Kaldi-compatible log-mel fbank (80 bins, 25/10 ms, symmetric Hamming, DC removal,
  pre-emphasis 0.97, 512-point FFT, snip edges, samples scaled by 32768), low-frame-rate stacking
  (LFR, 7 frames every 6) and CMVN from `am.mvn`; both the offline front end and the streaming one that
  the official vq02 path actually runs (3840-sample pieces, with its dropped-tail quirk). The same
  fbank with the Povey window, unscaled samples and no LFR is CAM++'s (editx_jax/decoder/campplus.py).
* vq06 (semantic): the whisper 128-bin log-mel (n_fft 400, hop 160, periodic Hann, reflect-padded
  centred STFT, last frame dropped, Slaney mel filters, log10 with the max-8 floor, (x+4)/4).

The maths is plain `jnp` (jit-friendly: shapes depend only on the sample count); the filter banks are
computed once in float64 numpy and cast to float32. Matmuls use HIGHEST precision so that accelerators
do not silently drop to bf16/tf32 passes on parity-critical sums.
"""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config.audio import FbankConfig, WhisperMelConfig

_HIGHEST = jax.lax.Precision.HIGHEST
_FLOAT32_EPS = float(np.finfo(np.float32).eps)


class FrontendError(ValueError):
    """Bad input to a front end (too short, wrong shape, malformed am.mvn); the message says what."""


# ----------------------------------------------------------------------------------------- windows


def symmetric_hamming(n: int) -> np.ndarray:
    return (0.54 - 0.46 * np.cos(2 * np.pi * np.arange(n) / (n - 1))).astype(np.float32)


def povey_window(n: int) -> np.ndarray:
    """Kaldi's Povey window: a symmetric Hann window to the power 0.85."""
    return ((0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / (n - 1))) ** 0.85).astype(np.float32)


# Kaldi window types -> [n] float32 window of a frame of n samples.
WINDOWS = {"hamming": symmetric_hamming, "povey": povey_window}  # the names: config.audio.FBANK_WINDOWS


# ----------------------------------------------------------------------------- Kaldi fbank (vq02)


def _kaldi_mel(f):
    return 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def kaldi_mel_banks(config: FbankConfig = FbankConfig()) -> np.ndarray:
    """[n_fft//2 + 1, n_mels] float32: Kaldi triangles, linear in mel = 1127 ln(1 + f/700).

    No area normalisation; the Nyquist bin has weight 0 (Kaldi builds n_fft/2 columns and pads one).
    """
    n_bins = config.n_fft // 2
    nyquist = config.sample_rate / 2
    high = config.high_freq if config.high_freq > 0 else nyquist + config.high_freq
    mel_low, mel_high = _kaldi_mel(config.low_freq), _kaldi_mel(high)
    delta = (mel_high - mel_low) / (config.n_mels + 1)
    edges = mel_low + delta * np.arange(config.n_mels + 2)  # left, centre, right of each triangle
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    mel = _kaldi_mel(np.arange(n_bins) * (config.sample_rate / config.n_fft))[None, :]
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))  # [n_mels, n_bins]
    banks = np.concatenate([banks, np.zeros((config.n_mels, 1))], axis=1)
    return np.ascontiguousarray(banks.T.astype(np.float32))


def num_fbank_frames(num_samples: int, config: FbankConfig = FbankConfig()) -> int:
    """Frames with snip_edges: only windows that lie fully inside the signal."""
    if num_samples < config.frame_length:
        return 0
    return 1 + (num_samples - config.frame_length) // config.frame_shift


def bucket_length(n: int, minimum: int = 1024) -> int:
    """The padded length used for jit: the smallest 2^k or 3·2^(k-1) >= n (at most 50 % waste), so
    clips of any length share a logarithmic number of compiled shapes."""
    n = max(int(n), minimum)
    k = (n - 1).bit_length()
    return 3 << (k - 2) if k >= 2 and (3 << (k - 2)) >= n else 1 << k


def fbank_jnp(wave, config: FbankConfig = FbankConfig(), noise=None) -> jax.Array:
    """Traceable core of `kaldi_fbank`: [..., N] -> [..., T, n_mels], T from the static length N.

    `noise` ([..., T, frame_length] standard normal) is scaled by `config.dither`; None means none.
    """
    n_frames = num_fbank_frames(wave.shape[-1], config)
    idx = np.arange(n_frames)[:, None] * config.frame_shift + np.arange(config.frame_length)[None, :]
    frames = wave[..., idx].astype(jnp.float32)  # [..., T, frame_length]
    if config.upscale_samples:
        frames = frames * 32768.0
    if noise is not None:  # Kaldi adds the dither before anything else
        frames = frames + config.dither * noise
    frames = frames - jnp.mean(frames, axis=-1, keepdims=True)  # DC removal
    previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)  # x[-1] = x[0]
    frames = (frames - config.preemphasis * previous) * WINDOWS[config.window](config.frame_length)
    spec = jnp.fft.rfft(frames, n=config.n_fft, axis=-1)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    mel = jnp.matmul(power, kaldi_mel_banks(config), precision=_HIGHEST)
    return jnp.log(jnp.maximum(mel, _FLOAT32_EPS))


_fbank_jit = jax.jit(fbank_jnp, static_argnames=("config",))


def kaldi_fbank(wave, config: FbankConfig = FbankConfig(), key: jax.Array | None = None) -> jax.Array:
    """Log-mel fbank [..., T, n_mels] of waveforms [..., N] in [-1, 1] (scaled by 32768 inside).

    T = 1 + (N - 400) // 160 (snip edges). The wave is zero-padded to `bucket_length(N)` before the
    jitted core (frames only see their own window, so the first T frames do not change) and cut
    back. With `config.dither > 0` an explicit PRNG `key` is required (the official run draws
    unseeded noise; we never do). Inside your own jit, call `fbank_jnp` instead.
    """
    wave = np.asarray(wave, np.float32)
    if wave.ndim < 1 or wave.shape[-1] < config.frame_length:
        raise FrontendError(f"fbank needs at least {config.frame_length} samples (one "
                            f"{config.frame_length_ms:g} ms frame), got shape {wave.shape}")
    n_frames = num_fbank_frames(wave.shape[-1], config)
    padded_len = bucket_length(wave.shape[-1])
    wave = np.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, padded_len - wave.shape[-1])])
    noise = None
    if config.dither > 0:
        if key is None:
            raise FrontendError(f"fbank dither={config.dither} needs an explicit PRNG key")
        shape = wave.shape[:-1] + (num_fbank_frames(padded_len, config), config.frame_length)
        noise = jax.random.normal(key, shape, jnp.float32)
    return _fbank_jit(wave, config, noise)[..., :n_frames, :]


# ------------------------------------------------------------------------------------ LFR, CMVN


def apply_lfr(feats, lfr_m: int = 7, lfr_n: int = 6) -> jax.Array:
    """Offline low-frame-rate stacking [T, D] -> [ceil(T/n), m*D].

    The sequence is left-padded with (m-1)//2 copies of frame 0 and right-padded by repeating the
    last frame; output i concatenates padded frames [n*i, n*i + m).
    """
    feats = jnp.asarray(feats)
    t = feats.shape[-2]
    if t == 0:
        raise FrontendError("LFR needs at least one fbank frame")
    t_lfr = -(-t // lfr_n)
    idx = np.clip(np.arange(t_lfr)[:, None] * lfr_n + np.arange(lfr_m)[None, :] - (lfr_m - 1) // 2, 0, t - 1)
    stacked = feats[..., idx, :]  # [..., t_lfr, m, D]
    return stacked.reshape(stacked.shape[:-3] + (t_lfr, lfr_m * feats.shape[-1]))


def apply_cmvn(feats, cmvn) -> jax.Array:
    """(x + cmvn[0]) * cmvn[1]: row 0 is am.mvn's <AddShift>, row 1 its <Rescale>."""
    cmvn = jnp.asarray(cmvn, jnp.float32)
    dim = feats.shape[-1]
    if cmvn.ndim != 2 or cmvn.shape[0] != 2 or cmvn.shape[1] < dim:
        raise FrontendError(f"cmvn must be [2, >={dim}], got shape {tuple(cmvn.shape)}")
    return (feats + cmvn[0, :dim]) * cmvn[1, :dim]


def parse_am_mvn(text: str) -> np.ndarray:
    """The [2, D] float32 CMVN of a Kaldi nnet text file (`am.mvn`): rows <AddShift>, <Rescale>.

    Each block looks like `<AddShift> D D` then `<LearnRateCoef> 0 [ v1 ... vD ]`; the vector is the
    bracketed list after the block tag. Missing blocks, unbalanced brackets, non-numbers or a length
    that disagrees with the declared dimension are errors.
    """
    tokens = text.replace("[", " [ ").replace("]", " ] ").split()
    rows = {}
    for tag in ("<AddShift>", "<Rescale>"):
        if tag not in tokens:
            raise FrontendError(f"am.mvn: no {tag} block")
        at = tokens.index(tag)
        declared = None
        if at + 1 < len(tokens) and tokens[at + 1].isdigit():
            declared = int(tokens[at + 1])
        try:
            open_at = tokens.index("[", at)
            close_at = tokens.index("]", open_at)
        except ValueError:
            raise FrontendError(f"am.mvn: the {tag} vector has no [ ... ] list") from None
        try:
            values = np.array([float(v) for v in tokens[open_at + 1:close_at]], np.float32)
        except ValueError as e:
            raise FrontendError(f"am.mvn: bad number in the {tag} vector ({e})") from None
        if values.size == 0 or (declared is not None and values.size != declared):
            raise FrontendError(f"am.mvn: {tag} declares {declared} values but lists {values.size}")
        rows[tag] = values
    if rows["<AddShift>"].size != rows["<Rescale>"].size:
        raise FrontendError(f"am.mvn: <AddShift> has {rows['<AddShift>'].size} values but <Rescale> "
                            f"{rows['<Rescale>'].size}")
    return np.stack([rows["<AddShift>"], rows["<Rescale>"]])


def load_cmvn(path: str | pathlib.Path) -> np.ndarray:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FrontendError(f"am.mvn not found: {path}")
    return parse_am_mvn(path.read_text(encoding="utf-8", errors="replace"))


def wav_frontend(wave, cmvn=None, config: FbankConfig = FbankConfig(), key=None) -> jax.Array:
    """Offline funasr `WavFrontend`: fbank -> LFR -> CMVN, for one waveform [N] -> [ceil(T/6), 560]."""
    feats = kaldi_fbank(wave, config, key)
    if config.lfr_m != 1 or config.lfr_n != 1:
        feats = apply_lfr(feats, config.lfr_m, config.lfr_n)
    return feats if cmvn is None else apply_cmvn(feats, cmvn)


# ------------------------------------------------------------------------- streaming front end


def _online_lfr(frames: np.ndarray, m: int, n: int, is_final: bool):
    """One streaming LFR step over (splice cache + new frames): (windows [k, m*D], new splice cache).

    Windows start every n frames, as many as ceil((T - (m-1)//2) / n); one that runs past the end is
    padded with the last frame on the final call, and otherwise ends the step. The cache keeps the
    frames from the first window not emitted (at least the last frame).
    """
    t = frames.shape[0]
    planned = max(0, math.ceil((t - (m - 1) // 2) / n))
    windows, stop = [], planned
    for i in range(planned):
        if i * n + m <= t:
            windows.append(frames[i * n:i * n + m])
        elif is_final:
            idx = np.minimum(np.arange(i * n, i * n + m), t - 1)
            windows.append(frames[idx])
        else:
            stop = i
            break
    cache = frames[min(t - 1, stop * n):]
    out = (np.stack(windows).reshape(len(windows), -1) if windows
           else np.zeros((0, m * frames.shape[1]), np.float32))
    return out, cache


class OnlineFrontend:
    """funasr `WavFrontendOnline` for one stream: feed pieces in order, the last with is_final=True.

    State between calls (§7.3): the samples after the last complete frame shift (320 for 3840-sample
    pieces), and the LFR splice cache (3 copies of frame 0 at first, then the frames from the first
    window not yet emitted). A call whose new frames plus the splice cache number fewer than lfr_m
    emits nothing, even when final: that is the official tail-frame drop.
    """

    def __init__(self, cmvn=None, config: FbankConfig = FbankConfig(), key: jax.Array | None = None):
        if config.dither > 0 and key is None:
            raise FrontendError(f"fbank dither={config.dither} needs an explicit PRNG key")
        self.config, self.key = config, key
        self.cmvn = None if cmvn is None else np.asarray(cmvn, np.float32)
        self.samples = np.zeros(0, np.float32)  # fbank overhang carried to the next call
        self.splice: np.ndarray | None = None  # LFR splice cache [k, n_mels]
        self.finished = False

    def __call__(self, piece, is_final: bool = False) -> np.ndarray:
        if self.finished:
            raise FrontendError("this OnlineFrontend already had its final piece; make a new one")
        cfg = self.config
        self.finished = bool(is_final)
        x = np.concatenate([self.samples, np.asarray(piece, np.float32).reshape(-1)])
        n_frames = num_fbank_frames(x.shape[0], cfg)
        self.samples = x[n_frames * cfg.frame_shift:]
        empty = np.zeros((0, cfg.feat_dim), np.float32)
        if n_frames:
            key = None
            if self.key is not None:
                self.key, key = jax.random.split(self.key)
            used = (n_frames - 1) * cfg.frame_shift + cfg.frame_length
            frames = np.asarray(kaldi_fbank(x[:used], cfg, key))
            if self.splice is None:
                self.splice = np.repeat(frames[:1], (cfg.lfr_m - 1) // 2, axis=0)
            if n_frames + self.splice.shape[0] < cfg.lfr_m:
                self.splice = np.concatenate([self.splice, frames])
                return empty
            out, self.splice = _online_lfr(np.concatenate([self.splice, frames]), cfg.lfr_m, cfg.lfr_n,
                                           is_final)
        elif is_final and self.splice is not None:
            out, self.splice = _online_lfr(self.splice, cfg.lfr_m, cfg.lfr_n, True)
        else:
            return empty
        if self.cmvn is not None and out.shape[0]:
            out = np.asarray(apply_cmvn(out, self.cmvn))
        return out.astype(np.float32)


def stream_pieces(num_samples: int, chunk: int) -> list[tuple[int, int, bool]]:
    """(start, stop, is_final) of the pieces the official driver feeds: n = N // chunk + 1 pieces,
    the last one final; an empty last piece is not fed (so a multiple of `chunk` ends non-final)."""
    n = num_samples // chunk + 1
    pieces = []
    for i in range(n):
        start, stop = i * chunk, min((i + 1) * chunk, num_samples)
        if stop <= start:
            break
        pieces.append((start, stop, i == n - 1))
    return pieces


def online_chunk_lens(num_samples: int, config: FbankConfig = FbankConfig()) -> list[int]:
    """LFR frames emitted by each streaming call that emits any (the encoder is called once per entry).

    Integer bookkeeping of `OnlineFrontend` driven by `stream_pieces`, without computing features.
    """
    m, n, left = config.lfr_m, config.lfr_n, (config.lfr_m - 1) // 2
    carry, splice, lens = 0, None, []
    for start, stop, final in stream_pieces(num_samples, config.chunk_samples):
        total = carry + stop - start
        frames = num_fbank_frames(total, config)
        carry = total - frames * config.frame_shift
        if frames:
            splice = left if splice is None else splice
            t = splice + frames
            if t < m:
                splice = t
                continue
        elif final and splice is not None:
            t = splice
        else:
            continue
        planned = max(0, math.ceil((t - left) / n))
        fits = max(0, min(planned, (t - m) // n + 1)) if t >= m else 0
        emitted = planned if final else fits
        stop_at = planned if final or fits == planned else fits
        splice = t - min(t - 1, stop_at * n)
        if emitted:
            lens.append(emitted)
    return lens


def wav_frontend_online(wave, cmvn=None, config: FbankConfig = FbankConfig(), key=None):
    """The streaming vq02 features of a whole utterance, fast: (feats [sum(lens), 560], lens).

    Grid-aligned carries make every streamed fbank frame and LFR window equal to the offline one, so
    this is the offline front end cut to the streamed frame count (`online_chunk_lens`). Equal to
    driving `OnlineFrontend` piece by piece when dither is 0 (tested).
    """
    wave = np.asarray(wave, np.float32).reshape(-1)
    lens = online_chunk_lens(wave.shape[0], config)
    total = sum(lens)
    if total == 0:
        return jnp.zeros((0, config.feat_dim), jnp.float32), lens
    feats = wav_frontend(wave, cmvn, config, key)
    return feats[:total], lens


def wav_frontend_online_stepwise(wave, cmvn=None, config: FbankConfig = FbankConfig(), key=None):
    """Reference emulation of the official driver: `OnlineFrontend` fed piece by piece."""
    wave = np.asarray(wave, np.float32).reshape(-1)
    frontend = OnlineFrontend(cmvn, config, key)
    outs, lens = [], []
    for start, stop, final in stream_pieces(wave.shape[0], config.chunk_samples):
        out = frontend(wave[start:stop], is_final=final)
        if out.shape[0]:
            outs.append(out)
            lens.append(out.shape[0])
    feats = np.concatenate(outs) if outs else np.zeros((0, config.feat_dim), np.float32)
    return feats, lens


# ------------------------------------------------------------------------- whisper log-mel (vq06)


def _slaney_hz_to_mel(f):
    f = np.asarray(f, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = np.log(6.4) / 27.0
    linear = f / f_sp
    log = min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log, linear)


def _slaney_mel_to_hz(mel):
    mel = np.asarray(mel, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@functools.lru_cache(maxsize=8)
def slaney_mel_filters(sample_rate: int = 16000, n_fft: int = 400, n_mels: int = 128,
                       fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """[n_mels, n_fft//2 + 1] float32 Slaney-scale, Slaney-normalised triangles (librosa's defaults;
    the same numbers as whisper's `mel_filters.npz`)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_edges = np.linspace(_slaney_hz_to_mel(fmin), _slaney_hz_to_mel(fmax), n_mels + 2)
    hz_edges = _slaney_mel_to_hz(mel_edges)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]  # equal area per band
    return weights.astype(np.float32)


def whisper_log_mel_jnp(padded, n_frames, config: WhisperMelConfig = WhisperMelConfig()) -> jax.Array:
    """Traceable core of `whisper_log_mel` on an already reflect-padded signal [..., M].

    Frames start every hop from 0; frames at or past `n_frames` (a traced int is fine) are excluded
    from the max-8 floor (they are padding) but still returned, so callers cut [..., :n_frames].
    """
    total = (padded.shape[-1] - config.n_fft) // config.hop_length + 1
    idx = np.arange(total)[:, None] * config.hop_length + np.arange(config.n_fft)[None, :]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(config.n_fft) / config.n_fft)).astype(np.float32)
    spec = jnp.fft.rfft(padded[..., idx] * window, axis=-1)  # [..., T, n_fft//2 + 1]
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    filters = slaney_mel_filters(config.sample_rate, config.n_fft, config.n_mels)
    mel = jnp.einsum("mf,...tf->...mt", filters, power, precision=_HIGHEST)
    log = jnp.log10(jnp.maximum(mel, 1e-10))
    valid = jnp.arange(total) < n_frames
    top = jnp.max(jnp.where(valid, log, -jnp.inf), axis=(-2, -1), keepdims=True)
    log = jnp.maximum(log, top - 8.0)
    return (log + 4.0) / 4.0


_whisper_jit = jax.jit(whisper_log_mel_jnp, static_argnames=("config",))


def whisper_log_mel(audio, config: WhisperMelConfig = WhisperMelConfig()) -> jax.Array:
    """whisper.log_mel_spectrogram: [..., N] float32 at 16 kHz -> [..., n_mels, N // hop].

    STFT with centre reflect padding of n_fft//2; the last frame is dropped, so T = N // hop. The
    reflect-padded signal is zero-padded to a bucket length for the jitted core (the padding frames
    are masked out of the max and cut off). The max-8 floor uses the maximum of each whole clip, so
    a clip padded by the caller does not equal the clip alone: call it per clip (the official vq06
    path calls it per <= 30 s piece).
    """
    audio = np.asarray(audio, np.float32)
    if config.padding:
        audio = np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, config.padding)])
    n = audio.shape[-1] if audio.ndim else 0
    half = config.n_fft // 2
    if n <= half or n < config.hop_length:
        raise FrontendError(f"whisper log-mel needs more than {half} samples and at least "
                            f"{config.hop_length}, got shape {audio.shape}")
    n_frames = n // config.hop_length
    padded = np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(half, half)], mode="reflect")
    bucket = bucket_length(padded.shape[-1])
    padded = np.pad(padded, [(0, 0)] * (audio.ndim - 1) + [(0, bucket - padded.shape[-1])])
    return _whisper_jit(padded, n_frames, config)[..., :n_frames]
