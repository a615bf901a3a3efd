"""Streaming token2wav: the official `CosyVoice_stream_impl_.token2wav_stream` (architecture.md §3.8).

What the reference does, and this module reproduces (batch 1, one session per `Token2WavStream`):

* Tokens are buffered. Once 5 ids (3 pair frames, the encoder's look-ahead) are there, `setup` runs
  the flow once on [prompt pairs, 3 look-ahead pairs]: the encoder's look-ahead conv consumes the 3
  extra frames, so it emits the prompt's 2 Lp mel frames; the DiT runs them (cond = prompt mel, noise
  frames [0, 2 Lp)) only to fill its caches. Nothing is emitted.
* Then chunks of `chunk_size_list` = 15, 24, 48, 48, ... pair frames (25, 40, 80 ids), each sent
  with the next 5 ids as look-ahead (the look-ahead ids are sent again with the next chunk). The
  final call sends whatever is left and pads the look-ahead with zeros, as the offline encoder does.
* Encoder caches: the last 2 outputs of the look-ahead conv1, the last 4 upsampled frames, and the
  K/V of every conformer layer (all past frames, never truncated). A chunk attends to every cached
  frame and to itself, and never ahead: the encoder is block-causal where the offline one is not.
  Relative positions use absolute frame offsets.
* DiT caches, per ODE step, per block, for both CFG halves: the K/V (new frames are put first) and
  the last 2 input frames of both causal convs. After each chunk the K/V are cut to the 96 newest
  frames plus the prompt frames. So the DiT is block-causal with a bounded left context.
* The ODE noise of a chunk is the noise buffer at [offset, offset + frames) with offset = the DiT
  cache length before the chunk: the absolute frame index until the cache is first cut (prompt + 96
  frames), then a fixed offset of prompt + 96 frames for every later chunk.
* Vocoder: the last `mel_cache_len` = 8 mel frames are vocoded again with each chunk. For HiFT the
  first 8 x 480 samples of the new NSF source are replaced by the previous chunk's last ones; the
  first 3840 output samples are cross-faded (Hamming window of 7680) with the 3840 samples held back
  from the previous chunk, and every chunk but the last holds back its last 3840 samples. For
  BigVGAN the mel is reflect-padded by 3 frames before the first chunk and after the last, and the
  overlap is (8 - 6) x 480 = 960 samples.

What it equals. Not the offline result: the block-causal attention, the cut DiT context, the
re-used noise and the vocoder overlap make streaming differ from `token2wav_nonstream` by design
(tests/test_token2wav.py measures the gap on random weights). The total length is the same:
480 x 2 x 3 ceil(N / 5) samples. Our encoder and DiT chunk functions with empty caches reproduce the
offline modules exactly (tested), and the chunking is independent of how ids are pushed: pushing one
id at a time (the reference's intended use, one call per generated id) or all at once gives the same
chunks. Unlike the reference, which handles at most one chunk per call, `push` handles every chunk
that is ready, and a final call with fewer than 5 ids in total still produces audio.

A stream compiles a bounded set of shapes, not one per chunk. Every chunk's pairs are zero-padded to
the largest chunk (+ look-ahead) and the setup's to a multiple of PROMPT_BUCKET pairs, with the real
counts passed as traced ints. The encoder's K/V cache grows with every chunk (as in the reference),
so it lives in zero-padded buffers of power-of-two capacity, sized at the start for the prompt and
HEADROOM_CHUNKS largest chunks and doubled when full: the encoder compiles once for the setup and
once per capacity, and only long streams (O(log N) for N chunks) see a second capacity. The DiT runs
each chunk size's mel frames (a last chunk padded up to the smallest size that holds it) against
fixed-size prompt and window K/V buffers with masks, so it compiles once for the setup and once per
chunk size, whatever the cache cut has done, and a stream whose prompt falls in the same bucket
compiles nothing new. The vocoder cannot be padded (HiFT and BigVGAN see both sides), so it compiles
per distinct chunk length: each chunk size and the last chunk's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.decoder.dit import TIME_FREQ_DIM, modulate, mish, timestep_features
from editx_jax.decoder.embedding import DualCodebookEmbedding
from editx_jax.decoder.flow import FlowConfig, cosine_t_span, noise_from_key
from editx_jax.decoder.token2wav import Decoder
from editx_jax.decoder.tokens import Token2WavError, as_sequences, audio_values, reshape_values
from editx_jax.decoder.upsample_encoder import rel_position_table
from editx_jax.vocab import AUDIO_ID_OFFSET, GROUP

_HI = jax.lax.Precision.HIGHEST
LOOKAHEAD_IDS = 5  # the reference's _mixed_len(pre_lookahead_len = 3) = (3 // 3) * 5
PROMPT_BUCKET = 32  # pair frames: the setup pads the prompt to a multiple of this
HEADROOM_CHUNKS = 8  # the encoder K/V buffers start with room for this many largest chunks


def mixed_len(frames: int) -> int:
    """Pair frames -> mixed ids (the reference's `_mixed_len`): (frames // 3) * 5."""
    return (frames // 3) * GROUP


# ------------------------------------------------------------------------------- small layers


def _dense(p, x):
    y = jnp.matmul(x, p["kernel"], precision=_HI)
    return y + p["bias"] if "bias" in p else y


def _layer_norm(x, eps, p=None):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)  # two-pass, like torch
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return y * p["scale"] + p["bias"] if p is not None else y


def _conv_valid(p, x):
    """Conv1d without padding on NWC x; kernel [k, in, out]."""
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
                                     precision=_HI)
    return y + p["bias"]


