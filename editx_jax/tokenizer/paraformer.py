"""The vq02 encoder: FunASR's SANM encoder (Paraformer-large online) in its streaming chunk mode.

architecture.md §2.1.2-2.1.3, §7.5, §7.7. The official tokenizer pushes a whole utterance through the
streaming path, one call per 3840-sample piece of audio (about 4 LFR frames). Each call:

1. scales the features by sqrt(output_size) and adds 1-based *global* sinusoidal positions;
2. prefixes the window with the last `chunk_size[0] + chunk_size[2]` embedded frames of the previous
   window (zeros before the first call, and those zeros are attended to);
3. runs the layers; each attends over [cached k/v ; this window's k/v] with no causal mask and then
   appends this window's k/v minus its last `chunk_size[2]` frames to the cache, which keeps the last
   `look_back * chunk_size[1]` frames (the first call keeps all it appends);
4. keeps the outputs of the new frames.

The per-call step `encode_chunk` is a jitted pure function of (params, state, feats, lens); the
cache is the explicit `EncoderState` pytree. Rows of a batch may bring different numbers of new
frames per call (`lens`, right padding), so several clips can stream together and one compiled step
serves calls of any length up to the padded width: padded frames are masked out of the attention,
zeroed before the FSMN convolution, and never enter the caches.

`encode_stream` drives whole clips. Its default "parallel" method runs every call of every clip in
one pass, layer by layer: a layer's cache for call i holds only k/v of earlier calls' windows at the
same layer, which depend on the previous layer's outputs alone, so each call's window and cache
slots can be laid out in advance (`window_plan`) and gathered. Same numbers, far fewer weight reads
(one ~9-frame call per 3840 samples leaves the step memory-bound). The "sequential" method loops
over `encode_chunk` for bounded memory on audio of any length.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.config.audio import ParaformerEncoderConfig
from editx_jax.layers.precision import PRECISIONS


class EncoderState(NamedTuple):
    """The streaming caches of a batch of clips (a pytree).

    start_idx [B]: LFR frames encoded so far (the next position is start_idx + 1).
    overlap [B, P, input_size]: the last P embedded frames of the previous window.
    k, v [num_blocks, B, heads, L, head_dim]: cached raw key/value projections, right aligned.
    cache_len [B]: how many of the L cache slots are valid (the rightmost ones).
    """

    start_idx: jax.Array
    overlap: jax.Array
    k: jax.Array
    v: jax.Array
    cache_len: jax.Array


def init_state(cfg: ParaformerEncoderConfig, batch: int = 1, first_chunk_frames: int = 0) -> EncoderState:
    """Empty caches. The first call keeps all `chunk_size[0] + n` k/v frames it appends (the official
    code truncates only from the second call on), so the buffer holds at least that many."""
    slots = max(cfg.cache_frames, cfg.chunk_size[0] + first_chunk_frames)
    kv_shape = (cfg.num_blocks, batch, cfg.attention_heads, slots, cfg.head_dim)
    return EncoderState(
        start_idx=jnp.zeros((batch,), jnp.int32),
        overlap=jnp.zeros((batch, cfg.overlap_frames, cfg.input_size), jnp.float32),
        k=jnp.zeros(kv_shape, jnp.float32), v=jnp.zeros(kv_shape, jnp.float32), cache_len=jnp.zeros((batch,), jnp.int32))


def sinusoid_inv_timescales(depth: int) -> np.ndarray:
    """exp(-k ln(10000) / (depth/2 - 1)), k = 0..depth/2-1, rounded once to float32."""
    k = np.arange(depth // 2, dtype=np.float64)
    return np.exp(-k * np.log(10000.0) / (depth / 2 - 1)).astype(np.float32)


def stream_positions(positions: jax.Array, depth: int) -> jax.Array:
    """StreamSinusoidalPositionEncoder: [sin | cos] (concatenated, not interleaved) of float32 positions."""
    scaled = positions.astype(jnp.float32)[..., None] * jnp.asarray(sinusoid_inv_timescales(depth))
    return jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=-1)


class CallMasks(NamedTuple):
    """Per-call bookkeeping shared by every layer."""

    cache_valid: jax.Array  # [B, L] which cache slots hold frames
    window_valid: jax.Array  # [B, W] which window frames are real (overlap + new frames)
    append: jax.Array | None  # [B] frames each row appends to its k/v cache this call (streaming step)
    # Whole-clip mode: [R, L] where cache slot j of window r comes from, as a flat index r' * W + t
    # into this layer's own window frames (-1: empty slot); the k/v caches are then not inputs.
    cache_index: jax.Array | None = None


class DepthwiseConv1d(nn.Module):
    """Per-channel 1-D convolution (torch Conv1d with groups = channels, no bias) on [B, T, C], zero
    padded by `padding` = (left, right). Kernel [k, 1, C], the layout of the grouped `nn.Conv` it replaces.

    Written as k shifted multiply-adds: XLA:CPU runs a grouped `conv_general_dilated` ~100x slower
    than this (57 ms against 0.3 ms per layer on the windows of 10 s of audio, over half of vq02's time).
    """

    kernel_size: int
    padding: tuple[int, int]

    @nn.compact
    def __call__(self, x):
        c, t = x.shape[-1], x.shape[1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, 1, c), jnp.float32)
        xp = jnp.pad(x, ((0, 0), tuple(self.padding), (0, 0)))
        out = xp[:, 0:t] * kernel[0, 0]
        for j in range(1, self.kernel_size):
            out = out + xp[:, j:j + t] * kernel[j, 0]
        return out


class SANMAttention(nn.Module):
    """MultiHeadedAttentionSANM.forward_chunk: cached multi-head attention plus the FSMN memory on v."""

    cfg: ParaformerEncoderConfig

    @nn.compact
    def __call__(self, x, k_cache, v_cache, masks: CallMasks):
        cfg = self.cfg
        precision = PRECISIONS[cfg.matmul_precision]
        b, w, _ = x.shape
        heads, d_k = cfg.attention_heads, cfg.head_dim
        qkv = nn.Dense(3 * cfg.output_size, precision=precision, name="linear_q_k_v")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        to_heads = lambda t: t.reshape(b, w, heads, d_k).transpose(0, 2, 1, 3)  # noqa: E731
        q_h, k_h, v_h = to_heads(q), to_heads(k), to_heads(v)

        # FSMN memory over this window only, zero padded (padded frames zeroed too), no bias.
        v_real = jnp.where(masks.window_valid[..., None], v, 0.0)
        fsmn = DepthwiseConv1d(cfg.kernel_size, cfg.fsmn_padding, name="fsmn_block")(v_real)
        memory = v_real + fsmn

        if masks.cache_index is not None:  # whole clip at once: earlier windows' k/v of this layer
            index = jnp.maximum(masks.cache_index, 0)
            gather = lambda t: t.transpose(0, 2, 1, 3).reshape(b * w, heads, d_k)[index].transpose(0, 2, 1, 3)  # noqa: E731
            k_cache, v_cache = gather(k_h), gather(v_h)

        # Attention over [cache ; window], no causal mask: a chunk sees its own future frames.
        keys = jnp.concatenate([k_cache, k_h], axis=2)
        values = jnp.concatenate([v_cache, v_h], axis=2)
        key_valid = jnp.concatenate([masks.cache_valid, masks.window_valid], axis=1)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q_h * d_k ** -0.5, keys, precision=precision)
        scores = jnp.where(key_valid[:, None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        att = jnp.einsum("bhqk,bhkd->bhqd", probs, values, precision=precision)
        att = att.transpose(0, 2, 1, 3).reshape(b, w, cfg.output_size)
        out = nn.Dense(cfg.output_size, precision=precision, name="linear_out")(att) + memory

        if masks.cache_index is not None:
            return out, None, None
        # New cache: the valid old frames, then the first `append` window frames (the window minus
        # its last chunk_size[2] frames), right aligned in the same number of slots.
        slots = k_cache.shape[2]
        index = (jnp.arange(slots)[None, :] + masks.append[:, None])[:, None, :, None]
        new_k = jnp.take_along_axis(keys, index, axis=2)
        new_v = jnp.take_along_axis(values, index, axis=2)
        return out, new_k, new_v


class FeedForward(nn.Module):
    cfg: ParaformerEncoderConfig

    @nn.compact
    def __call__(self, x):
        precision = PRECISIONS[self.cfg.matmul_precision]
        h = nn.relu(nn.Dense(self.cfg.linear_units, precision=precision, name="w_1")(x))
        return nn.Dense(self.cfg.output_size, precision=precision, name="w_2")(h)


def _layer_norm(cfg, name):
    # Two-pass variance like torch; 1e-12 everywhere in this model.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


class SANMEncoderLayer(nn.Module):
    """EncoderLayerSANM.forward_chunk. The attention residual exists only when in_size == output_size
    (so the 560 -> 512 `encoders0` layer has none)."""

    cfg: ParaformerEncoderConfig
    in_size: int

    @nn.compact
    def __call__(self, x, k_cache, v_cache, masks: CallMasks):
        cfg = self.cfg
        residual = x
        h = _layer_norm(cfg, "norm1")(x) if cfg.normalize_before else x
        att, new_k, new_v = SANMAttention(cfg, name="self_attn")(h, k_cache, v_cache, masks)
        x = residual + att if self.in_size == cfg.output_size else att
        if not cfg.normalize_before:
            x = _layer_norm(cfg, "norm1")(x)
        residual = x
        h = _layer_norm(cfg, "norm2")(x) if cfg.normalize_before else x
        x = residual + FeedForward(cfg, name="feed_forward")(h)
        if not cfg.normalize_before:
            x = _layer_norm(cfg, "norm2")(x)
        return x, (new_k, new_v)


class ParaformerEncoder(nn.Module):
    """SANMEncoderChunkOpt. Params: `encoders0/...`, `encoders/...` (the num_blocks-1 same-size layers,
    stacked on a leading axis for nn.scan) and `after_norm`.

    `__call__` is one streaming call (the official forward_chunk); `encode_windows` runs every call of
    whole clips at once, which gives the same numbers because a layer's cache for call i depends only
    on the previous layer's outputs in calls before i.
    """

    cfg: ParaformerEncoderConfig

    def setup(self):
        cfg = self.cfg
        self.encoders0 = SANMEncoderLayer(cfg, cfg.input_size)
        if cfg.num_blocks > 1:
            self.encoders = nn.scan(SANMEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                                    in_axes=(0, 0, nn.broadcast), length=cfg.num_blocks - 1)(cfg, cfg.output_size)
        if cfg.normalize_before:
            self.after_norm = _layer_norm(cfg, None)

    def _layers(self, h, k, v, masks: CallMasks):
        """All layers over windows h [R, W, input_size]; k, v the stacked caches (or None)."""
        h, (k0, v0) = self.encoders0(h, None if k is None else k[0], None if v is None else v[0], masks)
        new_k, new_v = [k0], [v0]
        if self.cfg.num_blocks > 1:
            h, (ks, vs) = self.encoders(h, None if k is None else k[1:], None if v is None else v[1:], masks)
            new_k.append(ks)
            new_v.append(vs)
        if self.cfg.normalize_before:
            h = self.after_norm(h)
        if k is None:
            return h, None, None
        return h, jnp.concatenate([new_k[0][None], *new_k[1:]]), jnp.concatenate([new_v[0][None], *new_v[1:]])

    def embed(self, feats, positions):
        """feats * sqrt(output_size) + the sinusoid of the 1-based global positions."""
        return feats.astype(jnp.float32) * self.cfg.input_scale + stream_positions(positions, self.cfg.input_size)

    def __call__(self, feats, lens, state: EncoderState):
        """One streaming call: feats [B, n, input_size] new LFR frames (row b's first lens[b] are
        real) -> (outputs [B, n, output_size] for those frames, new state)."""
        cfg = self.cfg
        p = cfg.overlap_frames
        b, n, _ = feats.shape
        lens = lens.astype(jnp.int32)

        x = self.embed(feats, state.start_idx[:, None] + 1 + jnp.arange(n)[None, :])
        window = jnp.concatenate([state.overlap, x], axis=1)  # [B, p + n, input_size]
        new_overlap = jnp.take_along_axis(window, (lens[:, None] + jnp.arange(p)[None, :])[..., None], axis=1)

        slots = state.k.shape[3]
        append = jnp.where(lens > 0, cfg.chunk_size[0] + lens, 0)
        first = state.start_idx == 0
        new_len = jnp.where(first, append, jnp.minimum(state.cache_len + append, cfg.cache_frames))
        new_len = jnp.minimum(jnp.where(lens > 0, new_len, state.cache_len), slots)
        masks = CallMasks(
            cache_valid=jnp.arange(slots)[None, :] >= slots - state.cache_len[:, None],
            window_valid=jnp.arange(p + n)[None, :] < p + lens[:, None],
            append=append)

        h, new_k, new_v = self._layers(window, state.k, state.v, masks)
        new_state = EncoderState(start_idx=state.start_idx + lens, overlap=new_overlap,
                                 k=new_k, v=new_v, cache_len=new_len)
        return h[:, p:], new_state

    def encode_windows(self, feats, positions, window_valid, cache_index):
        """Every call's window at once. feats [R, W, input_size] raw features laid out as the windows
        (overlap frames included), positions [R, W] (0 marks the zero frames before a clip),
        window_valid [R, W], cache_index [R, L] (see CallMasks) -> outputs [R, W, output_size]."""
        x = jnp.where((positions > 0)[..., None], self.embed(feats, positions), 0.0)
        masks = CallMasks(cache_valid=cache_index >= 0, window_valid=window_valid, append=None,
                          cache_index=cache_index)
        return self._layers(x, None, None, masks)[0]


def init_params(cfg: ParaformerEncoderConfig, rng=None, chunk_frames: int = 4) -> dict:
    rng = jax.random.PRNGKey(0) if rng is None else rng
    feats = jnp.zeros((1, chunk_frames, cfg.input_size), jnp.float32)
    init = jax.jit(ParaformerEncoder(cfg).init)  # eager init of the scanned layers is slow
    return init(rng, feats, jnp.full((1,), chunk_frames, jnp.int32), init_state(cfg))["params"]


def random_params(cfg: ParaformerEncoderConfig, seed: int = 0) -> dict:
    """Random weights of the right shapes without tracing the model (fast at any size): kernels
    N(0, 1/fan_in), biases 0.1 N, LayerNorm scales 1 + 0.1 N. For tests and benchmarks."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        shape, name = spec.shape, path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(shape[-3:-1])) if "fsmn_block" in str(path) else shape[-2]
            return rng.standard_normal(shape, np.float32) * np.float32(fan_in ** -0.5)
        base = 1.0 if name == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def abstract_params(cfg: ParaformerEncoderConfig) -> dict:
    """Shapes and dtypes of the params tree, without allocating it."""
    return jax.eval_shape(lambda: init_params(cfg))


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="state")
def encode_chunk(params, state: EncoderState, feats, lens, *, cfg: ParaformerEncoderConfig):
    """One streaming call: (params, state, feats [B, n, input_size], lens [B]) -> (out, new state)."""
    return ParaformerEncoder(cfg).apply({"params": params}, feats, lens, state)


