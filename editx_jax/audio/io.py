"""Audio I/O and the tokenizer's preprocessing (architecture.md §0.1 step 1, §2.0, §7.2).

Reading: wav/flac/ogg (anything libsndfile reads) through soundfile, with librosa (audioread) as a
fallback for other containers. Samples come back as float32 in [-1, 1], exactly as torchaudio.load
gives them (int16 / 32768).

Preprocessing for the tokenizer, in the official order (`StepAudioTokenizer.preprocess_wav`):
resample to 16 kHz (torchaudio's Hann-windowed sinc, width 6, rolloff 0.99) -> peak normalisation to
0.999 -> `trim_silence` (librosa RMS-dB trim, then 0.05 s / 0.22 s margins on a 240-sample grid).
Unlike the official code we also resample *up* (it asserts orig > 16 kHz).

Everything here is numpy: it runs once per clip and is cheap next to the encoders.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings

import numpy as np
import soundfile as sf

from editx_jax.config.audio import TOKENIZER_SAMPLE_RATE

DEFAULT_MAX_SECONDS = 3600.0  # refuse clips longer than an hour unless asked (memory guard)
# The one rule for clips too short, in every tool (load_audio, the tokenizer, the pipeline): under
# 0.1 s there is no syllable to edit; 0.1 s always holds one 2+3 token group, even untrimmed (from
# 0.09 s on), and the 24 kHz mel and fbank analysis windows.
MIN_AUDIO_SECONDS = 0.1


class AudioError(ValueError):
    """Unreadable, empty, non-finite or over-long audio; the message names the file and the problem."""


# -------------------------------------------------------------------------------------- reading


def load_audio(path, *, mono: bool = False, max_seconds: float | None = DEFAULT_MAX_SECONDS):
    """(wave, sample_rate) of an audio file: float32 [C, N] (or [N] with mono=True, channels averaged).

    Errors (AudioError, one line): missing file, empty file, undecodable file, a WAV whose header
    promises more samples than the file holds (truncated), zero samples, NaN/Inf samples, audio
    shorter than MIN_AUDIO_SECONDS and audio longer than `max_seconds` (None: no limit).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    _check_wav_length(path)
    wave, sr = _read_soundfile(path, max_seconds)
    if wave is None:
        wave, sr = _read_librosa(path, max_seconds)
    if wave.shape[-1] == 0:
        raise AudioError(f"audio file has no samples: {path}")
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"audio file has NaN or Inf samples: {path}")
    if mono:
        wave = to_mono(wave)
    return wave, int(sr)


def check_min_duration(samples: int, sr: int, what) -> None:
    """AudioError for a clip with no samples or shorter than MIN_AUDIO_SECONDS (see there); `what` names it."""
    if samples == 0:
        raise AudioError(f"audio has no samples: {what}")
    if samples < MIN_AUDIO_SECONDS * sr:
        raise AudioError(f"audio is too short: {samples} samples ({samples / sr:.3f} s), the minimum is "
                         f"{MIN_AUDIO_SECONDS:g} s: {what}")


# Data-chunk sizes that streaming writers leave when they cannot seek back: "length unknown".
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF)


def _check_wav_length(path) -> None:
    """A RIFF/WAVE file whose data chunk promises more bytes than the file holds is truncated.

    libsndfile silently clamps such a header to what is there, so the cut is checked here, from
    the chunk headers alone (no samples are read). Other formats pass through untouched."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk = f.read(8)
            chunk_id, chunk_size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if chunk_id == b"data":
                if chunk_size not in _UNKNOWN_WAV_SIZES and offset + 8 + chunk_size > size:
                    raise AudioError(f"audio file is truncated: its header promises {chunk_size} bytes of samples, "
                                     f"the file holds {size - offset - 8}: {path}")
                return
            offset += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to an even length
    raise AudioError(f"audio file is truncated: its WAV header has no complete data chunk: {path}")


def _check_duration(path, frames: int, sr: int, max_seconds):
    if sr <= 0:
        raise AudioError(f"audio file has an invalid sample rate {sr}: {path}")
    check_min_duration(frames, sr, path)
    if max_seconds is not None and frames / sr > max_seconds:
        raise AudioError(f"audio is {frames / sr:.1f} s long, over the limit of {max_seconds:g} s: {path}")


def _read_soundfile(path, max_seconds):
    """[C, N] float32 and the rate, or (None, None) when libsndfile cannot open the file."""
    try:
        info = sf.info(str(path))
    except Exception:  # not a format libsndfile knows (or a broken header): try the fallback
        return None, None
    _check_duration(path, info.frames, info.samplerate, max_seconds)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"cannot decode audio file {path}: {_one_line(e)}") from None
    return np.ascontiguousarray(data.T), sr


def _read_librosa(path, max_seconds):
    import librosa  # noqa: PLC0415  (optional: only this fallback decoder needs it; GPU images lack it)

    try:
        with warnings.catch_warnings():  # librosa warns on every fallback; the error below says enough
            warnings.simplefilter("ignore")
            data, sr = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
    except Exception as e:
        raise AudioError(f"cannot decode audio file {path}: neither soundfile nor librosa reads it "
                         f"({_one_line(e)})") from None
    data = np.atleast_2d(np.asarray(data, np.float32))
    _check_duration(path, data.shape[-1], sr, max_seconds)
    return data, sr


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


# ------------------------------------------------------------------------------- simple transforms


def to_mono(wave) -> np.ndarray:
    """[C, N] -> [N] by averaging channels (torchaudio-style mean); a 1-D wave is returned as is."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim == 1:
        return wave
    if wave.ndim != 2:
        raise AudioError(f"expected a [channels, samples] or [samples] wave, got shape {wave.shape}")
    return wave[0] if wave.shape[0] == 1 else wave.mean(axis=0, dtype=np.float32)


