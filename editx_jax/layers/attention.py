"""sqrt-ALiBi grouped-query attention maths (architecture.md §1.3-1.4), as plain functions.

Masking is by absolute positions, which makes one function serve training, packed training,
left-padded batches and KV-cached decoding:
  * a key is visible when 0 <= k_pos <= q_pos (and, with packing, it is in the query's segment);
  * padding gets position -1, unwritten cache slots a huge position, so neither is ever visible.
The bias -slope * sqrt(q_pos - k_pos) is computed per call from the positions in float32, never
as a full L x L table.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Position stored in cache slots that hold nothing yet: larger than any query position.
EMPTY_POSITION = 2**30


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Step1's slopes for any head count: (2^(-8/n))^k for k=1..n with n the largest power of two
    <= H, then (2^(-4/n))^k for k = 1, 3, 5, ... for the remaining H - n heads."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [(2.0 ** (-8.0 / n)) ** k for k in range(1, n + 1)]
    slopes += [(2.0 ** (-4.0 / n)) ** k for k in range(1, 2 * (num_heads - n), 2)]
    return np.asarray(slopes, np.float32)


def alibi_attention(q, k, v, q_pos, k_pos, q_segment=None, k_segment=None, dtype=jnp.float32,
                    query_block: int | None = None):
    """Causal sqrt-ALiBi GQA attention.

    q: [B, T, H, D]; k, v: [B * G, S, D] (grouped, not expanded, rows batch-major: `kv_layout`, the
    KV cache's layout); q_pos [B, T], k_pos [B, S] int. Query head h reads kv group h // (H // G).
    Scores, bias and softmax are float32. Returns [B, T, H, D] in `dtype`.

    query_block: when T is a larger multiple of it, the queries go through in blocks of this many,
    one after another (a loop, not unrolled), so the float32 scores held at once are [B, H,
    query_block, S] instead of [B, H, T, S] (805 MB per layer for a 2048-token prompt at the
    released size). Each query row is computed as without blocks.
    """
    b, t = q.shape[:2]
    if query_block and t > query_block and t % query_block == 0:
        def blocks(a):  # [B, T, ...] -> [T / query_block, B, query_block, ...]
            return jnp.moveaxis(a.reshape(b, t // query_block, query_block, *a.shape[2:]), 1, 0)
        segments = None if q_segment is None else blocks(q_segment)

        def one_block(args):
            qb, pos, seg = args
            return _attention(qb, k, v, pos, k_pos, seg, k_segment, dtype)
        out = jax.lax.map(one_block, (blocks(q), blocks(q_pos), segments))
        return jnp.moveaxis(out, 0, 1).reshape(q.shape[:3] + (v.shape[-1],))
    return _attention(q, k, v, q_pos, k_pos, q_segment, k_segment, dtype)


def kv_layout(x):
    """Keys or values [B, S, G, D] as attention reads them (and the KV cache holds them): [B * G, S,
    D], one row per (sequence, group). Each group's products then read their operand as it lies,
    with no reshape between a decode step's cache update and its reads: with [B, S, G, D] XLA:CPU
    copied k and v to a group-major layout in every layer of every step, and with [B, G, S, D] it
    repeated the in-place update (and copied the cache for it) on both sides of the reshape that
    drops a batch of one. LLM mid decode at batch 1: 28.5 -> 27.6 ms per step; batch 4: 91.7 -> 85.1."""
    b, s, g, d = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * g, s, d)


def _attention(q, k, v, q_pos, k_pos, q_segment, k_segment, dtype):
    """`alibi_attention` over all queries at once.

    Laid out for the CPU's batched GEMMs: per kv group one [R*T, D] x [D, S] product (the R query
    heads of a group stacked), the mask folded into the bias (one add), and the softmax normalised
    after the product with v ([T, D] divides instead of [T, S]): about 2x faster on XLA:CPU than
    an einsum over [B, G, R, T, S] with a separate select and softmax.
    """
    b, t, h, d = q.shape
    g = k.shape[0] // b
    r = h // g
    q = jnp.transpose(q.reshape(b, t, g, r, d), (0, 2, 3, 1, 4)).reshape(b * g, r * t, d)
    scores = jnp.einsum("xqd,xsd->xqs", q, k, preferred_element_type=jnp.float32)
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)  # [B, T, S]
    visible = (k_pos[:, None, :] >= 0) & (dist >= 0)
    if q_segment is not None:
        visible &= q_segment[:, :, None] == k_segment[:, None, :]
    slopes = jnp.asarray(alibi_slopes(h)).reshape(g, r)
    # A finite floor instead of -inf: a query with no visible key (a padding row) gives a uniform
    # average instead of NaN, and masked keys still get exactly zero weight otherwise.
    bias = jnp.where(visible[:, None, None], -slopes[None, :, :, None, None] * jnp.sqrt(jnp.maximum(dist, 0.0))[:, None, None],
                     jnp.finfo(jnp.float32).min)
    # Scores and weights stay [B * G, R * T, S], the product's layout: reshaped to [B, G, R, T, S] for
    # the softmax, the weights were two arrays to autodiff (one per shape) and a layer scan kept both.
    scores = scores * (1.0 / math.sqrt(d)) + bias.reshape(scores.shape)
    # The max only keeps exp in range: out is the same for any shift, so no gradient flows through
    # it. Without stop_gradient, autodiff keeps the [B, H, T, S] scores of every layer to find where
    # the max was (a second float32 score tensor per layer, beside the weights, in a layer scan).
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("xqs,xsd->xqd", weights.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
    out = (out / total).reshape(b, g, r, t, d)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(dtype)