class StreamError(ValueError):
    """Features and chunk lengths that do not describe a stream."""


def _check_stream(cfg, feats, chunk_lens) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float32)
    if feats.ndim != 3 or feats.shape[2] != cfg.input_size:
        raise StreamError(f"feats must be [batch, frames, {cfg.input_size}], got shape {list(feats.shape)}")
    batch = feats.shape[0]
    lens = np.asarray(chunk_lens)
    if lens.size and lens.dtype.kind not in "iu":
        raise StreamError(f"chunk_lens must be integers, got {lens.dtype}")
    lens = lens.astype(np.int64)
    if lens.ndim == 1:
        lens = np.broadcast_to(lens, (batch, lens.shape[0]))
    if lens.ndim != 2 or lens.shape[0] != batch:
        raise StreamError(f"chunk_lens must be [n_chunks] or [{batch}, n_chunks], got shape {list(lens.shape)}")
    if lens.size == 0 or (lens < 0).any():
        raise StreamError("chunk_lens must be non-negative and name at least one chunk")
    if (lens.sum(axis=1) > feats.shape[1]).any():
        raise StreamError(f"chunk_lens add up to {int(lens.sum(axis=1).max())} frames but feats has "
                          f"{feats.shape[1]}")
    return feats, lens


def encode_stream(params, cfg: ParaformerEncoderConfig, feats, chunk_lens,
                  method: str = "parallel") -> tuple[np.ndarray, np.ndarray]:
    """The streaming encoder over whole clips, one call per chunk, as the official driver runs it.

    feats [B, T, input_size]: each row's LFR frames back to back (right padded); chunk_lens
    [n_chunks] (shared) or [B, n_chunks]: how many frames each call brings per row (0 allowed).
    method "parallel" runs all calls of all clips together, layer by layer (fast; memory grows with
    the audio length); "sequential" makes one jitted call per chunk with explicit caches (bounded
    memory for audio of any length). Both give the official numbers.
    Returns (enc_out [B, T_out, output_size], out_lens [B]) with T_out the longest clip.
    """
    feats, lens = _check_stream(cfg, feats, chunk_lens)
    if method == "parallel":
        return _encode_parallel(params, cfg, feats, lens)
    if method == "sequential":
        return _encode_sequential(params, cfg, feats, lens)
    raise StreamError(f"method must be 'parallel' or 'sequential', got {method!r}")