def cap_peak(wave, peak: float = 0.6) -> np.ndarray:
    """Scale so that max|x| = peak, only if it exceeds it (official `preprocess_prompt_wav`)."""
    wave = np.asarray(wave, np.float32)
    top = np.max(np.abs(wave)) if wave.size else 0.0
    if top > peak:
        wave = wave / top * np.float32(peak)
    return wave


def energy_norm(wave, peak: float = 0.999, floor: float = 0.01) -> np.ndarray:
    """x / max(max|x|, floor) * peak (official `energy_norm_fn`; two float32 ops in that order)."""
    wave = np.asarray(wave, np.float32)
    top = np.float32(max(float(np.max(np.abs(wave))) if wave.size else 0.0, floor))
    return wave / top * np.float32(peak)


# ------------------------------------------------------------------------------------ resampling


def _sinc_phases(orig: int, new: int, width: int, rolloff: float):
    """Polyphase kernel of torchaudio's `sinc_interp_hann` resampler, compacted to its support.

    Output j of every block of `new` outputs sits at input time t_j = j*orig/new (in input samples
    from the block start). Its taps are h(τ) = (base/orig)·sinc(base·τ/orig)·cos²(π·base·τ/(2·width·orig))
    for τ = k - t_j, |base·τ/orig| <= width, with base = rolloff·min(orig, new) (§7.2). Returns
    (kernels [new, 2w+1] float32, first tap offsets [new] relative to k = -w, w).
    """
    base = min(orig, new) * rolloff
    w = math.ceil(width * orig / base)
    first = (np.arange(new) * orig) // new  # first tap of phase j, counted from input sample -w
    taps = first[:, None] + np.arange(2 * w + 1)[None, :]  # index into the block window of 2w+orig
    t = ((taps - w) / orig - np.arange(new)[:, None] / new) * base  # float64, in sinc zero crossings
    t = np.clip(t, -width, width)
    window = np.cos(t * np.pi / (2 * width)) ** 2
    sinc = np.where(t == 0, 1.0, np.sin(np.pi * t) / np.where(t == 0, 1.0, np.pi * t))
    kernels = (sinc * window * (base / orig)).astype(np.float32)
    return kernels, first, w


