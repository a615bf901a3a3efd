"""The dual-codebook audio tokenizer end to end: audio -> vq02 + vq06 codes -> LLM audio ids
(architecture.md §0.1 branch A, §2.0-§2.3).

Per clip, in the official order (`StepAudioTokenizer.wav2token`):

    mono, 0.6 peak cap (§0.1 step 1) -> resample to 16 kHz -> peak-normalise to 0.999 -> trim_silence
      -> vq02: streaming Kaldi fbank/LFR/CMVN -> SANM streaming encoder -> nearest of 1024 centroids
      -> vq06: 30 s pieces -> whisper log-mel -> S3 tokenizer v1 (25 Hz) -> nearest of 4096 codes
      -> interleave 2 vq02 + 3 vq06 per group (leftovers dropped), ids +65536 / +66560, `<audio_N>`

Batching. Several clips run together and each gets exactly its codes alone: the vq02 encoder lays
every streaming call of every clip out as one row (`paraformer.window_plan`) with masks, the vq06
encoder pads 30 s pieces and masks keys and convolutions (§7.4).

Long audio, bounded memory. vq06 is cut into the official 30 s pieces, a few at a time. vq02 is a
single stream over the whole clip, but a layer's k/v cache for call i only holds frames of the few
calls before it, so the output of calls [s, e) depends only on calls [c, e) where c walks back one
cache span per layer (`context_start`). The calls are processed in blocks of `vq02_block_calls`
rows, each with that exact context recomputed in front of it (about 200 calls = 48 s for the
released 50 layers); the codes equal those of one pass over the whole clip. The vq02 front end is
frame-local, so the fbank of a long clip is computed in fixed-size segments too.

Bad input (documented results; everything else is one `AudioError` line naming the clip):
  * missing / empty / undecodable / truncated-header files, zero samples, NaN or Inf -> AudioError;
  * multichannel audio is averaged to mono; any sample rate is resampled (up as well as down);
  * all-silent (or all-zero) audio is not trimmed (librosa counts it all as non-silent) and yields
    the codes of silence, as the official code does;
  * a WAV whose header promises more samples than the file holds -> AudioError ("truncated");
  * audio shorter than `audio.MIN_AUDIO_SECONDS` (0.1 s), as a file or a wave -> AudioError, as in
    every tool; above it, trim_silence pads every clip to at least 0.27 s (2 groups or more), and
    even untrimmed the minimum holds one 2+3 group; `TooShortError` (an AudioError) guards the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax import audio
from editx_jax.audio import AudioError
from editx_jax.config import ConfigError, from_dict
from editx_jax.tokenizer import codebook as cb
from editx_jax.tokenizer import frontend
from editx_jax.tokenizer import paraformer as pf
from editx_jax.tokenizer import s3tokenizer as s3
from editx_jax.tokenizer.frontend import FbankConfig, WhisperMelConfig
from editx_jax.tokenizer.paraformer import ParaformerEncoderConfig
from editx_jax.tokenizer.s3tokenizer import S3TokenizerConfig

COMPONENT = "audio_tokenizer"
ONNX_FILE = "speech_tokenizer_v1.onnx"


# ---------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class AudioTokenizerConfig:
    """Both encoders' sizes, the vq02 front end, and the pipeline settings. Defaults: the release."""

    paraformer: ParaformerEncoderConfig = dataclasses.field(default_factory=ParaformerEncoderConfig)
    fbank: FbankConfig = dataclasses.field(default_factory=FbankConfig)
    s3: S3TokenizerConfig = dataclasses.field(default_factory=S3TokenizerConfig)
    vq02_codes: int = cb.VQ02_CODES  # rows of linguistic_tokenizer.npy
    sample_rate: int = audio.TOKENIZER_SAMPLE_RATE
    peak_cap: float = 0.6  # §0.1 step 1 (undone by the 0.999 normalisation up to rounding); 0: off
    energy_peak: float = 0.999
    trim: bool = True
    vq02_block_calls: int = 1024  # streaming calls (0.24 s each) per vq02 encoder pass on long audio
    vq06_batch: int = 8  # 30 s pieces per vq06 encoder pass

    def __post_init__(self):
        def check(ok, field, msg):
            if not ok:
                raise ConfigError(f"audio_tokenizer.{field}: {msg}")
        check(self.fbank.feat_dim == self.paraformer.input_size, "paraformer.input_size",
              f"{self.paraformer.input_size} != fbank n_mels * lfr_m = {self.fbank.feat_dim}")
        check(self.fbank.sample_rate == self.sample_rate, "fbank.sample_rate",
              f"{self.fbank.sample_rate} != sample_rate {self.sample_rate}")
        check(0 < self.vq02_codes <= cb.VQ02_CODES, "vq02_codes", f"must be in [1, {cb.VQ02_CODES}], "
              f"got {self.vq02_codes}")
        check(self.s3.codebook_size <= cb.VQ06_CODES, "s3.codebook_size",
              f"must be at most {cb.VQ06_CODES} (the LLM's vq06 id range), got {self.s3.codebook_size}")
        check(self.sample_rate > 0, "sample_rate", f"must be positive, got {self.sample_rate}")
        check(0 <= self.peak_cap, "peak_cap", f"must be >= 0 (0 disables it), got {self.peak_cap}")
        check(0 < self.energy_peak <= 1, "energy_peak", f"must be in (0, 1], got {self.energy_peak}")
        check(self.vq02_block_calls >= 8, "vq02_block_calls", f"must be >= 8, got {self.vq02_block_calls}")
        check(self.vq06_batch >= 1, "vq06_batch", f"must be >= 1, got {self.vq06_batch}")

    @property
    def whisper_mel(self) -> WhisperMelConfig:
        return WhisperMelConfig(sample_rate=self.sample_rate, n_mels=self.s3.n_mels, hop_length=self.s3.hop_length)

    @classmethod
    def tiny(cls, **overrides) -> "AudioTokenizerConfig":
        """Small encoders with the real front ends and code ranges (tests, demos, --random-tiny)."""
        para = ParaformerEncoderConfig(output_size=64, attention_heads=4, linear_units=128, num_blocks=4)
        s3cfg = S3TokenizerConfig(n_audio_state=64, n_audio_head=4, n_audio_layer=2)
        return cls(paraformer=para, s3=s3cfg, **overrides)


