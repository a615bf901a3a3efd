"""LLM audio ids -> the flow's (vq02, vq06) pair frames, and the input checks both token2wav paths
share (architecture.md §3.2; the stray-id rule is `editx_jax/vocab.py`'s module doc).

    LLM ids - 65536 = audio values (vq02 0..1023, vq06 1024..5119)
      -> the official `_reshape` into (vq02, vq06) pair frames, 3 per group of 5 (ragged tail padded)
      -> clamp at 0 (`flow.inference` does it before the embedding), so a stray text id reads row 0

`decoder/token2wav.py` (offline) and `decoder/stream.py` (streaming) both read their ids through here.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from editx_jax.codes import AudioTokenError
from editx_jax.decoder.embedding import group_pairs
from editx_jax.vocab import AUDIO_ID_OFFSET, AUDIO_TOKENS


class Token2WavError(ValueError):
    """token2wav was given inconsistent inputs (lengths, sizes, batch); the message says which."""


def audio_values(ids, clamp_stray: bool = True) -> np.ndarray:
    """LLM ids -> audio values (id - 65536), as tts.py passes them. Values >= 5120 are an error;
    negative values (stray text ids) are kept here and clamped at the embedding (see the module doc)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise AudioTokenError(f"token ids must be a 1-D integer sequence, got {arr.dtype} shape {list(arr.shape)}")
    values = arr.astype(np.int64) - AUDIO_ID_OFFSET
    high = values >= AUDIO_TOKENS
    if high.any():
        i = int(np.flatnonzero(high)[0])
        raise AudioTokenError(f"token id {int(arr[i])} at index {i} is above the audio range "
                              f"[{AUDIO_ID_OFFSET}, {AUDIO_ID_OFFSET + AUDIO_TOKENS})")
    if not clamp_stray and (values < 0).any():
        i = int(np.flatnonzero(values < 0)[0])
        raise AudioTokenError(f"token id {int(arr[i])} at index {i} is not an audio id (>= {AUDIO_ID_OFFSET})")
    return values


def reshape_values(values) -> np.ndarray:
    """The official `_reshape` on audio values [..., N] (negatives allowed) -> pair rows [..., 3 ceil(N/5), 2],
    then `clamp(min=0)` as `flow.inference` does before the embedding."""
    return np.maximum(group_pairs(np.asarray(values, np.int64)), 0)


def reshape_batch(seqs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`reshape_values` of each sequence, one batched call per distinct length."""
    out: list = [None] * len(seqs)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_length.setdefault(len(s), []).append(i)
    for length, items in by_length.items():
        pairs = reshape_values(np.stack([seqs[i] for i in items]).reshape(len(items), length))
        for row, i in enumerate(items):
            out[i] = pairs[row]
    return out


def as_sequences(x, what: str) -> list:
    """One sequence, a (B, N) array or a list of sequences -> list of 1-D arrays."""
    if isinstance(x, (list, tuple)) and (len(x) == 0 or np.ndim(x[0]) == 0):
        return [np.asarray(x, np.int64)]
    if isinstance(x, (list, tuple)):
        return [np.asarray(s) for s in x]
    arr = np.asarray(x)
    if arr.ndim == 1:
        return [arr]
    if arr.ndim == 2:
        return list(arr)
    raise Token2WavError(f"{what} must be a sequence of ids, a (batch, N) array or a list of sequences, "
                         f"got shape {list(arr.shape)}")


def as_batch_arrays(x, batch: int, inner_ndim: int, what: str) -> list:
    """An array for one item (broadcast over the batch), a batched array or a list -> list of arrays."""
    if isinstance(x, (list, tuple)):
        items = [np.asarray(a, np.float32) for a in x]
    else:
        arr = np.asarray(x, np.float32)
        items = [arr] * batch if arr.ndim == inner_ndim else list(arr) if arr.ndim == inner_ndim + 1 else None
        if items is None:
            raise Token2WavError(f"{what} must have {inner_ndim} or {inner_ndim + 1} dims, got shape {list(arr.shape)}")
    if len(items) == 1 and batch > 1:
        items = items * batch
    if len(items) != batch:
        raise Token2WavError(f"{what}: {len(items)} items for a batch of {batch}")
    return items


def bf16_round(x) -> np.ndarray:
    """float32 -> bfloat16 -> float32 (round to nearest even), as `tts.py`'s `.to(torch.bfloat16)`."""
    return np.asarray(jnp.asarray(np.asarray(x, np.float32)).astype(jnp.bfloat16).astype(jnp.float32))
