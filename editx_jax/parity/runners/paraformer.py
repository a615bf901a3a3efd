"""Parity runners for the vq02 encoder (`paraformer_encoder`) and its k-means (`linguistic_kmeans`)."""

from __future__ import annotations

import numpy as np

from editx_jax.convert.paraformer import config_from_funasr, convert_state_dict
from editx_jax.tokenizer.codebook import nearest_centroid
from editx_jax.tokenizer.paraformer import encode_stream


def run_encoder(fx) -> dict[str, np.ndarray]:
    """feats [B, T, 560] + chunk_lens (one encoder call per chunk) -> enc_out [B, T, D]."""
    cfg = config_from_funasr(fx.config)
    params, _ = convert_state_dict(fx.weights(), cfg)
    inputs = fx.inputs()
    enc_out, _ = encode_stream(params, cfg, inputs["feats"], inputs["chunk_lens"])
    return {"enc_out": enc_out}


def run_kmeans(fx) -> dict[str, np.ndarray]:
    """samples [1, T, D] and codebook [K, D] -> indices [T] (int64) and Euclidean dists [T, K]."""
    inputs = fx.inputs()
    indices, dists = nearest_centroid(inputs["samples"][0], inputs["codebook"])
    return {"indices": np.asarray(indices).astype(np.int64), "dists": np.asarray(dists, np.float32)}
