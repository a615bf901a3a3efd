"""The flow model's token encoder: `UpsampleConformerEncoderV2` (architecture.md §3.4.1, §5 items 8-10).

    pairs embedded [B, T, 512]
      -> embed: Linear + LayerNorm(1e-5), x * sqrt(d), relative position table for T
      -> pre-lookahead: right-pad 3, conv k4, leaky_relu(0.01), left-pad 2, conv k3, + residual
      -> 6 conformer layers at the token rate (25 Hz)
      -> upsample: nearest x2, left-pad 4, conv k5 (causal)
      -> up_embed: Linear + LayerNorm(1e-5), x * sqrt(d), a fresh position table for 2T
      -> 4 conformer layers at the mel rate (50 Hz), after_norm LayerNorm(1e-5)
    = h [B, 2T, 512] and the valid-frame mask [B, 1, 2T]

A conformer layer here is pre-norm attention + pre-norm SiLU feed-forward (LayerNorm eps 1e-12; no
macaron, no conv module). The attention is ESPnet's relative-position multi-head attention:

    scores = ((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(d_k)

with p = linear_pos(table) over 2T-1 relative distances, row r meaning distance (T-1) - r, and
rel_shift picking bd[i, j] = bd_raw[i, (T-1) - i + j], i.e. the row of distance i - j.

Ragged batches. Attention masks keys past each item's length. The reference does not zero padded
frames, so its pre-lookahead conv reads up to 3 padded frames past each item's end and a short item's
output depends on what its padding holds. `isolate_padding=True` (the default) zeroes padded frames
before that conv, which makes every item's valid outputs equal its run alone (the conv sees the same
zeros as the alone run's end padding; the upsample conv is causal and never looks ahead).
`isolate_padding=False` reproduces the reference bit for bit, padding included (the parity fixture
compares padded frames too). Batch-1 input is the same either way.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config.decoder import UpsampleEncoderConfig


class EncoderInputError(ValueError):
    """The encoder was given inputs of the wrong shape or lengths."""


# ---------------------------------------------------------------------------------------- maths


def rel_position_table(length: int, dim: int) -> np.ndarray:
    """ESPnet's relative position table [2*length - 1, dim], float32 like the reference buffer.

    Row r encodes the relative distance (length - 1) - r: row 0 is +(length-1), the centre row is 0,
    the last row is -(length-1). Channels 2i / 2i+1 hold sin / cos of distance * w_i with
    w_i = exp(-2i ln(10000) / dim). Built directly for any length (the reference's 5000-row table,
    sliced at its centre, holds the same values).
    """
    w = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    # distance * w_i rounded to float32 as the reference does, then sin/cos
    angle = (np.arange(length, dtype=np.float32)[:, None] * w[None, :]).astype(np.float32)
    pos = np.zeros((length, dim), np.float32)
    pos[:, 0::2] = np.sin(angle.astype(np.float64))
    pos[:, 1::2] = np.cos(angle.astype(np.float64))
    neg = pos.copy()
    neg[:, 0::2] = -neg[:, 0::2]  # sin(-x) = -sin(x), cos(-x) = cos(x)
    return np.concatenate([pos[::-1], neg[1:]], axis=0)


def rel_shift(bd_raw, rows=None):
    """[..., R, 2T-1] scores over relative-table rows -> [..., R, T] with out[i, j] = in[i, (T-1) - q + j]
    for the query q = rows[i] (default: rows 0 .. R-1 of R = T queries). Rows past T-1 (padding)
    read clipped columns."""
    t = (bd_raw.shape[-1] + 1) // 2
    rows = np.arange(bd_raw.shape[-2]) if rows is None else rows
    index = jnp.clip((t - 1) - rows[:, None] + jnp.arange(t)[None, :], 0, 2 * t - 2).astype(jnp.int32)
    index = jnp.broadcast_to(index, (*bd_raw.shape[:-1], t))
    return jnp.take_along_axis(bd_raw, index, axis=-1)


def valid_mask(lengths, t: int):
    """[B, t] bool: frame < length."""
    return jnp.arange(t)[None, :] < lengths[:, None]


# ---------------------------------------------------------------------------------------- layers


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # two-pass variance like torch
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


QUERY_BLOCK = 512  # attention runs queries in blocks of at most this many frames (see RelPositionAttention)


class RelPositionAttention(nn.Module):
    """ESPnet relative-position multi-head self-attention with learned biases u (content) and v (position)."""

    config: UpsampleEncoderConfig

    @nn.compact
    def __call__(self, x, pos_table, key_valid):
        cfg = self.config
        b, t, _ = x.shape
        h, dk = cfg.attention_heads, cfg.head_dim
        dense = functools.partial(nn.Dense, cfg.output_size, precision=cfg.precision)
        heads = lambda y: y.reshape(*y.shape[:-1], h, dk)  # noqa: E731
        q = heads(dense(name="linear_q")(x))
        k = heads(dense(use_bias=cfg.key_bias, name="linear_k")(x))
        v = heads(dense(name="linear_v")(x))
        p = heads(dense(use_bias=False, name="linear_pos")(pos_table))  # [2T-1, H, dk]
        init = nn.initializers.normal(0.02)
        pos_bias_u = self.param("pos_bias_u", init, (h, dk), jnp.float32)
        pos_bias_v = self.param("pos_bias_v", init, (h, dk), jnp.float32)
        keep = key_valid[:, None, None, :]

        def attend(q, rows):
            ac = jnp.einsum("bthd,bshd->bhts", q + pos_bias_u, k, precision=cfg.precision)
            bd = jnp.einsum("bthd,rhd->bhtr", q + pos_bias_v, p, precision=cfg.precision)
            scores = (ac + rel_shift(bd, rows)) / math.sqrt(dk)
            # Padded keys get exactly zero weight; a finite floor (not -inf) keeps a row with no valid
            # key finite, and zeroing after the softmax then gives it a zero output, as the reference does.
            scores = jnp.where(keep, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
            probs = jnp.where(keep, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
            return jnp.einsum("bhts,bshd->bthd", probs, v, precision=cfg.precision)

        n = -(-t // QUERY_BLOCK)
        if n == 1:
            out = attend(q, None)
        else:
            # the queries in n equal blocks, one after another (a loop): [B, H, block, 2T-1] float32
            # position scores at a time, not [B, H, T, 2T-1] (the up-encoder's 1.9 GiB of temporaries
            # for a 30 s edit's 3000 frames); each row is computed as without blocks
            size = -(-t // n)
            qb = jnp.pad(q, ((0, 0), (0, n * size - t), (0, 0), (0, 0))).reshape(b, n, size, h, dk)
            rows = jnp.arange(n * size).reshape(n, size)
            out = jax.lax.map(lambda a: attend(*a), (jnp.moveaxis(qb, 1, 0), rows))
            out = jnp.moveaxis(out, 0, 1).reshape(b, n * size, h, dk)[:, :t]
        return dense(name="linear_out")(out.reshape(b, t, cfg.output_size))


class ConformerLayer(nn.Module):
    """x + MHSA(LN(x)); x + w_2(SiLU(w_1(LN(x)))). Returns (x, None) for nn.scan."""

    config: UpsampleEncoderConfig

    @nn.compact
    def __call__(self, x, pos_table, key_valid):
        cfg = self.config
        x = x + RelPositionAttention(cfg, name="self_attn")(
            _layer_norm(cfg.layer_eps, "norm_mha")(x), pos_table, key_valid)
        x = x + FeedForward(cfg, name="feed_forward")(_layer_norm(cfg.layer_eps, "norm_ff")(x))
        return x, None


class FeedForward(nn.Module):
    """w_2(SiLU(w_1(x)))."""

    config: UpsampleEncoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        y = nn.Dense(cfg.linear_units, precision=cfg.precision, name="w_1")(x)
        return nn.Dense(cfg.output_size, precision=cfg.precision, name="w_2")(nn.silu(y))


class LinearEmbed(nn.Module):
    """LinearNoSubsampling + EspnetRelPositionalEncoding: (LN(Linear(x)) * sqrt(d), table for T)."""

    config: UpsampleEncoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = nn.Dense(cfg.output_size, precision=cfg.precision, name="linear")(x)
        x = _layer_norm(cfg.embed_eps, "norm")(x)
        x = x * math.sqrt(cfg.output_size)
        return x, jnp.asarray(rel_position_table(x.shape[1], cfg.output_size))


class PreLookahead(nn.Module):
    """x + conv2(left-pad 2)(leaky_relu(conv1(right-pad L)(x), 0.01)); each frame sees L frames ahead."""

    config: UpsampleEncoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        conv = functools.partial(nn.Conv, cfg.output_size, padding="VALID", precision=cfg.precision)
        y = jnp.pad(x, ((0, 0), (0, cfg.pre_lookahead_len), (0, 0)))
        y = nn.leaky_relu(conv(kernel_size=(cfg.pre_lookahead_len + 1,), name="conv1")(y), 0.01)
        y = jnp.pad(y, ((0, 0), (2, 0), (0, 0)))
        return x + conv(kernel_size=(3,), name="conv2")(y)


class Upsample(nn.Module):
    """Nearest repeat x stride along time, left-pad 2*stride zeros, conv k = 2*stride + 1 (causal)."""

    config: UpsampleEncoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        s = cfg.up_stride
        y = jnp.repeat(x, cfg.up_scale_factor, axis=1)
        y = jnp.pad(y, ((0, 0), (2 * s, 0), (0, 0)))
        return nn.Conv(cfg.output_size, kernel_size=(2 * s + 1,), padding="VALID", precision=cfg.precision,
                       name="conv")(y)


def _layer_stack(cfg: UpsampleEncoderConfig, length: int, name: str):
    stack = nn.scan(ConformerLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast), length=length)
    return stack(cfg, name=name)


class UpsampleConformerEncoderV2(nn.Module):
    """xs [B, T, input_size], xs_lens [B] -> (h [B, 2T, output_size], mask [B, 1, 2T] bool).

    Frames past a length are computed too (they are padding). Params: `embed/{linear,norm}`,
    `pre_lookahead_layer/{conv1,conv2}`, `encoders/...` (stacked, layer axis first), `up_layer/conv`,
    `up_embed/{linear,norm}`, `up_encoders/...`, `after_norm`.
    """

    config: UpsampleEncoderConfig = UpsampleEncoderConfig()

    @nn.compact
    def __call__(self, xs, xs_lens=None):
        cfg = self.config
        if xs.ndim != 3 or xs.shape[-1] != cfg.input_size or xs.shape[1] == 0:
            raise EncoderInputError(f"xs must be [batch, frames > 0, {cfg.input_size}], got {list(xs.shape)}")
        b, t, _ = xs.shape
        if xs_lens is None:
            xs_lens = jnp.full((b,), t, jnp.int32)
        elif tuple(xs_lens.shape) != (b,):
            raise EncoderInputError(f"xs_lens must be [{b}], got shape {list(xs_lens.shape)}")
        lengths = jnp.asarray(xs_lens).astype(jnp.int32)
        valid = valid_mask(lengths, t)

        x, pos_table = LinearEmbed(cfg, name="embed")(xs.astype(jnp.float32))
        if cfg.isolate_padding:
            x = jnp.where(valid[..., None], x, 0.0)
        x = PreLookahead(cfg, name="pre_lookahead_layer")(x)
        x, _ = _layer_stack(cfg, cfg.num_blocks, "encoders")(x, pos_table, valid)

        x = Upsample(cfg, name="up_layer")(x)
        lengths = cfg.output_lengths(lengths)
        valid = valid_mask(lengths, x.shape[1])
        x, pos_table = LinearEmbed(cfg, name="up_embed")(x)
        x, _ = _layer_stack(cfg, cfg.num_up_blocks, "up_encoders")(x, pos_table, valid)
        x = _layer_norm(cfg.embed_eps, "after_norm")(x)
        return x, valid[:, None, :]


# ---------------------------------------------------------------------------------------- functional API


@functools.partial(jax.jit, static_argnums=3)
def _encode(params, xs, xs_lens, config):
    return UpsampleConformerEncoderV2(config).apply({"params": params}, xs, xs_lens)


def encode(params, xs, xs_lens=None, config: UpsampleEncoderConfig = UpsampleEncoderConfig()):
    """Jitted forward: (h [B, 2T, D], mask [B, 1, 2T] bool). One compile per (B, T)."""
    xs = jnp.asarray(xs, jnp.float32)
    if xs_lens is None:
        xs_lens = jnp.full((xs.shape[0],), xs.shape[1], jnp.int32)
    lens = np.asarray(xs_lens)
    if lens.ndim == 1 and xs.ndim == 3 and ((lens < 0) | (lens > xs.shape[1])).any():
        raise EncoderInputError(f"xs_lens {lens.tolist()} must lie in [0, {xs.shape[1]}]")
    return _encode(params, xs, jnp.asarray(lens, jnp.int32), config)


def init_params(config: UpsampleEncoderConfig = UpsampleEncoderConfig(), key=None) -> dict:
    """Random params (for tests and benchmarks)."""
    key = jax.random.PRNGKey(0) if key is None else key
    xs = jnp.zeros((1, 4, config.input_size), jnp.float32)
    return jax.jit(lambda k: UpsampleConformerEncoderV2(config).init(k, xs)["params"])(key)


@functools.lru_cache(maxsize=8)
def abstract_params(config: UpsampleEncoderConfig = UpsampleEncoderConfig()) -> dict:
    """The params tree as ShapeDtypeStructs (no memory), for the converter. Cached: do not mutate."""
    xs = jnp.zeros((1, 4, config.input_size), jnp.float32)
    return jax.eval_shape(lambda: UpsampleConformerEncoderV2(config).init(jax.random.PRNGKey(0), xs)["params"])