def _layer(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


# ------------------------------------------------------------------------------- encoder chunk


def _rel_attention(p, x, k_buf, v_buf, start, valid, heads):
    """ESPnet rel-pos attention of chunk x (1, T, D) over [cache, chunk]; returns (out, k_buf, v_buf).

    k_buf / v_buf (1, C, H, dk) are fixed-capacity buffers whose first `start` frames hold the cache:
    the chunk's K/V are written at [start, start + T) and keys at or after start + `valid` (the
    chunk's real frames; the rest of T is padding) are masked. `start` and `valid` are traced, so
    every chunk of a stream reuses one compiled shape per capacity.
    """
    b, t, d = x.shape
    dk = d // heads
    cap = k_buf.shape[1]
    split = lambda y: y.reshape(b, -1, heads, dk)  # noqa: E731
    q = split(_dense(p["linear_q"], x))
    k = jax.lax.dynamic_update_slice_in_dim(k_buf, split(_dense(p["linear_k"], x)), start, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(v_buf, split(_dense(p["linear_v"], x)), start, axis=1)
    # table rows for the distances a query can see, cap - 1 down to -(t - 1) (row r: distance cap - 1 - r)
    pos = jnp.asarray(rel_position_table(cap, d)[:cap + t - 1])
    pp = jnp.matmul(pos, p["linear_pos"]["kernel"], precision=_HI).reshape(-1, heads, dk)
    ac = jnp.einsum("bthd,bshd->bhts", q + p["pos_bias_u"], k, precision=_HI)
    bd = jnp.einsum("bthd,rhd->bhtr", q + p["pos_bias_v"], pp, precision=_HI)
    # query i sits at absolute frame start + i, key j at j: row (cap - 1) - (start + i - j)
    keys = jnp.arange(cap)[None, :]
    index = jnp.clip((cap - 1) - (start + jnp.arange(t)[:, None]) + keys, 0, cap + t - 2)
    bd = jnp.take_along_axis(bd, jnp.broadcast_to(index, bd.shape[:2] + index.shape), axis=-1)
    scores = jnp.where(keys < start + valid, (ac + bd) / math.sqrt(dk), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, v, precision=_HI).reshape(b, t, d)
    return _dense(p["linear_out"], out), k, v


def _conformer_chunk(stack, x, k_cache, v_cache, start, valid, heads, eps):
    """The stacked conformer layers on a chunk, with per-layer K/V buffers (L, 1, C, H, dk)."""
    def body(h, layer):
        p, kc, vc = layer
        att, k, v = _rel_attention(p["self_attn"], _layer_norm(h, eps, p["norm_mha"]), kc, vc, start, valid, heads)
        h = h + att
        y = _layer_norm(h, eps, p["norm_ff"])
        h = h + _dense(p["feed_forward"]["w_2"], jax.nn.silu(_dense(p["feed_forward"]["w_1"], y)))
        return h, (k, v)

    return jax.lax.scan(body, x, (stack, k_cache, v_cache))


def cache_capacity(frames: int) -> int:
    """The encoder K/V buffer size (pair frames) for `frames` cached + new frames: a power of two
    (at least 64), so a stream of N chunks compiles the encoder O(log N) times, not N times."""
    return max(64, 1 << max(0, frames - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("config",))
def encoder_chunk(params, emb, cnn1, cnn2, k1, v1, k2, v2, cached, n_in, n_out, config: FlowConfig):
    """`UpsampleConformerEncoderV2.forward_chunk` + `encoder_proj` on a zero-padded chunk.

    emb (1, S, D): the dual-codebook embedding of the chunk's pairs (look-ahead included), of which
    the first `n_in` are real and the rest padding; `n_out` of them come out: n_in - 3 (the look-ahead
    conv consumes 3), or n_in for the last chunk, whose look-ahead is zeros as in the offline encoder.
    cnn1 (1, 2, D) / cnn2 (1, 2 stride, D): conv caches (zeros at the start); k1/v1 (L1, 1, C, H, dk),
    k2/v2 (L2, 1, stride C, H, dk): conformer K/V buffers whose first `cached` (stride x `cached`)
    frames are valid; C >= cached + S (`cache_capacity`). `cached`, `n_in` and `n_out` are traced,
    so every chunk padded to one S shares a compilation. Returns mu (1, stride S, 80), valid for its
    first stride x n_out frames, and the new caches (the chunk's K/V written after the valid frames).
    """
    cfg = config.encoder
    p = params["encoder"]
    d, heads, look, stride = cfg.output_size, cfg.attention_heads, cfg.pre_lookahead_len, cfg.up_stride
    x = _layer_norm(_dense(p["embed"]["linear"], emb), cfg.embed_eps, p["embed"]["norm"]) * math.sqrt(d)
    s = x.shape[1]
    # zeros past the real frames: the last chunk's look-ahead padding, and nothing else reads them
    x = jnp.pad(jnp.where(jnp.arange(s)[:, None] < n_in, x, 0.0), ((0, 0), (0, look), (0, 0)))
    # pre-lookahead: conv1 reads `look` frames ahead (no padding), conv2 reads 2 cached frames behind
    y = jax.nn.leaky_relu(_conv_valid(p["pre_lookahead_layer"]["conv1"], x), 0.01)
    new_cnn1 = jax.lax.dynamic_slice_in_dim(y, n_out - 2, 2, axis=1)
    y = _conv_valid(p["pre_lookahead_layer"]["conv2"], jnp.concatenate([cnn1, y], axis=1))
    x = x[:, :s] + y
    x, (k1, v1) = _conformer_chunk(p["encoders"], x, k1, v1, cached, n_out, heads, cfg.layer_eps)
    # upsample: nearest x stride, 2 stride cached frames in front, conv k = 2 stride + 1 (causal)
    up = jnp.concatenate([cnn2, jnp.repeat(x, cfg.up_scale_factor, axis=1)], axis=1)
    new_cnn2 = jax.lax.dynamic_slice_in_dim(up, stride * n_out, cnn2.shape[1], axis=1)
    x = _conv_valid(p["up_layer"]["conv"], up)
    x = _layer_norm(_dense(p["up_embed"]["linear"], x), cfg.embed_eps, p["up_embed"]["norm"]) * math.sqrt(d)
    x, (k2, v2) = _conformer_chunk(p["up_encoders"], x, k2, v2, cached * stride, stride * n_out, heads,
                                   cfg.layer_eps)
    x = _layer_norm(x, cfg.embed_eps, p["after_norm"])
    return _dense(params["encoder_proj"], x), new_cnn1, new_cnn2, k1, v1, k2, v2


def _grow_encoder_caches(caches, frames: int, stride: int):
    """Zero-pad the K/V buffers of (cnn1, cnn2, k1, v1, k2, v2) to `cache_capacity(frames)` if smaller."""
    cnn1, cnn2, *kv = caches
    cap = cache_capacity(frames)
    if kv[0].shape[2] >= cap:
        return caches
    pad = lambda c, n: jnp.pad(c, ((0, 0), (0, 0), (0, n - c.shape[2]), (0, 0), (0, 0)))
    k1, v1, k2, v2 = kv
    return [cnn1, cnn2, pad(k1, cap), pad(v1, cap), pad(k2, stride * cap), pad(v2, stride * cap)]


# ------------------------------------------------------------------------------- DiT chunk


def _causal_conv_chunk(p, x, cache, valid):
    """CausalConv1d.forward_chunk: cache (B, 2, C) in front; the new cache is the last 2 input frames
    among the chunk's first `valid` (traced) frames; later (padding) frames affect no earlier output."""
    full = jnp.concatenate([cache, x], axis=1)
    return _conv_valid(p, full), jax.lax.dynamic_slice_in_dim(full, valid, cache.shape[1], axis=1)


def _dit_chunk(p, cfg, x, mu, t, spks, cond, valid, conv1_cache, conv2_cache, prompt_k, prompt_v, prompt_valid,
               recent_k, recent_v, recent_valid):
    """`DiT.forward_chunk` (no mask): one velocity for the chunk, its K/V and new conv caches.

    x, mu, cond (B, T, 80), of which the first `valid` frames are real; t (B,); spks (B, 80); conv
    caches (depth, B, 2, hidden). The cached K/V (depth, B, frames, H, hd) are the prompt's (its first
    `prompt_valid` frames real) and the recent window's (its first `recent_valid` frames real). The
    DiT has no positions, so keys are a set: the reference's cache order only decides what its cut
    keeps, which `cut_window` reproduces. Returns (v (B, T, 80), conv1, conv2, k, v) with the
    chunk's own K/V (depth, B, T, H, hd).
    """
    est = cfg
    b, t_len, _ = x.shape
    c = _dense(p["t_embedder"]["fc2"], jax.nn.silu(_dense(p["t_embedder"]["fc1"], timestep_features(t, TIME_FREQ_DIM))))
    c = c[:, None, :]
    spks_t = jnp.broadcast_to(spks[:, None, :], (b, t_len, spks.shape[-1]))
    h = _dense(p["in_proj"], jnp.concatenate([x, mu, spks_t, cond], axis=-1))
    n_prompt, n_recent = prompt_k.shape[2], recent_k.shape[2]
    key_ok = jnp.concatenate([jnp.arange(t_len) < valid, jnp.arange(n_prompt) < prompt_valid,
                              jnp.arange(n_recent) < recent_valid])

    def block(h, layer):
        bp, c1, c2, pk, pv, rk, rv = layer
        mods = jnp.split(_dense(bp["adaln"], jax.nn.silu(c)), 9, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_conv, scale_conv, gate_conv = mods
        a = modulate(_layer_norm(h, 1e-6), shift_msa, scale_msa)
        heads = lambda y: y.reshape(b, t_len, est.num_heads, est.head_dim)  # noqa: E731
        ap = bp["attn"]
        q = _layer_norm(heads(_dense(ap["to_q"], a)), 1e-5, ap["q_norm"])
        k_new = _layer_norm(heads(_dense(ap["to_k"], a)), 1e-5, ap["k_norm"])
        v_new = heads(_dense(ap["to_v"], a))
        k = jnp.concatenate([k_new, pk, rk], axis=1)
        v = jnp.concatenate([v_new, pv, rv], axis=1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HI) / math.sqrt(est.head_dim)
        scores = jnp.where(key_ok, scores, -jnp.inf)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision=_HI)
        h = h + gate_msa * _dense(ap["proj"], att.reshape(b, t_len, -1))
        cp = bp["conv"]
        y, c1 = _causal_conv_chunk(cp["conv1"], modulate(_layer_norm(h, 1e-6), shift_conv, scale_conv), c1, valid)
        y, c2 = _causal_conv_chunk(cp["conv2"], mish(_layer_norm(y, 1e-5, cp["norm"])), c2, valid)
        h = h + gate_conv * y
        m = modulate(_layer_norm(h, 1e-6), shift_mlp, scale_mlp)
        m = _dense(bp["mlp"]["fc2"], jax.nn.gelu(_dense(bp["mlp"]["fc1"], m), approximate=True))
        return h + gate_mlp * m, (c1, c2, k_new, v_new)

    h, caches = jax.lax.scan(block, h, (p["blocks"], conv1_cache, conv2_cache, prompt_k, prompt_v, recent_k, recent_v))
    fp = p["final_layer"]
    shift, scale = jnp.split(_dense(fp["adaln"], jax.nn.silu(c)), 2, axis=-1)
    return (_dense(fp["linear"], modulate(_layer_norm(h, 1e-6), shift, scale)),) + caches


@functools.partial(jax.jit, static_argnames=("config", "n_timesteps"))
def dit_chunk_ode(params, z, mu, spks, cond, valid, conv1, conv2, prompt_k, prompt_v, prompt_valid, recent_k,
                  recent_v, recent_valid, config: FlowConfig, n_timesteps: int):
    """`CausalConditionalCFM.forward_chunk`: Euler with CFG over one chunk, with per-step caches.

    z, mu, cond (1, T, 80), the first `valid` frames real; spks (1, 80); conv caches (steps, depth,
    2, 2, hidden); K/V caches (steps, depth, 2, frames, H, hd) of the prompt (first `prompt_valid`
    real) and of the recent window (first `recent_valid` real); the CFG batch is [conditional,
    unconditional]. The counts are traced: one compilation per (T, prompt frames, window). Returns
    the mel (1, T, 80), the new conv caches and the chunk's K/V (steps, depth, 2, T, H, hd).
    """
    p = params["estimator"]
    rate = config.inference_cfg_rate
    mu_in = jnp.concatenate([mu, jnp.zeros_like(mu)], axis=0)
    spks_in = jnp.concatenate([spks, jnp.zeros_like(spks)], axis=0)
    cond_in = jnp.concatenate([cond, jnp.zeros_like(cond)], axis=0)
    t_span = cosine_t_span(n_timesteps)

    def step(carry, per_step):
        x, t, dt, k = carry
        v, *caches = _dit_chunk(p, config.estimator, jnp.concatenate([x, x], axis=0), mu_in,
                                jnp.full((2,), t, jnp.float32), spks_in, cond_in, valid, *per_step[:4],
                                prompt_valid, *per_step[4:], recent_valid)
        v = (1.0 + rate) * v[:1] - rate * v[1:]
        x = x + dt * v
        t = t + dt
        dt = t_span[jnp.minimum(k + 2, n_timesteps)] - t  # same float32 rounding as the offline solver
        return (x, t, dt, k + 1), tuple(caches)

    init = (z.astype(jnp.float32), t_span[0], t_span[1] - t_span[0], 0)
    (x, _, _, _), caches = jax.lax.scan(step, init, (conv1, conv2, prompt_k, prompt_v, recent_k, recent_v))
    return (x,) + caches


@jax.jit
def cut_window(window, new, valid, window_valid):
    """The reference's DiT cache cut, on the window of non-prompt K/V (steps, depth, 2, W, H, hd)
    whose first `window_valid` frames are real: after a chunk whose first `valid` frames of `new`
    are real, the window is the first W frames of [chunk frames in time order, window]. (The
    reference puts each chunk in front of its cache and keeps the cache's first W frames: the newest
    chunk first, each chunk's frames in time order.)"""
    w, t = window.shape[3], new.shape[3]
    j = jnp.arange(w)
    index = jnp.where(j < valid, j, t + jnp.clip(j - valid, 0, w - 1))
    return jnp.take(jnp.concatenate([new, window], axis=3), index, axis=3)


# frame j of a chunk starting at `offset` (traced) is noise_from_key's frame offset + j
_noise_frames = jax.jit(noise_from_key, static_argnames=("batch", "frames", "channels"))


# ------------------------------------------------------------------------------- the session


class Token2WavStream:
    """One streaming session (batch 1). `push(ids)` returns the speech that is ready (possibly
    empty); `push(ids, last=True)` / `finish()` flushes the rest. Concatenating every returned
    piece gives the whole utterance. See the module docstring for what it reproduces.

    noise: the ODE noise buffer (1, >= frames, 80) channels-last, indexed like the reference's
      `rand_noise`; else `noise_from_key(key)` (default key 0) per absolute frame.
    vocoder_key: HiFT's NSF draws for chunk i come from fold_in(vocoder_key, i) (default key 0).
    """

    def __init__(self, decoder: Decoder, prompt_ids, prompt_mel, spk_embedding, *, noise=None, key=None,
                 vocoder_key=None):
        self.decoder = decoder
        self.cfg = decoder.config
        self.flow_cfg = decoder.flow_config
        prompt = as_sequences(prompt_ids, "prompt_ids")
        if len(prompt) != 1:
            raise Token2WavError("a stream is one utterance: give one prompt")
        if np.asarray(prompt[0]).size == 0:
            raise Token2WavError("streaming needs prompt ids (the reference's DiT cache cut keeps the prompt frames)")
        # validation and prompt mel stretch as offline; the generated side gets one dummy group
        dummy = np.full(GROUP, AUDIO_ID_OFFSET, np.int64)
        _, pp, conds, embs = decoder.prepare(dummy, prompt[0], prompt_mel, spk_embedding)
        self.prompt_pairs, self.prompt_cond, self.embedding = pp[0], conds[0], embs
        self.noise = None if noise is None else jnp.asarray(noise, jnp.float32)
        self.key = jax.random.key(0) if key is None else key
        self.vocoder_key = jax.random.key(0) if vocoder_key is None else vocoder_key
        self.buffer: list[int] = []  # audio values not yet sent
        self.chunk_sizes = list(self.cfg.chunk_size_list)
        self.started = False  # caches filled by `_setup`
        # the DiT's chunk lengths (mel frames): each chunk size's, and the largest padded chunk's
        stride, look = self.flow_cfg.encoder.up_stride, self.flow_cfg.encoder.pre_lookahead_len
        self.dit_lengths = sorted({stride * c for c in self.chunk_sizes} | {stride * (max(self.chunk_sizes) + look)})
        self.done = False
        self.chunk_index = 0
        self.voc_mel = np.zeros((0, self.flow_cfg.output_size), np.float32)
        self.voc_source = np.zeros((0,), np.float32)
        self.voc_speech = np.zeros((0,), np.float32)
        self.voc_first = True
        self.mels: list[np.ndarray] = []  # the flow's mel per chunk (for inspection)

    # -------------------------------------------------------------------- public

    def push(self, ids, last: bool = False) -> np.ndarray:
        """Add LLM ids; returns the speech (float32, 24 kHz) completed by them (maybe 0 samples)."""
        if self.done:
            raise Token2WavError("this stream is finished; start a new one")
        ids = np.atleast_1d(np.asarray(ids, np.int64)) if np.size(ids) else np.zeros((0,), np.int64)
        values = [int(v) for v in audio_values(ids)]
        out = []
        if last and len(values) > 1:
            # as if all but the final id came in earlier calls, so that the chunks do not depend on
            # how the ids were split into calls
            out.append(self.push(ids[:-1]))
            values = values[-1:]
        self.buffer.extend(values)
        if not self.started and (len(self.buffer) >= LOOKAHEAD_IDS or (last and self.buffer)):
            self._setup()
        while self.started and not last:
            chunk = mixed_len(self.chunk_sizes[0])
            if len(self.buffer) < chunk + LOOKAHEAD_IDS:
                break
            out.append(self._chunk(self.buffer[:chunk + LOOKAHEAD_IDS], last=False))
            del self.buffer[:chunk]
            if len(self.chunk_sizes) > 1:
                self.chunk_sizes.pop(0)
        if last:
            if self.started:
                out.append(self._chunk(self.buffer, last=True))
            self.buffer = []
            self.done = True
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def finish(self) -> np.ndarray:
        return self.push([], last=True)

    # -------------------------------------------------------------------- internals

    def _pairs(self, values) -> np.ndarray:
        return reshape_values(np.asarray(values, np.int64)).astype(np.int32)

    def _embed(self, pairs):
        return DualCodebookEmbedding(self.flow_cfg.embedding).apply(
            {"params": self.decoder.flow_params["input_embedding"]}, jnp.asarray(pairs)[None])

    def _noise(self, offset: int, frames: int, valid: int):
        """The ODE noise of frames [offset, offset + frames); only the first `valid` need to exist."""
        if self.noise is not None:
            if self.noise.shape[1] < offset + valid:
                raise Token2WavError(f"noise has {self.noise.shape[1]} frames; this chunk needs {offset + valid}")
            z = self.noise[:1, offset:offset + frames]
            return jnp.pad(z, ((0, 0), (0, frames - z.shape[1]), (0, 0)))
        return _noise_frames(self.key, 1, frames, self.flow_cfg.output_size, offset)

    def _spks(self):
        norm = np.sqrt(np.sum(np.square(self.embedding), axis=1, keepdims=True))
        p = self.decoder.flow_params["spk_embed_affine_layer"]
        return _dense(p, jnp.asarray(self.embedding / np.maximum(norm, 1e-12)))

    def _encode(self, pairs, padded: int, last: bool):
        """The encoder on `pairs` zero-padded to `padded` pairs; returns (mu (1, stride x padded, 80),
        the number of its first frames that are real)."""
        look, stride = self.flow_cfg.encoder.pre_lookahead_len, self.flow_cfg.encoder.up_stride
        n_in = len(pairs)
        n_out = n_in if last else n_in - look
        pairs = np.pad(pairs, ((0, padded - n_in), (0, 0)))
        enc = _grow_encoder_caches(self.encoder_caches, self.encoder_frames + padded, stride)
        mu, *self.encoder_caches = encoder_chunk(self.decoder.flow_params, self._embed(pairs), *enc,
                                                 self.encoder_frames, n_in, n_out, self.flow_cfg)
        self.encoder_frames += n_out
        return mu, stride * n_out

    def _setup(self):
        """`flow.setup_cache` on [prompt pairs, look-ahead pairs]: fills the caches, emits nothing.

        The prompt is padded to a multiple of PROMPT_BUCKET pairs, so prompts of similar lengths share
        the compiled encoder and DiT."""
        cfg, enc = self.flow_cfg, self.flow_cfg.encoder
        pairs = np.concatenate([self.prompt_pairs, self._pairs(self.buffer[:LOOKAHEAD_IDS])], axis=0)
        padded = -(-len(pairs) // PROMPT_BUCKET) * PROMPT_BUCKET
        d, h = enc.output_size, enc.attention_heads
        # room for the prompt and HEADROOM_CHUNKS of the largest chunks (~15 s at the released sizes)
        # before the buffers first grow: the encoder's cost is small beside the DiT's, its compiles not
        cap = cache_capacity(padded + HEADROOM_CHUNKS * (max(self.cfg.chunk_size_list) + enc.pre_lookahead_len))
        empty = lambda n, c: jnp.zeros((n, 1, c, h, d // h), jnp.float32)  # noqa: E731
        self.encoder_caches = [jnp.zeros((1, 2, d)), jnp.zeros((1, 2 * enc.up_stride, d)),
                               empty(enc.num_blocks, cap), empty(enc.num_blocks, cap),
                               empty(enc.num_up_blocks, enc.up_stride * cap),
                               empty(enc.num_up_blocks, enc.up_stride * cap)]
        self.encoder_frames = 0  # valid frames in the encoder caches
        mu, frames = self._encode(pairs, padded, last=False)
        est, n = cfg.estimator, self.cfg.n_timesteps
        t = mu.shape[1]
        conv = jnp.zeros((n, est.depth, 2, 2, est.hidden_size), jnp.float32)
        kv = lambda f: jnp.zeros((n, est.depth, 2, f, est.num_heads, est.head_dim), jnp.float32)  # noqa: E731
        self.recent_k = self.recent_v = kv(self.cfg.estimator_left_context)
        cond = np.zeros((1, t, cfg.output_size), np.float32)
        cond[0, :frames] = self.prompt_cond[:frames]
        _, conv1, conv2, self.prompt_k, self.prompt_v = dit_chunk_ode(
            self.decoder.flow_params, self._noise(0, t, frames), mu, self._spks(), jnp.asarray(cond), frames,
            conv, conv, kv(0), kv(0), 0, self.recent_k, self.recent_v, 0, cfg, n)
        self.dit_conv = [conv1, conv2]
        self.prompt_frames, self.recent_frames = frames, 0
        self.started = True

    def _chunk(self, values, last: bool) -> np.ndarray:
        """`_token2wav_stream`: flow chunk with caches, DiT cache cut, vocoder with overlap.

        Every chunk's pairs are padded to the largest chunk (+ look-ahead), so the encoder compiles
        once per cache capacity; the DiT runs the chunk size's mel frames (a last chunk padded up to
        the smallest size that holds it), so it compiles once per chunk size, whatever the cut state."""
        cfg = self.flow_cfg
        look = cfg.encoder.pre_lookahead_len
        mu, frames = self._encode(self._pairs(values), max(self.cfg.chunk_size_list) + look, last)
        t = min(f for f in self.dit_lengths if f >= frames)
        keep = self.cfg.estimator_left_context
        offset = self.prompt_frames + self.recent_frames  # the reference's DiT cache length
        mu = mu[:, :t]
        mel, *self.dit_conv, k_new, v_new = dit_chunk_ode(
            self.decoder.flow_params, self._noise(offset, t, frames), mu, self._spks(), jnp.zeros_like(mu), frames,
            *self.dit_conv, self.prompt_k, self.prompt_v, self.prompt_frames, self.recent_k, self.recent_v,
            self.recent_frames, cfg, self.cfg.n_timesteps)
        self.recent_k = cut_window(self.recent_k, k_new, frames, self.recent_frames)
        self.recent_v = cut_window(self.recent_v, v_new, frames, self.recent_frames)
        self.recent_frames = min(keep, self.recent_frames + frames)
        mel = np.asarray(mel[0, :frames])
        self.mels.append(mel)
        speech = self._vocode(mel, last)
        self.chunk_index += 1
        return speech

    def _vocode(self, mel, last: bool) -> np.ndarray:
        """The vocoder on [the last `mel_cache_len` frames, this chunk]; the overlap is cross-faded.

        A vocoder with a context (BigVGAN) gets it reflect-padded before the first chunk and after the
        last, so its overlap shrinks by 2 x context frames; an NSF vocoder (HiFT) gets the previous
        chunk's excitation over the overlap (the reference's cache_source, against glitches)."""
        vocoder, voc = self.decoder.vocoder, self.decoder.vocoder_config
        overlap = (self.cfg.mel_cache_len - 2 * vocoder.context) * voc.hop
        mel_bct = np.concatenate([self.voc_mel, mel], axis=0).T[None]
        mel_bct = vocoder.pad(mel_bct, start=self.voc_first and mel_bct.shape[2] > 0, end=last)
        self.voc_first = self.voc_first and mel_bct.shape[2] == 0
        if vocoder.nsf is not None:
            draws = vocoder.nsf.draw(jax.random.fold_in(self.vocoder_key, self.chunk_index), 1, mel_bct.shape[2], voc)
            source = np.array(vocoder.nsf.source(self.decoder.vocoder_params, jnp.asarray(mel_bct), draws, voc)[0])
            source[:len(self.voc_source)] = self.voc_source
            speech = np.asarray(vocoder.nsf.decode(self.decoder.vocoder_params, mel_bct, source[None], voc)[0])
            self.voc_source = source[-overlap:]
        else:
            speech = np.asarray(vocoder.inference(self.decoder.vocoder_params, mel_bct, voc, None)[0])
        mel_in = mel_bct[0].T
        speech = speech.astype(np.float32)
        if len(self.voc_speech):
            window = np.hamming(2 * overlap).astype(np.float32)
            speech = speech.copy()
            speech[:overlap] = speech[:overlap] * window[:overlap] + self.voc_speech[-overlap:] * window[overlap:]
        self.voc_mel = mel_in[-self.cfg.mel_cache_len:]
        self.voc_speech = speech[-overlap:]
        return speech if last else speech[:-overlap]