def _to_device(params):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)  # once, not once per call


def _encode_sequential(params, cfg, feats, lens):
    batch = feats.shape[0]
    totals = lens.sum(axis=1)
    width = int(lens.max())
    if width == 0:
        return np.zeros((batch, 0, cfg.output_size), np.float32), totals.astype(np.int32)
    params = _to_device(params)
    offsets = np.concatenate([np.zeros((batch, 1), np.int64), np.cumsum(lens, axis=1)], axis=1)
    first = np.array([row[row > 0][0] if (row > 0).any() else 0 for row in lens])
    state = init_state(cfg, batch, int(first.max()))
    out = np.zeros((batch, int(totals.max()), cfg.output_size), np.float32)
    frames = np.arange(width)
    for i in range(lens.shape[1]):
        n = lens[:, i]
        if not n.any():
            continue
        index = np.minimum(offsets[:, i, None] + frames[None, :], feats.shape[1] - 1)
        chunk = np.take_along_axis(feats, index[..., None], axis=1)
        chunk = np.where((frames[None, :] < n[:, None])[..., None], chunk, 0.0)
        y, state = encode_chunk(params, state, jnp.asarray(chunk), jnp.asarray(n, jnp.int32), cfg=cfg)
        y = np.asarray(y)
        for row in np.flatnonzero(n):
            out[row, offsets[row, i]:offsets[row, i + 1]] = y[row, :n[row]]
    return out, totals.astype(np.int32)