class TooShortError(AudioError):
    """A clip (after preprocessing) too short to give one 2 vq02 + 3 vq06 group."""


# ---------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class AudioTokens:
    """One clip's tokens. vq02 / vq06 are the full streams (before the group cut); ids / text are the
    interleaved groups (LLM vocabulary ids 65536 + ..., and the `<audio_N>` string)."""

    vq02: np.ndarray  # int32 [T02], in [0, 1024)
    vq06: np.ndarray  # int32 [T06], in [0, 4096)
    ids: np.ndarray  # int64 [5 * groups]
    text: str
    seconds: float  # length of the preprocessed (trimmed) 16 kHz audio

    @property
    def num_groups(self) -> int:
        return self.ids.size // cb.GROUP

    def to_json(self, **extra) -> dict:
        return {**extra, "seconds": round(self.seconds, 4), "vq02": self.vq02.tolist(),
                "vq06": self.vq06.tolist(), "ids": self.ids.tolist(), "tokens": self.text}


# ------------------------------------------------------------------------------- vq02 streaming driver


def min_dependency(plan: pf.WindowPlan) -> np.ndarray:
    """[R] the earliest row whose k/v each row's cache holds (the row itself when its cache is empty)."""
    width = plan.source.shape[1]
    rows = np.arange(plan.cache_index.shape[0])
    refs = np.where(plan.cache_index >= 0, plan.cache_index // width, rows[:, None])
    return np.minimum(refs.min(axis=1), rows)


def context_start(min_dep: np.ndarray, start: int, num_layers: int) -> int:
    """First row to recompute so that rows >= `start` come out exactly as in one whole pass.

    Layer l's output for rows [y, e) needs layer l-1's outputs for rows [min_dep[y], e) (their k/v
    fill the caches; min_dep is non-decreasing), and the embedded inputs are exact for any row.
    """
    c = start
    for _ in range(num_layers):
        c = int(min_dep[c])
    return c


def _row_bucket(n: int) -> int:
    """Rows of a single pass: 2^k or 3·2^(k-1), at least 8 (few compilations, at most 1/3 padding)."""
    return frontend.bucket_length(n, 8)


@functools.partial(jax.jit, static_argnames="cfg")
def _vq02_window_codes(params, centroids, feats, positions, window_valid, cache_index, *, cfg):
    """Encoder over laid-out windows, then the nearest centroid of every frame: int32 [R, W]."""
    hidden = pf.ParaformerEncoder(cfg).apply({"params": params}, feats, positions, window_valid, cache_index,
                                             method=pf.ParaformerEncoder.encode_windows)
    return cb.nearest_centroid(hidden, centroids)[0]


def vq02_codes_from_features(params, centroids, cfg: ParaformerEncoderConfig, feats: Sequence[np.ndarray],
                             chunk_lens: Sequence[Sequence[int]], block_calls: int = 1024) -> list[np.ndarray]:
    """vq02 codes of several clips from their streaming features (feats [T_b, input_size], chunk
    lens per call), as the official per-call loop computes them, in bounded memory.

    All calls of all clips are rows of one window plan; they run `block_calls` target rows at a
    time, each block preceded by the context rows its exactness needs (`context_start`). When
    everything fits in one block there is no context and one pass (rows padded to a power of two).
    """
    batch = len(feats)
    totals = [int(sum(lens)) for lens in chunk_lens]
    out = [np.zeros((t,), np.int32) for t in totals]
    if not any(totals):
        return out
    n_calls = max(len(lens) for lens in chunk_lens)
    lens = np.zeros((batch, max(n_calls, 1)), np.int64)
    for b, row in enumerate(chunk_lens):
        lens[b, :len(row)] = row
    frames = max(totals)
    flat = np.zeros((batch, frames, cfg.input_size), np.float32)
    for b, f in enumerate(feats):
        flat[b, :totals[b]] = np.asarray(f, np.float32)[:totals[b]]
    flat = flat.reshape(batch * frames, cfg.input_size)
    plan = pf.window_plan(cfg, lens, frames)
    n_rows, width = plan.source.shape
    p = cfg.overlap_frames
    dep = min_dependency(plan)
    blocks = []
    for s in range(0, n_rows, block_calls):
        e = min(n_rows, s + block_calls)
        blocks.append((context_start(dep, s, cfg.num_blocks), s, e))
    if len(blocks) == 1:
        rows_per_pass = _row_bucket(n_rows)
    else:  # one shape for every block: one compilation however long the audio
        rows_per_pass = max(e - c for c, _, e in blocks)
        rows_per_pass = -(-rows_per_pass // 8) * 8
    for c, s, e in blocks:
        source = np.full((rows_per_pass, width), -1, np.int64)
        positions = np.zeros((rows_per_pass, width), np.int32)
        valid = np.zeros((rows_per_pass, width), bool)
        valid[:, :p] = True  # padding rows see their zero prefix, so no softmax is empty
        cache = np.full((rows_per_pass, plan.cache_index.shape[1]), -1, np.int32)
        n = e - c
        source[:n], positions[:n], valid[:n] = plan.source[c:e], plan.positions[c:e], plan.window_valid[c:e]
        ci = plan.cache_index[c:e]
        # rebase onto the block's rows; slots of rows before the block are dropped (those rows are
        # context whose own output is not kept)
        cache[:n] = np.where((ci >= 0) & (ci // width >= c), ci - c * width, -1)
        windows = np.where((source >= 0)[..., None], flat[np.maximum(source, 0)], 0.0).astype(np.float32)
        codes = np.asarray(_vq02_window_codes(params, centroids, windows, positions, valid, cache, cfg=cfg))
        for r in range(s, e):
            b, start, k = plan.rows[r]
            out[b][start:start + k] = codes[r - c, p:p + k]
    return out


# ------------------------------------------------------------------------------- vq02 front end


def vq02_features(wave: np.ndarray, cmvn, config: FbankConfig, segment_frames: int = 1 << 14):
    """`frontend.wav_frontend_online` (feats [T, 560], chunk lens) of a 16 kHz clip, with the fbank
    of a long clip computed `segment_frames` frames at a time (fbank frames only see their own 400
    samples, so the segments join exactly) before LFR and CMVN."""
    wave = np.asarray(wave, np.float32).reshape(-1)
    lens = frontend.online_chunk_lens(wave.shape[0], config)
    total = sum(lens)
    if total == 0:
        return np.zeros((0, config.feat_dim), np.float32), lens
    n_frames = frontend.num_fbank_frames(wave.shape[0], config)
    if n_frames <= segment_frames:
        feats, _ = frontend.wav_frontend_online(wave, cmvn, config)
        return np.asarray(feats), lens
    shift, length = config.frame_shift, config.frame_length
    parts = []
    for f0 in range(0, n_frames, segment_frames):
        f1 = min(n_frames, f0 + segment_frames)
        piece = wave[f0 * shift:(f1 - 1) * shift + length]
        if f1 - f0 < segment_frames:  # the same padded length as the other segments: one compilation
            piece = np.pad(piece, (0, (segment_frames - 1) * shift + length - piece.shape[0]))
        parts.append(np.asarray(frontend.kaldi_fbank(piece, config))[:f1 - f0])
    fbank = np.concatenate(parts)
    feats = frontend.apply_lfr(fbank, config.lfr_m, config.lfr_n)[:total]
    if cmvn is not None:
        feats = frontend.apply_cmvn(feats, cmvn)
    return np.asarray(feats, np.float32), lens


def vq06_length(num_samples: int, cfg: S3TokenizerConfig) -> int:
    """vq06 codes the official 30 s chunking gives for a 16 kHz clip of `num_samples` samples."""
    total = 0
    for start in range(0, num_samples, cfg.chunk_samples):
        piece = min(cfg.chunk_samples, num_samples - start)
        if piece >= cfg.min_chunk_samples:
            total += int(cfg.token_lengths(piece // cfg.hop_length))
    return total


# ---------------------------------------------------------------------------------------- tokenizer


def _random_s3_params(cfg: S3TokenizerConfig, seed: int) -> dict:
    """Random S3 weights drawn in numpy (fast at the released size): kernels N(0, 1/fan_in), biases
    0.1 N, LayerNorm scales 1 + 0.1 N, the whisper position table, codebook rows 0.1 N."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = path[-1].key
        shape = spec.shape
        if name == "positional_embedding":
            return s3.sinusoids(cfg.n_audio_ctx, cfg.n_audio_state)
        if name == "codebook":
            return (0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
        if name == "kernel":
            fan_in = int(np.prod(shape[-3:-1])) if len(shape) == 3 and "conv" in str(path) else shape[-2]
            return rng.standard_normal(shape, np.float32) * np.float32(fan_in ** -0.5)
        base = 1.0 if name == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, s3.abstract_params(cfg))


def _flat_shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(np.shape(v))
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_tokenizer_params(config: AudioTokenizerConfig) -> dict:
    """ShapeDtypeStructs of the whole tokenizer params tree (what the checkpoint folder holds)."""
    f32 = jnp.float32
    return {
        "paraformer": pf.abstract_params(config.paraformer),
        "cmvn": jax.ShapeDtypeStruct((2, config.paraformer.input_size), f32),
        "vq02_codebook": jax.ShapeDtypeStruct((config.vq02_codes, config.paraformer.output_size), f32),
        "s3tokenizer": s3.abstract_params(config.s3),
    }


class AudioTokenizer:
    """Waveforms or audio files -> vq02 / vq06 codes, LLM ids and `<audio_N>` strings.

    params: {"paraformer", "cmvn" [2, 560], "vq02_codebook" [1024, 512], "s3tokenizer"} (see
    `abstract_tokenizer_params`); checked against the config, moved to the device once.
    """

    def __init__(self, config: AudioTokenizerConfig, params: Mapping):
        self.config = config
        want, got = _flat_shapes(abstract_tokenizer_params(config)), _flat_shapes(params)
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise ConfigError(f"audio tokenizer params do not match the config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
        for path, shape in want.items():
            if got[path] != shape:
                raise ConfigError(f"audio tokenizer param {path} has shape {list(got[path])}, the config "
                                  f"expects {list(shape)}")
        cmvn = np.asarray(params["cmvn"], np.float32)
        if not np.isfinite(cmvn).all():
            raise ConfigError("audio tokenizer cmvn has non-finite values")
        to_device = functools.partial(jax.tree_util.tree_map, lambda a: jnp.asarray(a, jnp.float32))
        self.cmvn = cmvn
        self.paraformer_params = to_device(params["paraformer"])
        self.vq02_codebook = jnp.asarray(params["vq02_codebook"], jnp.float32)
        self.s3_params = to_device(params["s3tokenizer"])

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, folder, **overrides) -> "AudioTokenizer":
        """Load a tokenizer checkpoint folder written by `convert_tokenizer`. `overrides` replace
        pipeline fields of the stored config (e.g. vq02_block_calls=256)."""
        from editx_jax import checkpoint
        meta = checkpoint.read_meta(folder)
        if meta.get("component") != COMPONENT:
            raise checkpoint.CheckpointError(f"{folder} holds a {meta.get('component')!r} checkpoint, "
                                             f"not the audio tokenizer")
        config = from_dict(AudioTokenizerConfig, {**checkpoint.read_config(folder), **overrides}, COMPONENT)
        params = checkpoint.load_params(folder, abstract_tokenizer_params(config))
        return cls(config, params)

    @classmethod
    def from_released(cls, root, progress: bool = False, **overrides) -> "AudioTokenizer":
        """Convert a released `Step-Audio-Tokenizer/` folder in memory (nothing is written)."""
        config, params, _ = load_released(root, progress=progress, **overrides)
        return cls(config, params)

    @classmethod
    def random(cls, config: AudioTokenizerConfig | None = None, seed: int = 0) -> "AudioTokenizer":
        """Random weights (numpy, fast at any size) for tests and benchmarks; codes are meaningless."""
        config = config or AudioTokenizerConfig()
        rng = np.random.default_rng(seed + 1)
        d = config.paraformer.input_size
        # a CMVN that maps Kaldi log-mels (about 0..20 with the 32768 scaling) near N(0, 1)
        cmvn = np.stack([np.full(d, -10.0, np.float32) + rng.standard_normal(d, np.float32),
                         np.full(d, 0.25, np.float32)])
        params = {
            "paraformer": pf.random_params(config.paraformer, seed),
            "cmvn": cmvn,
            "vq02_codebook": rng.standard_normal((config.vq02_codes, config.paraformer.output_size), np.float32),
            "s3tokenizer": _random_s3_params(config.s3, seed + 2),
        }
        return cls(config, params)

    @property
    def params(self) -> dict:
        return {"paraformer": self.paraformer_params, "cmvn": self.cmvn, "vq02_codebook": self.vq02_codebook,
                "s3tokenizer": self.s3_params}

    def save(self, folder, meta: dict | None = None) -> pathlib.Path:
        """A checkpoint folder `from_pretrained` reads."""
        from editx_jax import checkpoint
        params = jax.tree_util.tree_map(np.asarray, self.params)
        return checkpoint.save_params(folder, params, self.config,
                                      {"component": COMPONENT, "dtype": "float32", **dict(meta or {})})

    # ------------------------------------------------------------------ preprocessing

    def load(self, source, sample_rate: int | None = None, name: str | None = None) -> np.ndarray:
        """One clip (path, or wave [N] / [C, N] with its rate) -> the preprocessed 16 kHz mono wave.

        Integer waves are PCM (scaled by 1/32768 for int16); a 2-D wave with more than 64 rows and
        at most 64 columns is taken as soundfile's [samples, channels]."""
        cfg = self.config
        if isinstance(source, (str, pathlib.Path)):
            wave, sample_rate = audio.load_audio(source, mono=True)
        else:
            if sample_rate is None:
                raise AudioError(f"{name or 'audio'}: a waveform needs its sample rate")
            wave = np.asarray(source)
            if wave.dtype.kind not in "fiu" or wave.ndim not in (1, 2):
                raise AudioError(f"{name or 'audio'}: expected a float wave [samples] or [channels, samples], "
                                 f"got {wave.dtype} shape {list(wave.shape)}")
            if wave.ndim == 2 and wave.shape[1] <= 64 < wave.shape[0]:
                wave = wave.T  # soundfile's [samples, channels] layout
            if wave.dtype.kind in "iu":  # integer PCM: scale like torchaudio.load
                wave = wave.astype(np.float32) / float(np.iinfo(wave.dtype).max + 1)
            wave = audio.check_wave(wave, name or "audio")
        try:
            valid_rate = float(sample_rate) == int(sample_rate) > 0
        except (TypeError, ValueError, OverflowError):
            valid_rate = False
        if not valid_rate:
            raise AudioError(f"{name or 'audio'}: invalid sample rate {sample_rate!r}")
        audio.check_min_duration(wave.shape[-1], int(sample_rate), name or "audio")
        if cfg.peak_cap > 0:
            wave = audio.cap_peak(wave, cfg.peak_cap)
        wave = audio.check_wave(wave, name or "audio")
        wave = audio.resample(wave, int(sample_rate), cfg.sample_rate)
        wave = audio.energy_norm(wave, peak=cfg.energy_peak)
        if cfg.trim:
            wave = audio.trim_silence(wave, cfg.sample_rate)
        groups = cb.num_groups(sum(frontend.online_chunk_lens(wave.shape[0], cfg.fbank)),
                               vq06_length(wave.shape[0], cfg.s3))
        if groups == 0:
            raise TooShortError(f"{name or 'audio'}: {wave.shape[0] / cfg.sample_rate:.3f} s after preprocessing "
                                f"is too short for one token group (2 vq02 + 3 vq06 codes, about 0.3 s)")
        return wave

    # ------------------------------------------------------------------ tokenizing

    def encode(self, waves: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(vq02, vq06) codes of preprocessed 16 kHz clips, all clips batched together."""
        cfg = self.config
        feats, lens = zip(*(vq02_features(w, self.cmvn, cfg.fbank) for w in waves)) if waves else ((), ())
        vq02 = vq02_codes_from_features(self.paraformer_params, self.vq02_codebook, cfg.paraformer, feats, lens,
                                        cfg.vq02_block_calls)
        logmel = functools.partial(_logmel, config=cfg.whisper_mel)
        vq06 = s3.tokenize_waveforms(self.s3_params, list(waves), cfg.s3, batch_size=cfg.vq06_batch,
                                     logmel_fn=logmel)
        return list(zip(vq02, vq06))

    def tokenize(self, inputs, sample_rates=None, *, errors: str = "raise") -> list:
        """Tokens of each clip: `inputs` is a list of paths and/or waves ([N] or [C, N]); a single
        path or wave is one clip. `sample_rates`: one int for all waves, or one per input (ignored
        for paths). errors="raise": the first bad clip raises AudioError; "keep": its entry is the
        AudioError and the other clips are still tokenized."""
        if errors not in ("raise", "keep"):
            raise ValueError(f"errors must be 'raise' or 'keep', got {errors!r}")
        if isinstance(inputs, (str, pathlib.Path)) or (isinstance(inputs, np.ndarray) and inputs.dtype != object):
            inputs = [inputs]
        inputs = list(inputs)
        if sample_rates is None or np.isscalar(sample_rates):
            rates = [sample_rates] * len(inputs)
        else:
            rates = list(sample_rates)
            if len(rates) != len(inputs):
                raise ValueError(f"{len(rates)} sample rates for {len(inputs)} inputs")
        results: list[Any] = [None] * len(inputs)
        good, waves = [], []
        for i, (x, sr) in enumerate(zip(inputs, rates)):
            name = str(x) if isinstance(x, (str, pathlib.Path)) else f"clip {i}"
            try:
                waves.append(self.load(x, sr, name))
                good.append(i)
            except AudioError as e:
                if errors == "raise":
                    raise
                results[i] = e
        for i, wave, (vq02, vq06) in zip(good, waves, self.encode(waves)):
            results[i] = AudioTokens(vq02=vq02.astype(np.int32), vq06=vq06.astype(np.int32),
                                     ids=cb.interleave_ids(vq02, vq06),
                                     text=cb.merge_vq0206_to_token_str(vq02, vq06),
                                     seconds=wave.shape[0] / self.config.sample_rate)
        return results


def _logmel(piece, config: WhisperMelConfig):
    return np.asarray(frontend.whisper_log_mel(piece, config))


# ---------------------------------------------------------------------------------------- converting


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor")


def _ticking(bar):
    if bar is None:
        return None

    def wrap(names):
        for name in names:
            yield name
            bar.update(1)
    return wrap


def infer_s3_config(onnx_path, **overrides) -> S3TokenizerConfig:
    """The S3 tokenizer sizes of an exported `speech_tokenizer_v1.onnx`, read from its graph: widths
    from conv1 and the position table, layers from the block node names, heads from the head-count
    constant that divides the width (`/blocks.0/attn/Constant_1`), the codebook from the MatMul
    outside the blocks, conv1's stride from its attributes."""
    import re

    import onnx
    from onnx import numpy_helper

    from editx_jax.convert.keymap import ConversionError
    path = pathlib.Path(onnx_path)
    if not path.is_file():
        raise ConversionError(f"ONNX file not found: {path}")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:
        raise ConversionError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    inits = {t.name: t for t in graph.initializer}
    shapes = {n: tuple(t.dims) for n, t in inits.items()}
    conv1 = next((n for n in graph.node if n.op_type == "Conv" and re.search(r"(?:^|/)conv1/Conv$", n.name)), None)
    if conv1 is None or len(conv1.input) < 2 or conv1.input[1] not in shapes:
        raise ConversionError(f"{path}: no conv1/Conv node with a weight initializer (not an S3 tokenizer?)")
    state, n_mels, _ = shapes[conv1.input[1]]
    stride = next((list(a.ints)[0] for a in conv1.attribute if a.name == "strides"), 1)
    pos = [s for n, s in shapes.items() if n.endswith("positional_embedding") and len(s) == 2]
    layers = {int(m[1]) for n in graph.node if (m := re.search(r"(?:^|/)blocks\.(\d+)/", n.name))}
    heads = None
    for node in graph.node:
        if node.op_type == "Constant" and re.search(r"(?:^|/)blocks\.0/attn/Constant_1$", node.name):
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1 and value.dtype.kind in "iu" and int(value) > 0 and state % int(value) == 0:
                heads = int(value)
    codebooks = [s[1] for n in graph.node if n.op_type == "MatMul" and not re.search(r"blocks\.\d+/", n.name)
                 for i in n.input if (s := shapes.get(i)) and len(s) == 2 and s[0] == state]
    fields = dict(n_mels=int(n_mels), n_audio_state=int(state), n_audio_layer=len(layers),
                  conv1_stride=int(stride))
    if pos:
        fields["n_audio_ctx"] = int(pos[0][0])
    if heads:
        fields["n_audio_head"] = heads
    if len(set(codebooks)) == 1:
        fields["codebook_size"] = int(codebooks[0])
    fields.update(overrides)
    if "n_audio_head" not in fields:
        raise ConversionError(f"{path}: cannot find the head count (/blocks.0/attn/Constant_1); pass it")
    if not layers:
        raise ConversionError(f"{path}: no /blocks.N/ nodes (not an S3 tokenizer?)")
    return S3TokenizerConfig(**fields)


def load_released(root, progress: bool = False, dtype=None, s3_overrides: Mapping | None = None,
                  **overrides) -> tuple[AudioTokenizerConfig, dict, dict]:
    """(config, params, info) of a released `Step-Audio-Tokenizer/` folder: the FunASR Paraformer
    folder (model.pt, config.yaml, am.mvn), linguistic_tokenizer.npy and speech_tokenizer_v1.onnx.
    Every tensor is used exactly once (ConversionError names any that is not)."""
    from editx_jax.convert import paraformer as cp
    from editx_jax.convert import s3tokenizer as cs
    from editx_jax.convert.keymap import ConversionError, DictSource, convert

    if dtype not in (None, "float32"):
        raise ValueError(f"the tokenizer is kept in float32 (codes must match exactly), got dtype {dtype!r}")
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ConversionError(f"not a folder: {root}")
    para_dir = root / cp.PARAFORMER_SUBDIR
    if not para_dir.is_dir():
        raise ConversionError(f"{root}: no {cp.PARAFORMER_SUBDIR}/ (expected the Step-Audio-Tokenizer folder)")
    onnx_path = root / ONNX_FILE
    if not onnx_path.is_file():
        raise ConversionError(f"{root}: no {ONNX_FILE}")
    para_cfg = cp.read_config_yaml(para_dir / "config.yaml")
    cmvn = cp.read_am_mvn(para_dir / "am.mvn", para_cfg.input_size)
    codebook = cp.load_codebook(root / cp.CODEBOOK_FILE, para_cfg.output_size)
    s3_cfg = infer_s3_config(onnx_path, **dict(s3_overrides or {}))
    source = cp.encoder_source(para_dir / "model.pt")
    s3_state = cs.onnx_to_state_dict(onnx_path, s3_cfg)
    bar = _progress_bar(progress, len(source.names()) + len(s3_state), "convert tokenizer")
    try:
        para_params = convert(source, cp.RULES, pf.abstract_params(para_cfg), progress=_ticking(bar))
        s3_params = convert(DictSource(s3_state), cs.RULES, s3.abstract_params(s3_cfg), progress=_ticking(bar))
    finally:
        if bar is not None:
            bar.close()
    fbank = FbankConfig.from_reference(_frontend_conf(para_dir / "config.yaml"))
    config = AudioTokenizerConfig(paraformer=para_cfg, fbank=fbank, s3=s3_cfg, vq02_codes=codebook.shape[0],
                                  **overrides)
    params = {"paraformer": para_params, "cmvn": cmvn, "vq02_codebook": codebook, "s3tokenizer": s3_params}
    info = {"paraformer_tensors": len(source.names()), "ignored": sorted(source.ignored),
            "s3_tensors": len(s3_state)}
    return config, params, info


def _frontend_conf(path: pathlib.Path) -> dict:
    """config.yaml's frontend_conf, without the options that are not front-end maths (cmvn file)
    and with dither forced to 0: the official run dithers with unseeded noise (§2.1.1); we do not."""
    import yaml
    conf = yaml.safe_load(path.read_text()) or {}
    front = dict(conf.get("frontend_conf") or {})
    front.pop("cmvn_file", None)
    front["dither"] = 0.0
    return front


def convert_tokenizer(src, dst, progress: bool = True, dtype=None) -> dict:
    """`Step-Audio-Tokenizer/` -> an editx-jax tokenizer checkpoint folder (both encoders, the CMVN,
    the k-means codebook and one config.json), loadable by `AudioTokenizer.from_pretrained(dst)`."""
    from editx_jax import checkpoint
    from editx_jax.convert.keymap import flatten

    start = time.time()
    config, params, info = load_released(src, progress=progress, dtype=dtype)
    meta = {"component": COMPONENT, "dtype": "float32", "converted_from": str(pathlib.Path(src).absolute()),
            **info}
    checkpoint.save_params(dst, params, config, meta)
    nbytes = sum(np.asarray(a).nbytes for a in flatten(params).values())
    return {"tensors": info["paraformer_tensors"] + info["s3_tensors"] + 2, "ignored": len(info["ignored"]),
            "dtype": "float32", "bytes": nbytes, "seconds": round(time.time() - start, 2),
            "dst": str(pathlib.Path(dst).absolute())}


def config_json(config: AudioTokenizerConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)
