"""The DiT velocity estimator of the flow-matching decoder (architecture.md §3.5, §5 items 8-10, §6 fact 9).

Given the noisy mel `x` at time `t` and the conditions `mu` (encoder output projected to 80),
`spks` (speaker vector, 80) and `cond` (prompt mel, zero after the prompt), it predicts the velocity
dx/dt. Conditions enter by channel concatenation `[x, mu, spks, cond]` (320 channels); adaLN is
driven by time only. All arrays here are channels-last: x/mu/cond (B, T, 80), spks (B, 80),
mask (B, T) with 1/True = valid frame, t (B,) in [0, 1]. Output (B, T, out_channels).

Params tree (block axis first under `blocks`, stacked by `nn.scan`):
    t_embedder/{fc1,fc2}/{kernel,bias}
    in_proj/{kernel,bias}
    blocks/adaln/{kernel,bias}                          9 chunks: (shift, scale, gate) x (msa, mlp, conv)
    blocks/attn/{to_q,to_k,to_v,proj}/{kernel,bias}
    blocks/attn/{q_norm,k_norm}/{scale,bias}
    blocks/conv/{conv1,conv2}/{kernel,bias}  blocks/conv/norm/{scale,bias}
    blocks/mlp/{fc1,fc2}/{kernel,bias}
    final_layer/{adaln,linear}/{kernel,bias}
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from editx_jax.config.decoder import DiTConfig

# Width of the sinusoidal time features fed to the time MLP (a code constant of the reference).
TIME_FREQ_DIM = 256
# The reference scales t in [0, 1] by this before the sinusoid.
TIME_SCALE = 1000.0
CONV_KERNEL = 3
BLOCK_NORM_EPS = 1e-6  # LN1/LN2/LN3 and the final layer's norm, no affine
QK_NORM_EPS = 1e-5
CONV_NORM_EPS = 1e-5
NUM_MODULATIONS = 9  # (shift, scale, gate) for each of attention, mlp, conv


def timestep_features(t: jax.Array, dim: int = TIME_FREQ_DIM) -> jax.Array:
    """(B,) times in [0, 1] -> (B, dim) `[cos, sin]` features of 1000*t (cos first), float32.

    The operation order follows the reference so float32 rounding matches: t is scaled first, then
    multiplied by the frequencies exp(-ln(10000) * i / half).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * TIME_SCALE)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
    return x * (1.0 + scale) + shift


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


def _layer_norm(eps: float, affine: bool, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: the two-pass variance of torch, not E[x^2] - E[x]^2
    return nn.LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, use_fast_variance=False,
                        dtype=jnp.float32, name=name)


class TimestepEmbedder(nn.Module):
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = nn.Dense(self.hidden_size, dtype=self.dtype, name="fc1")(timestep_features(t))
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(nn.silu(h))


QUERY_BLOCK = 512  # attention runs queries in blocks of at most this many frames (see Attention)