class WindowPlan(NamedTuple):
    """Where every streaming call's window and k/v cache come from (host-side integers)."""

    source: np.ndarray  # [R, W] flat index b * T + t of the feature frame in each window slot, -1: none
    positions: np.ndarray  # [R, W] 1-based global position of that frame, 0 for zero / padding
    window_valid: np.ndarray  # [R, W] bool: the overlap prefix and the call's new frames
    cache_index: np.ndarray  # [R, L] flat r * W + t window frame cached in each slot, -1: empty
    rows: list  # per window: (clip b, first new frame, number of new frames)


def window_plan(cfg: ParaformerEncoderConfig, lens: np.ndarray, frames: int, min_rows: int = 0) -> WindowPlan:
    """Lay out every call of every clip (`lens` [B, n_chunks], `frames` = T) as one window per row.

    A call's window is the `overlap_frames` frames before its new ones (zeros before the clip) plus
    the new ones. Its k/v cache replays the official update: append the first chunk_size[0] + n
    window frames; keep the last look_back * chunk_size[1] from the second call on.
    """
    c0, p, keep = cfg.chunk_size[0], cfg.overlap_frames, cfg.cache_frames
    width = p + int(lens.max())
    rows, caches = [], []
    for b, row in enumerate(lens):
        start, cache = 0, None
        for n in map(int, row):
            if n == 0:
                continue
            r = len(rows)
            rows.append((b, start, n))
            caches.append(cache or [])
            new = [r * width + t for t in range(c0 + n)]
            cache = new if cache is None else (cache + new)[-keep:]
            start += n
    n_rows = max(len(rows), min_rows)
    slots = max([keep] + [len(c) for c in caches])
    source = np.full((n_rows, width), -1, np.int64)
    positions = np.zeros((n_rows, width), np.int32)
    window_valid = np.zeros((n_rows, width), bool)
    window_valid[:, :p] = True  # padding rows see their zero prefix, so no softmax is empty
    cache_index = np.full((n_rows, slots), -1, np.int32)
    for r, ((b, start, n), cache) in enumerate(zip(rows, caches)):
        t = np.arange(start - p, start + n)  # clip frame of each window slot (< 0: before the clip)
        source[r, :p + n] = np.where(t >= 0, b * frames + t, -1)
        positions[r, :p + n] = np.where(t >= 0, t + 1, 0)
        window_valid[r, :p + n] = True
        if cache:
            cache_index[r, slots - len(cache):] = cache
    return WindowPlan(source, positions, window_valid, cache_index, rows)


