"""Parity runner for the 2:3 interleave of vq02 / vq06 (`dual_codebook_interleave`)."""

from __future__ import annotations

import numpy as np

from editx_jax.codes import get_audio_tokens, interleave_codes, interleave_ids, merge_vq0206_to_token_str


def run_interleave(fx) -> dict[str, np.ndarray]:
    """For every case cK of the manifest: speech_tokens, token_str (0-d unicode array), token_str_ids,
    parsed_ids."""
    inputs = fx.inputs()
    out = {}
    for case in fx.config["cases"]:
        vq02, vq06 = inputs[f"{case}_vq02"], inputs[f"{case}_vq06"]
        text = merge_vq0206_to_token_str(vq02, vq06)
        out[f"{case}_speech_tokens"] = interleave_ids(vq02, vq06)
        out[f"{case}_token_str"] = np.array(text)
        out[f"{case}_token_str_ids"] = interleave_codes(vq02, vq06)
        out[f"{case}_parsed_ids"] = get_audio_tokens(text)
    return out