class Attention(nn.Module):
    """Multi-head self-attention with per-head q/k LayerNorm and a key-padding mask; not causal."""

    num_heads: int
    head_dim: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask):
        b, t, _ = x.shape
        inner = self.num_heads * self.head_dim

        def heads(name):
            y = nn.Dense(inner, dtype=self.dtype, name=name)(x)
            return y.reshape(b, t, self.num_heads, self.head_dim)

        q = _layer_norm(QK_NORM_EPS, True, "q_norm")(heads("to_q")).astype(self.dtype)
        k = _layer_norm(QK_NORM_EPS, True, "k_norm")(heads("to_k")).astype(self.dtype)
        v = heads("to_v").astype(self.dtype)

        def attend(q):
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (
                1.0 / math.sqrt(self.head_dim))
            scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
            probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
            return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

        n = -(-t // QUERY_BLOCK)
        if n == 1:
            out = attend(q)
        else:
            # the queries in n equal blocks, one after another (a loop): [B, H, block, T] float32
            # scores at a time, not [B, H, T, T] (1.15 GB per block for a 30 s edit's 3000 frames);
            # each query row is computed as without blocks, the zero rows padded in are dropped
            size = -(-t // n)
            qb = jnp.pad(q, ((0, 0), (0, n * size - t), (0, 0), (0, 0))).reshape(b, n, size, *q.shape[2:])
            out = jax.lax.map(attend, jnp.moveaxis(qb, 1, 0))
            out = jnp.moveaxis(out, 0, 1).reshape(b, n * size, *q.shape[2:])[:, :t]
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="proj")(out.reshape(b, t, inner))


class CausalConvBlock(nn.Module):
    """CausalConv1d(k=3) -> LayerNorm -> Mish -> CausalConv1d(k=3). Causal even offline; no mask."""

    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((CONV_KERNEL - 1, 0),)  # left padding only
        x = nn.Conv(self.channels, (CONV_KERNEL,), padding=pad, dtype=self.dtype, name="conv1")(x)
        x = mish(_layer_norm(CONV_NORM_EPS, True, "norm")(x))
        return nn.Conv(self.channels, (CONV_KERNEL,), padding=pad, dtype=self.dtype, name="conv2")(x)


class MLP(nn.Module):
    hidden: int
    out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        # The reference uses GELU(approximate="tanh"); the erf form is only ~1.3x the fixture tolerance
        # away, so the choice is written out rather than left to a default.
        h = jax.nn.gelu(h, approximate=True)
        return nn.Dense(self.out, dtype=self.dtype, name="fc2")(h)


class DiTBlock(nn.Module):
    """x += g_msa*Attn(mod(LN(x))); x += g_conv*Conv(mod(LN(x))); x += g_mlp*MLP(mod(LN(x)))."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, c, key_mask):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        mods = nn.Dense(NUM_MODULATIONS * cfg.hidden_size, dtype=dtype, name="adaln")(nn.silu(c))
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_conv, scale_conv, gate_conv) = jnp.split(mods, NUM_MODULATIONS, axis=-1)

        def norm(h, name):
            return _layer_norm(BLOCK_NORM_EPS, False, name)(h)

        attn = Attention(cfg.num_heads, cfg.head_dim, cfg.hidden_size, dtype, name="attn")
        x = x + gate_msa * attn(modulate(norm(x, "norm1"), shift_msa, scale_msa), key_mask)
        conv = CausalConvBlock(cfg.hidden_size, dtype, name="conv")
        x = x + gate_conv * conv(modulate(norm(x, "norm3"), shift_conv, scale_conv))
        mlp = MLP(cfg.mlp_hidden, cfg.hidden_size, dtype, name="mlp")
        x = x + gate_mlp * mlp(modulate(norm(x, "norm2"), shift_mlp, scale_mlp))
        return x, None


class FinalLayer(nn.Module):
    hidden_size: int
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        mods = nn.Dense(2 * self.hidden_size, dtype=self.dtype, name="adaln")(nn.silu(c))
        shift, scale = jnp.split(mods, 2, axis=-1)
        x = modulate(_layer_norm(BLOCK_NORM_EPS, False, "norm")(x), shift, scale)
        return nn.Dense(self.out_channels, dtype=self.dtype, name="linear")(x)


class DiT(nn.Module):
    """The velocity estimator: (x, mask, mu, t, spks, cond) -> v, all channels-last."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, mask, mu, t, spks, cond):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = nn.Dense(cfg.hidden_size, dtype=dtype, name="in_proj")(_channels_in(x, mu, spks, cond))
        c = TimestepEmbedder(cfg.hidden_size, dtype, name="t_embedder")(t)[:, None, :]  # (B, 1, hidden)
        key_mask = _key_mask(mask)
        blocks = nn.scan(DiTBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.depth)
        h, _ = blocks(cfg, name="blocks")(h, c, key_mask)
        out = FinalLayer(cfg.hidden_size, cfg.out_channels, dtype, name="final_layer")(h, c)
        return out.astype(jnp.float32)


def _channels_in(x, mu, spks, cond):
    b, frames, _ = x.shape
    spks = jnp.broadcast_to(spks[:, None, :], (b, frames, spks.shape[-1]))
    return jnp.concatenate([x, mu, spks, cond], axis=-1)  # order x, mu, spks, cond (320 ch)


def _key_mask(mask):
    return mask.astype(bool) if mask.dtype == jnp.bool_ else mask > 0


def estimator(params: dict, config: DiTConfig):
    """The DiT as a function (x, mask, mu, t, spks, cond) -> v: the `DiT` module's maths, same params tree.

    Why not `DiT.apply`: inside its layer scan every block's weights are sliced out of the stacked
    params again on every call, and XLA:CPU copies such slices before its GEMMs (28 MB per block, 0.45 GB
    per call at the released size). Here the blocks are sliced once, where `estimator` is called, and
    run as an unrolled loop. Call it outside the ODE loop, so that the 10 Euler steps reuse the slices:
    one DiT pass is about 9 % faster (tools/bench_decoder.py).
    """
    dtype = jnp.dtype(config.dtype)
    layers = [jax.tree.map(lambda a, i=i: a[i], params["blocks"]) for i in range(config.depth)]
    in_proj = nn.Dense(config.hidden_size, dtype=dtype)
    t_embedder = TimestepEmbedder(config.hidden_size, dtype)
    block = DiTBlock(config)
    final = FinalLayer(config.hidden_size, config.out_channels, dtype)

    def run(x, mask, mu, t, spks, cond):
        h = in_proj.apply({"params": params["in_proj"]}, _channels_in(x, mu, spks, cond))
        c = t_embedder.apply({"params": params["t_embedder"]}, t)[:, None, :]
        key_mask = _key_mask(mask)
        for layer in layers:
            h, _ = block.apply({"params": layer}, h, c, key_mask)
        return final.apply({"params": params["final_layer"]}, h, c).astype(jnp.float32)

    return run


def abstract_params(config: DiTConfig) -> dict:
    """The params tree's shapes and dtypes (jax.ShapeDtypeStruct leaves), without allocating."""
    mel, frames = config.mel_channels, 4
    x = jnp.zeros((1, frames, mel), jnp.float32)
    shapes = jax.eval_shape(
        lambda: DiT(config).init(jax.random.key(0), x, jnp.ones((1, frames), bool), x,
                                 jnp.zeros((1,), jnp.float32), jnp.zeros((1, mel), jnp.float32), x))
    return shapes["params"]


def apply(params: dict, config: DiTConfig, x, mask, mu, t, spks, cond) -> jax.Array:
    """Run the estimator once with a plain params tree."""
    return estimator(params, config)(x, mask, mu, t, spks, cond)