def _bucket(n: int) -> int:
    """Row counts are rounded up (powers of two, then multiples of 64) so lengths share compilations."""
    return max(8, 1 << (n - 1).bit_length()) if n <= 64 else -(-n // 64) * 64


@functools.partial(jax.jit, static_argnames="cfg")
def encode_windows(params, feats, positions, window_valid, cache_index, *, cfg: ParaformerEncoderConfig):
    """Jitted `ParaformerEncoder.encode_windows`."""
    return ParaformerEncoder(cfg).apply({"params": params}, feats, positions, window_valid, cache_index,
                                        method=ParaformerEncoder.encode_windows)


def _encode_parallel(params, cfg, feats, lens):
    batch, frames, _ = feats.shape
    totals = lens.sum(axis=1)
    out = np.zeros((batch, int(totals.max()), cfg.output_size), np.float32)
    if not totals.any():
        return out, totals.astype(np.int32)
    n_windows = int((lens > 0).sum())
    plan = window_plan(cfg, lens, frames, min_rows=_bucket(n_windows))
    flat = feats.reshape(batch * frames, cfg.input_size)
    windows = np.where((plan.source >= 0)[..., None], flat[np.maximum(plan.source, 0)], 0.0)
    y = np.asarray(encode_windows(_to_device(params), jnp.asarray(windows, jnp.float32), plan.positions,
                                  plan.window_valid, plan.cache_index, cfg=cfg))
    p = cfg.overlap_frames
    for r, (b, start, n) in enumerate(plan.rows):
        out[b, start:start + n] = y[r, p:p + n]
    return out, totals.astype(np.int32)
