"""The semantic "vq06" stream: the S3 tokenizer v1, 25 Hz variant (architecture.md §2.2, §6 fact 2, §7.4, §7.8).

    log-mel [B, n_mels, T] --conv(k3, s2)+GELU--> --conv(k3, s2)+GELU--> + positions
        --> n_layer pre-LN blocks (no final LayerNorm) = hidden [B, T', D]
        --> L2-normalise --> nearest codebook row (squared distance) = tokens [B, T']

Batched inputs are padded and masked exactly as the PyTorch reimplementation does it (§7.4): padded
frames are zeroed before each convolution and keys past a clip's length get a -1e10 bias, so every
clip's valid frames equal its run alone. Frames past `token_len` are still computed (the reference
stores them too) and are padding.

Long audio follows the official `get_vq06_code`: non-overlapping 30 s pieces of the 16 kHz signal, a
tail shorter than 480 samples dropped, each piece's log-mel computed on its own, each piece tokenized
alone and the codes concatenated. `tokenize_waveforms` does that in bounded memory (a few pieces at
a time, padded to a small set of lengths so a new clip length does not recompile).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.audio.features import bucket_length, whisper_log_mel
from editx_jax.config.audio import S3TokenizerConfig, conv_out_len


class S3InputError(ValueError):
    """The tokenizer was given an input it cannot tokenize (wrong shape, length, NaN...)."""


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table [sin | cos], float32 like the reference buffer.

    Only used to initialise fresh params: converted params carry the stored table (§7.8), which differs
    from a float64 recomputation by up to 1.3e-5.
    """
    half = channels // 2
    inc = np.float32(np.log(max_timescale) / (half - 1))
    inv = np.exp(-inc * np.arange(half, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------- layers


def _layer_norm(cfg: S3TokenizerConfig, name: str) -> nn.LayerNorm:
    # two-pass variance like torch (the one-pass E[x²]-E[x]² loses digits on large activations)
    return nn.LayerNorm(epsilon=cfg.ln_eps, use_fast_variance=False, name=name)


class S3Attention(nn.Module):
    """Whisper attention: q, v, out with bias, key without; q and k each scaled by head_dim^-0.25."""

    config: S3TokenizerConfig

    @nn.compact
    def __call__(self, x, key_bias):
        cfg = self.config
        dense = functools.partial(nn.Dense, cfg.n_audio_state, precision=cfg.precision)
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, t, cfg.n_audio_head, cfg.head_dim)  # noqa: E731
        scale = cfg.head_dim ** -0.25
        q = heads(dense(name="query")(x)) * scale
        k = heads(dense(use_bias=False, name="key")(x)) * scale
        v = heads(dense(name="value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=cfg.precision)
        scores = scores + key_bias[:, None, None, :]
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=cfg.precision)
        return dense(name="out")(out.reshape(b, t, cfg.n_audio_state))


class S3Block(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + fc2(GELU(fc1(LN(x))))."""

    config: S3TokenizerConfig

    @nn.compact
    def __call__(self, x, key_bias):
        cfg = self.config
        x = x + S3Attention(cfg, name="attn")(_layer_norm(cfg, "attn_ln")(x), key_bias)
        h = _layer_norm(cfg, "mlp_ln")(x)
        h = nn.Dense(4 * cfg.n_audio_state, precision=cfg.precision, name="fc1")(h)
        h = nn.gelu(h, approximate=False)
        h = nn.Dense(cfg.n_audio_state, precision=cfg.precision, name="fc2")(h)
        return x + h, None


class S3Encoder(nn.Module):
    """log-mel [B, n_mels, T] (whisper layout), mel_len [B] -> hidden [B, T', D], token_len [B]."""

    config: S3TokenizerConfig

    @nn.compact
    def __call__(self, mel, mel_len):
        cfg = self.config
        x = jnp.swapaxes(mel.astype(jnp.float32), 1, 2)  # [B, T, n_mels]: features last for nn.Conv
        length = mel_len.astype(jnp.int32)
        for name, stride in (("conv1", cfg.conv1_stride), ("conv2", 2)):
            # padded frames are zeroed before each conv so they never leak into valid outputs (§7.4)
            x = x * _valid(length, x.shape[1])[..., None]
            x = nn.Conv(cfg.n_audio_state, kernel_size=(3,), strides=(stride,), padding=[(1, 1)],
                        precision=cfg.precision, name=name)(x)
            x = nn.gelu(x, approximate=False)
            length = conv_out_len(length, stride)
        t = x.shape[1]
        if t > cfg.n_audio_ctx:
            raise S3InputError(f"{mel.shape[-1]} mel frames give {t} positions, more than n_audio_ctx "
                               f"{cfg.n_audio_ctx}; split the audio into chunks (tokenize_waveforms)")
        table = self.param("positional_embedding",
                           lambda _key: jnp.asarray(sinusoids(cfg.n_audio_ctx, cfg.n_audio_state)))
        x = x + table[:t]
        # mask_to_bias: 0 on valid keys, -1e10 on padding (not -inf, so an all-padding row stays finite)
        key_bias = jnp.where(_valid(length, t), 0.0, -1.0e10).astype(jnp.float32)
        blocks = nn.scan(S3Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=cfg.n_audio_layer)
        x, _ = blocks(cfg, name="blocks")(x, key_bias)
        return x, length  # no final LayerNorm


def _valid(length, t):
    return (jnp.arange(t)[None, :] < length[:, None]).astype(jnp.float32)


# ---------------------------------------------------------------------------------------- VQ


def quantize(hidden, codebook, precision=jax.lax.Precision.HIGHEST):
    """Nearest codebook row of each L2-normalised frame: argmax of -(|x|² - 2x·E + |E|²).

    hidden [..., D], codebook [K, D] (raw, not normalised) -> int32 [...].
    """
    x = hidden.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize, eps 1e-12
    e = codebook.astype(jnp.float32)
    score = -(jnp.sum(x * x, axis=-1, keepdims=True)
              - 2.0 * jnp.einsum("...d,kd->...k", x, e, precision=precision)
              + jnp.sum(e * e, axis=-1))
    return jnp.argmax(score, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------- params


def init_params(config: S3TokenizerConfig, key=None) -> dict:
    """Random params {"encoder": ..., "quantizer": {"codebook": [K, D]}} (for tests and benchmarks)."""
    return _init_params(config, jax.random.PRNGKey(0) if key is None else key)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: S3TokenizerConfig, key) -> dict:
    k_enc, k_cb = jax.random.split(key)
    mel = jnp.zeros((1, config.n_mels, 8), jnp.float32)
    enc = S3Encoder(config).init(k_enc, mel, jnp.array([8], jnp.int32))["params"]
    codebook = jax.random.normal(k_cb, (config.codebook_size, config.n_audio_state), jnp.float32) * 0.1
    return {"encoder": enc, "quantizer": {"codebook": codebook}}


def abstract_params(config: S3TokenizerConfig) -> dict:
    """Shapes and dtypes of the params tree, without allocating it (for the converters)."""
    return jax.eval_shape(functools.partial(_init_params, config), jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------- tokenize


@functools.partial(jax.jit, static_argnames=("config",))
def _tokenize(params, mel, mel_len, config):
    hidden, token_len = S3Encoder(config).apply({"params": params["encoder"]}, mel, mel_len)
    tokens = quantize(hidden, params["quantizer"]["codebook"], config.precision)
    return tokens, token_len, hidden


def tokenize(params, mel, mel_len, config: S3TokenizerConfig = S3TokenizerConfig()):
    """Batched tokens of padded log-mels (jitted).

    mel [B, n_mels, T] float (whisper layout, zero-padded), mel_len [B] int (valid frames per clip)
    -> tokens [B, T'] int32, token_len [B] int32, hidden [B, T', D] float32 (pre-VQ features).
    Frames past token_len are padding. T' must not exceed n_audio_ctx (one 30 s chunk gives 750).
    """
    mel = jnp.asarray(mel)
    mel_len = jnp.asarray(mel_len)
    if mel.ndim != 3 or mel.shape[1] != config.n_mels:
        raise S3InputError(f"mel must be [batch, {config.n_mels}, frames], got shape {tuple(mel.shape)}")
    if mel_len.shape != (mel.shape[0],):
        raise S3InputError(f"mel_len must be [{mel.shape[0]}], got shape {tuple(mel_len.shape)}")
    if not jnp.issubdtype(mel_len.dtype, jnp.integer):
        raise S3InputError(f"mel_len must be integers, got {mel_len.dtype}")
    if not isinstance(mel_len, jax.core.Tracer):  # concrete lengths can be checked (not inside a jit)
        lens = np.asarray(mel_len)
        if np.any(lens < 0) or np.any(lens > mel.shape[2]):
            raise S3InputError(f"mel_len must be within [0, {mel.shape[2]}] frames, got {lens.tolist()}")
    return _tokenize(params, mel, mel_len, config)


def split_chunks(audio: np.ndarray, config: S3TokenizerConfig = S3TokenizerConfig()) -> list[np.ndarray]:
    """The official 30 s split: consecutive non-overlapping pieces; pieces under 480 samples dropped."""
    n, step = len(audio), config.chunk_samples
    return [audio[s:s + step] for s in range(0, n, step) if min(step, n - s) >= config.min_chunk_samples]


def _bucket(frames: int, cap: int) -> int:
    """Padded mel length: the smallest 2^k or 3·2^(k-1) >= frames (at least 64, so at most a third
    is padding), but never beyond a full chunk."""
    return min(cap, bucket_length(frames, 64))


def _default_logmel(audio: np.ndarray) -> np.ndarray:
    return np.asarray(whisper_log_mel(audio))  # the whisper 128-bin log-mel front end


def tokenize_waveforms(params, waves: Sequence[np.ndarray], config: S3TokenizerConfig = S3TokenizerConfig(),
                       batch_size: int = 8, logmel_fn: Callable[[np.ndarray], np.ndarray] | None = None
                       ) -> list[np.ndarray]:
    """vq06 codes of each 16 kHz waveform (any length), as the official get_vq06_code computes them.

    Every clip is cut into 30 s pieces; each piece's log-mel is computed on its own (the whisper
    max-8 clamp is per piece) and the piece is tokenized as if alone (masking makes batching exact).
    Pieces of all clips are run `batch_size` at a time, so memory is bounded by the batch, not by the
    audio length. `logmel_fn(piece) -> [n_mels, piece // hop]` defaults to the whisper front end.
    Returns one int32 array of codes per clip (empty when the clip is shorter than 480 samples).
    """
    if batch_size < 1:
        raise S3InputError(f"batch_size must be at least 1, got {batch_size}")
    logmel_fn = logmel_fn or _default_logmel
    pieces = []  # (clip index, piece)
    for i, wave in enumerate(waves):
        wave = np.asarray(wave)
        if wave.ndim != 1:
            raise S3InputError(f"waveform {i} must be 1-D mono samples, got shape {wave.shape}")
        if wave.size and not np.all(np.isfinite(wave)):
            raise S3InputError(f"waveform {i} contains NaN or Inf samples")
        pieces.extend((i, p) for p in split_chunks(wave, config))
    cap = config.chunk_samples // config.hop_length
    codes: list[list[np.ndarray]] = [[] for _ in waves]
    # longest first keeps pieces of similar length (hence the same padded shape) in one batch
    order = sorted(range(len(pieces)), key=lambda j: -len(pieces[j][1]))
    results: dict[int, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        mels = [np.asarray(logmel_fn(pieces[j][1]), np.float32) for j in group]
        frames = max(m.shape[-1] for m in mels)
        width = max(_bucket(frames, cap), frames)
        rows = min(batch_size, 1 << (len(group) - 1).bit_length())  # 1, 2, 4, ...: few shapes to compile
        batch = np.zeros((rows, config.n_mels, width), np.float32)
        lens = np.zeros((rows,), np.int32)
        for row, m in enumerate(mels):
            if m.ndim != 2 or m.shape[0] != config.n_mels:
                raise S3InputError(f"log-mel must be [{config.n_mels}, frames], got shape {m.shape}")
            batch[row, :, :m.shape[-1]] = m
            lens[row] = m.shape[-1]
        tokens, token_len, _ = tokenize(params, batch, lens, config)
        tokens, token_len = np.asarray(tokens), np.asarray(token_len)
        for row, j in enumerate(group):
            results[j] = tokens[row, :token_len[row]]
    for j, (i, _) in enumerate(pieces):  # pieces are in time order per clip
        codes[i].append(results[j])
    return [np.concatenate(c).astype(np.int32) if c else np.zeros((0,), np.int32) for c in codes]