def resample(wave, orig_sr: int, new_sr: int, *, width: int = 6, rolloff: float = 0.99,
             max_block_elements: int = 1 << 22) -> np.ndarray:
    """torchaudio `Resample(orig_sr, new_sr)` (sinc_interp_hann) on [..., N] float32, up or down.

    Rates are reduced by their gcd (orig -> o, new -> n); the output has ceil(N·n/o) samples; the
    signal is zero outside [0, N). Vectorised as a strided polyphase correlation: every block of o
    input samples yields n outputs, each a (2w+1)-tap dot product; for usual rates that is a few
    BLAS matmuls over the signal viewed as rows of o samples, for odd rate pairs (huge o and n) a
    gather of each phase's taps, a bounded number of blocks at a time.
    """
    wave = np.asarray(wave, np.float32)
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise AudioError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    o, n = orig_sr // g, new_sr // g
    target = -(-wave.shape[-1] * n // o)
    w = math.ceil(width * o / (min(o, n) * rolloff))
    if o < 64:
        # Tiny blocks make tiny matmuls; group G blocks into one (o, n -> G·o, G·n). The kernel is
        # a function of time only (base/o and w do not change), so the outputs are the same.
        group = -(-64 // o)
        if group * n * (2 * w + group * o) <= 1 << 20:
            o, n = o * group, n * group
    kernels, first, w = _sinc_phases(o, n, width, rolloff)
    length = wave.shape[-1]
    lead = wave.shape[:-1]
    flat = wave.reshape(-1, length)
    n_blocks = length // o + 1  # what torch's strided conv over the padded signal produces
    padded = np.pad(flat, ((0, 0), (w, w + o)))
    taps = first[:, None] + np.arange(kernels.shape[1])[None, :]  # [n, 2w+1] into a block window
    span = 2 * w + o  # input samples one block of n outputs reads
    out = np.empty((flat.shape[0], n_blocks, n), np.float32)
    if n * span <= 1 << 20:
        # The usual rates: a dense [span, n] polyphase matrix split into ceil(span/o) slabs of o
        # rows. With the signal viewed as rows of o samples, block i reads rows i, i+1, ..., so the
        # whole resampler is a few BLAS matmuls of the (contiguous, shifted) row matrix.
        slabs = -(-span // o)
        dense = np.zeros((n, slabs * o), np.float32)
        np.put_along_axis(dense, taps, kernels, axis=1)
        dense = np.ascontiguousarray(dense.reshape(n, slabs, o).transpose(1, 2, 0))  # [slabs, o, n]
        rows_needed = n_blocks + slabs - 1
        padded = np.pad(padded, ((0, 0), (0, max(0, rows_needed * o - padded.shape[1]))))
        padded = padded[:, :rows_needed * o]  # samples past the last block's window are never read
        for c in range(flat.shape[0]):
            rows = padded[c].reshape(rows_needed, o)
            acc = rows[:n_blocks] @ dense[0]
            for q in range(1, slabs):
                acc += rows[q:q + n_blocks] @ dense[q]
            out[c] = acc
    else:
        # large ratios (e.g. 16001 -> 16000): the dense matrix would be huge and mostly zero, so
        # gather only each phase's 2w+1 taps
        step = max(1, max_block_elements // taps.size)
        for b0 in range(0, n_blocks, step):
            b1 = min(n_blocks, b0 + step)
            idx = (np.arange(b0, b1) * o)[:, None, None] + taps[None]  # [blocks, n, 2w+1]
            out[:, b0:b1] = np.einsum("cbnk,nk->cbn", padded[:, idx], kernels)
    return out.reshape(flat.shape[0], -1)[:, :target].reshape(lead + (target,))


# ---------------------------------------------------------------------------------- silence trim


def trim_span(wave, top_db: float = 20.0, frame_length: int = 512, hop_length: int = 128) -> tuple[int, int]:
    """[start, end) of the non-silent part, as `librosa.effects.trim(y, top_db, frame_length, hop_length)`.

    RMS over centred frames (zero padding of frame_length//2 on both sides, one frame per hop:
    1 + N // hop frames); a frame is non-silent when 10·log10(rms²) - 10·log10(max rms²) > -top_db
    (both floored at 1e-10). start = first non-silent frame · hop, end = min(N, (last + 1) · hop).
    All-silent (or all-zero) audio counts as entirely non-silent (ref 0 gives 0 dB), as in librosa.
    """
    y = np.asarray(wave, np.float32).reshape(-1)
    if y.size == 0:
        return 0, 0
    half = frame_length // 2
    padded = np.pad(y, (half, half)).astype(np.float64)
    n_frames = 1 + (padded.size - frame_length) // hop_length
    # mean of squares per frame via a cumulative sum (float64, then float32 like librosa's rms)
    csum = np.concatenate([[0.0], np.cumsum(padded * padded)])
    starts = np.arange(n_frames) * hop_length
    power = np.maximum((csum[starts + frame_length] - csum[starts]) / frame_length, 0.0)
    rms = np.sqrt(power.astype(np.float32))
    db = np.float32(10.0) * np.log10(np.maximum(np.float32(1e-10), rms * rms))
    ref = np.max(rms)
    db = db - np.float32(10.0) * np.log10(np.maximum(np.float32(1e-10), ref * ref))
    loud = np.flatnonzero(db > -top_db)
    if loud.size == 0:
        return 0, 0
    return int(loud[0] * hop_length), int(min(y.size, (loud[-1] + 1) * hop_length))


def trim_silence(wave, sr: int = TOKENIZER_SAMPLE_RATE, *, keep_left_time: float = 0.05,
                 keep_right_time: float = 0.22, hop_size: int = 240, top_db: float = 20.0,
                 frame_length: int = 512, hop_length: int = 128, return_span: bool = False):
    """Official `trim_silence`: keep the non-silent span plus 0.05 s before and 0.22 s after,
    snapped to a 240-sample grid.

    With [s, e) from `trim_span`: frames = ceil((e - s) / 240); start = s - int(0.05·sr) (crop the
    front if > 0, else zero-pad |start| samples there); then crop or zero-pad the end to
    frames·240 + int((0.05 + 0.22)·sr) samples. 1-D in, 1-D out.
    """
    y = np.asarray(wave, np.float32).reshape(-1)
    s, e = trim_span(y, top_db, frame_length, hop_length)
    num_frames = math.ceil((e - s) / hop_size)
    start = s - int(keep_left_time * sr)
    y = y[start:] if start > 0 else np.concatenate([np.zeros(-start, np.float32), y])
    out_len = int(num_frames * hop_size + (keep_left_time + keep_right_time) * sr)
    y = y[:out_len] if out_len <= y.size else np.concatenate([y, np.zeros(out_len - y.size, np.float32)])
    return (y, (s, e)) if return_span else y


# ------------------------------------------------------------------------------ full preprocessing


def check_wave(wave, what: str = "audio") -> np.ndarray:
    """A finite, non-empty mono float32 wave ([C, N] is mixed down), or AudioError."""
    wave = to_mono(wave)
    if wave.size == 0:
        raise AudioError(f"{what} has no samples")
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"{what} has NaN or Inf samples")
    return wave


def preprocess_for_tokenizer(wave, sr: int, *, target_sr: int = TOKENIZER_SAMPLE_RATE,
                             trim: bool = True, normalize: bool = True) -> np.ndarray:
    """The 16 kHz signal both tokenizer streams read: resample -> energy_norm -> trim_silence.

    `wave` is [N] or [C, N] (mixed to mono) at rate `sr`, normally already peak-capped at 0.6 by
    the caller (the cap does not change the result beyond float rounding: normalisation undoes it).
    Any input rate works (below 16 kHz we resample up; the official code crashes there).
    All-silent audio is not trimmed (see `trim_span`); the result is never empty.
    """
    wave = check_wave(wave)
    if sr <= 0:
        raise AudioError(f"sample rate must be positive, got {sr}")
    wave = resample(wave, sr, target_sr)
    if normalize:
        wave = energy_norm(wave)
    if trim:
        wave = trim_silence(wave, target_sr)
    return wave


# ------------------------------------------------------------------------------ clip preparation


@dataclasses.dataclass(frozen=True)
class Clip:
    """One input clip, prepared once: `wave` the mono float32 samples with the 0.6 peak cap of the
    official `preprocess_prompt_wav` (architecture.md §0.1 step 1), `sr` its rate, `raw` the samples as
    read, every channel, float32 [C, N] (or [N]), before any mix or cap: the clone speaker name hashes
    these, as the official code hashes what torchaudio.load returns."""

    wave: np.ndarray
    sr: int
    raw: np.ndarray


def prepare_clip(source, sample_rate: int | None = None, *, name: str | None = None, peak_cap: float = 0.6,
                 max_seconds: float | None = DEFAULT_MAX_SECONDS) -> Clip:
    """Load (a path) or check (a wave [N] / [C, N] with its rate) one clip, mix it to mono, refuse it
    when too short or longer than `max_seconds`, and cap its peak (`peak_cap` 0: no cap).

    The one place every entry point (EditX, the audio tokenizer) prepares a clip. Integer waves are
    PCM (scaled by 1/32768 for int16, like torchaudio.load); a 2-D wave with more than 64 rows and at
    most 64 columns is taken as soundfile's [samples, channels]. Errors: one AudioError line naming
    the clip (`name`, else the path, else "audio").
    """
    what = name or (str(source) if isinstance(source, (str, pathlib.Path)) else "audio")
    if isinstance(source, (str, pathlib.Path)):
        raw, sample_rate = load_audio(source, max_seconds=max_seconds)
    else:
        if sample_rate is None:
            raise AudioError(f"{what}: a waveform needs its sample rate")
        wave = np.asarray(source)
        if wave.dtype.kind not in "fiu" or wave.ndim not in (1, 2):
            raise AudioError(f"{what}: expected a float wave [samples] or [channels, samples], "
                             f"got {wave.dtype} shape {list(wave.shape)}")
        if wave.ndim == 2 and wave.shape[1] <= 64 < wave.shape[0]:
            wave = wave.T  # soundfile's [samples, channels] layout
        if wave.dtype.kind in "iu":  # integer PCM: scale like torchaudio.load
            wave = wave.astype(np.float32) / float(np.iinfo(wave.dtype).max + 1)
        raw = np.asarray(wave, np.float32)
    wave = check_wave(raw, what)
    try:
        valid_rate = float(sample_rate) == int(sample_rate) > 0
    except (TypeError, ValueError, OverflowError):
        valid_rate = False
    if not valid_rate:
        raise AudioError(f"{what}: invalid sample rate {sample_rate!r}")
    sr = int(sample_rate)
    if max_seconds is not None and wave.shape[-1] / sr > max_seconds:
        raise AudioError(f"audio is {wave.shape[-1] / sr:.1f} s, over the {max_seconds:g} s limit: {what}")
    check_min_duration(wave.shape[-1], sr, what)
    return Clip(cap_peak(wave, peak_cap) if peak_cap > 0 else wave, sr, raw)
