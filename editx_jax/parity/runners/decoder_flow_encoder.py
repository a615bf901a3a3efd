"""Parity runners for the `dual_codebook_embedding` and `upsample_encoder_v2` fixtures."""

from __future__ import annotations

import re

import numpy as np

from editx_jax.convert.flow_encoder import (dual_codebook_config_from_reference, embedding_from_state_dict,
                                          encoder_from_state_dict, upsample_encoder_config_from_reference)
from editx_jax.decoder.embedding import DualCodebookEmbedding, reshape_tokens
from editx_jax.decoder.upsample_encoder import encode


def run_dual_codebook_embedding(fx) -> dict[str, np.ndarray]:
    """token_pairs_k [t, 2] int64 and embedding_k [1, t, input_size] for every `mix_tokens_k` input."""
    config = dual_codebook_config_from_reference(fx.config)
    params = embedding_from_state_dict(fx.weights(), config)
    module = DualCodebookEmbedding(config)
    out = {}
    for name, tokens in fx.inputs().items():
        m = re.fullmatch(r"mix_tokens_(\d+)", name)
        if m is None:
            continue
        pairs = reshape_tokens(tokens)
        out[f"token_pairs_{m[1]}"] = pairs
        out[f"embedding_{m[1]}"] = np.asarray(module.apply({"params": params}, pairs[None]))
    return out


def run_upsample_encoder(fx) -> dict[str, np.ndarray]:
    """xs_out [B, 2T, D] (padded frames included) and masks_out [B, 1, 2T] int32.

    The reference lets padding leak into the pre-lookahead conv and the fixture compares every frame,
    so this runs with isolate_padding=False.
    """
    config = upsample_encoder_config_from_reference(fx.config, isolate_padding=False)
    params = encoder_from_state_dict(fx.weights(), config)
    inputs = fx.inputs()
    xs_out, masks = encode(params, inputs["xs"], inputs["xs_lens"], config)
    return {"xs_out": np.asarray(xs_out), "masks_out": np.asarray(masks).astype(np.int32)}
