"""vq02 nearest-centroid assignment (architecture.md §2.1.4). The interleave of the two code streams
and its inverse live in `editx_jax.codes`, on the ground floor, where the decoder reads them too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from editx_jax.codes import AudioTokenError


# ------------------------------------------------------------------ nearest centroid


@jax.jit
def nearest_centroid(x, codebook):
    """(indices [..., T] int32, distances [..., T, K]) of frames x [..., T, D] against codebook [K, D].

    Like torch.cdist(x, codebook).argmin(-1): Euclidean (not squared) distances through the matmul
    expansion sqrt(max(|x|^2 + |c|^2 - 2 x.c, 0)), which torch uses above 25 rows; argmin keeps the
    first of equal distances.
    """
    x = jnp.asarray(x, jnp.float32)
    codebook = jnp.asarray(codebook, jnp.float32)
    x_sq = jnp.sum(x * x, axis=-1, keepdims=True)
    c_sq = jnp.sum(codebook * codebook, axis=-1)
    cross = jnp.einsum("...td,kd->...tk", x, codebook, precision=jax.lax.Precision.HIGHEST)
    dists = jnp.sqrt(jnp.maximum(x_sq - 2.0 * cross + c_sq, 0.0))
    return jnp.argmin(dists, axis=-1).astype(jnp.int32), dists


def quantize_vq02(enc_out, codebook) -> np.ndarray:
    """vq02 codes [T] (int64) for one clip's encoder output [T, D] or [1, T, D]."""
    enc_out = np.asarray(enc_out, np.float32)
    codebook = np.asarray(codebook, np.float32)
    if enc_out.ndim == 3 and enc_out.shape[0] == 1:
        enc_out = enc_out[0]
    if enc_out.ndim != 2 or codebook.ndim != 2 or enc_out.shape[1] != codebook.shape[1]:
        raise AudioTokenError(f"cannot quantize frames of shape {list(enc_out.shape)} against a codebook "
                              f"of shape {list(codebook.shape)}")
    if enc_out.shape[0] == 0:
        return np.zeros((0,), np.int64)
    return np.asarray(nearest_centroid(enc_out, codebook)[0]).astype(np.int64)
