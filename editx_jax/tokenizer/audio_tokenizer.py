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
single stream over the whole clip, run in blocks of `vq02_block_calls` streaming calls with the
exact context each block needs recomputed in front of it (`tokenizer/vq02.py`); the codes equal
those of one pass over the whole clip.

Converting a released `Step-Audio-Tokenizer/` folder is `editx_jax.convert.tokenizer`'s job; this
module only reads the checkpoint folders it writes.

Bad input (documented results; everything else is one `AudioError` line naming the clip):
  * missing / empty / undecodable / truncated-header files, zero samples, NaN or Inf -> AudioError;
  * multichannel audio is averaged to mono; any sample rate is resampled (up as well as down);
  * all-silent (or all-zero) audio is not trimmed (librosa counts it all as non-silent) and yields
    the codes of silence, as the official code does;
  * a WAV whose header promises more samples than the file holds -> AudioError ("truncated");
  * audio shorter than `audio_io.MIN_AUDIO_SECONDS` (0.1 s), as a file or a wave -> AudioError, as in
    every tool; above it, trim_silence pads every clip to at least 0.27 s (2 groups or more), and
    even untrimmed the minimum holds one 2+3 group; `TooShortError` (an AudioError) guards the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.audio import features
from editx_jax.audio import io as audio_io
from editx_jax.audio.io import AudioError
from editx_jax import checkpoint, codes
from editx_jax.config import ConfigError, from_dict
from editx_jax.config.audio import AudioTokenizerConfig, S3TokenizerConfig, WhisperMelConfig
from editx_jax.tokenizer import paraformer as pf
from editx_jax.tokenizer import s3tokenizer as s3
from editx_jax.tokenizer.vq02 import vq02_codes_from_features, vq02_features
from editx_jax.tree import shape_diff
from editx_jax.vocab import GROUP

COMPONENT = "audio_tokenizer"


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
        return self.ids.size // GROUP

    def to_json(self, **extra) -> dict:
        return {**extra, "seconds": round(self.seconds, 4), "vq02": self.vq02.tolist(),
                "vq06": self.vq06.tolist(), "ids": self.ids.tolist(), "tokens": self.text}


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
        missing, extra, wrong = shape_diff(abstract_tokenizer_params(config), params)
        if missing or extra:
            raise ConfigError(f"audio tokenizer params do not match the config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
        if wrong:
            path, want_shape, got_shape = wrong[0]
            raise ConfigError(f"audio tokenizer param {path} has shape {list(got_shape)}, the config "
                              f"expects {list(want_shape)}")
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
        meta = checkpoint.read_meta(folder)
        if meta.get("component") != COMPONENT:
            raise checkpoint.CheckpointError(f"{folder} holds a {meta.get('component')!r} checkpoint, "
                                             f"not the audio tokenizer")
        config = from_dict(AudioTokenizerConfig, {**checkpoint.read_config(folder), **overrides}, COMPONENT)
        params = checkpoint.load_params(folder, abstract_tokenizer_params(config))
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
        params = jax.tree_util.tree_map(np.asarray, self.params)
        return checkpoint.save_params(folder, params, self.config,
                                      {"component": COMPONENT, "dtype": "float32", **dict(meta or {})})

    # ------------------------------------------------------------------ preprocessing

    def load(self, source, sample_rate: int | None = None, name: str | None = None) -> np.ndarray:
        """One clip (path, or wave [N] / [C, N] with its rate) -> the preprocessed 16 kHz mono wave.

        Integer waves are PCM (scaled by 1/32768 for int16); a 2-D wave with more than 64 rows and
        at most 64 columns is taken as soundfile's [samples, channels]."""
        cfg = self.config
        clip = audio_io.prepare_clip(source, sample_rate, name=name, peak_cap=cfg.peak_cap)
        wave = audio_io.resample(clip.wave, clip.sr, cfg.sample_rate)
        wave = audio_io.energy_norm(wave, peak=cfg.energy_peak)
        if cfg.trim:
            wave = audio_io.trim_silence(wave, cfg.sample_rate)
        groups = codes.num_groups(sum(features.online_chunk_lens(wave.shape[0], cfg.fbank)),
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
                                     ids=codes.interleave_ids(vq02, vq06),
                                     text=codes.merge_vq0206_to_token_str(vq02, vq06),
                                     seconds=wave.shape[0] / self.config.sample_rate)
        return results


def _logmel(piece, config: WhisperMelConfig):
    return np.asarray(features.whisper_log_mel(piece, config))
