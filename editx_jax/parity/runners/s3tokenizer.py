"""Parity runner for the `s3tokenizer_v1` fixtures (PyPI s3tokenizer S3Tokenizer, 25 Hz v1)."""

from __future__ import annotations

import numpy as np

from editx_jax.convert.s3tokenizer import from_state_dict, s3tokenizer_config_from_reference
from editx_jax.tokenizer.s3tokenizer import tokenize


def run_tokenizer(fx) -> dict[str, np.ndarray]:
    """tokens, token_len, hidden of the fixture's padded log-mel batch, padding frames included."""
    config = s3tokenizer_config_from_reference(fx.config)
    params = from_state_dict(fx.weights(), config)
    inputs = fx.inputs()
    tokens, token_len, hidden = tokenize(params, inputs["mel"], inputs["mel_len"].astype(np.int32), config)
    return {"tokens": np.asarray(tokens).astype(np.int64), "token_len": np.asarray(token_len),
            "hidden": np.asarray(hidden)}
