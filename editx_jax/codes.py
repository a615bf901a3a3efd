"""Audio codes <-> LLM ids: the 2:3 interleave of the two code streams and its inverse (architecture.md
§2.3, §1.7). Pure numpy on the ground floor, so both the tokenizer (which makes codes) and the decoder
(which reads them back) import it without importing each other.

Id spaces of one audio code (c02 in [0, 1024), c06 in [0, 4096)):
  LLM vocabulary id       65536 + c02        | 66560 + c06
  `<audio_N>` string N    c02                | 1024 + c06
Each group of five is [vq02, vq02, vq06, vq06, vq06]; codes that do not fill a whole group (in either
stream) are dropped.
"""

from __future__ import annotations

import re

import numpy as np

from editx_jax.vocab import (AUDIO_ID_OFFSET, AUDIO_TOKENS, GROUP, VQ02_CODES, VQ02_PER_GROUP,
                             VQ06_CODES, VQ06_PER_GROUP)

VQ02_ID_OFFSET = AUDIO_ID_OFFSET
VQ06_ID_OFFSET = AUDIO_ID_OFFSET + VQ02_CODES  # 66560


class AudioTokenError(ValueError):
    """Codes, ids or an `<audio_N>` string that do not form valid dual-codebook audio tokens."""


def checked_codes(codes, size: int, what: str) -> np.ndarray:
    """`codes` as int64 [N] with every value in [0, size); else AudioTokenError naming `what` (e.g.
    'vq02 code') and the first bad value and index."""
    arr = np.asarray(codes)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise AudioTokenError(f"{what}s must be a 1-D integer sequence, got {arr.dtype} shape {list(arr.shape)}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= size)
    if bad.any():
        raise AudioTokenError(f"{what} {int(arr[bad][0])} at index {int(np.flatnonzero(bad)[0])} "
                              f"is outside [0, {size})")
    return arr


def num_groups(len_vq02: int, len_vq06: int) -> int:
    return min(len_vq02 // VQ02_PER_GROUP, len_vq06 // VQ06_PER_GROUP)


def interleave_codes(vq02, vq06) -> np.ndarray:
    """The `<audio_N>` numbers (vq02 as is, vq06 + 1024), 2 + 3 per group, leftovers dropped."""
    a = checked_codes(vq02, VQ02_CODES, "vq02 code")
    b = checked_codes(vq06, VQ06_CODES, "vq06 code")
    g = num_groups(a.size, b.size)
    groups = np.concatenate([a[:VQ02_PER_GROUP * g].reshape(g, VQ02_PER_GROUP),
                             b[:VQ06_PER_GROUP * g].reshape(g, VQ06_PER_GROUP) + VQ02_CODES], axis=1)
    return groups.reshape(-1)


def interleave_ids(vq02, vq06) -> np.ndarray:
    """LLM vocabulary ids as `wav2token` builds them: vq02 + 65536, vq06 + 66560."""
    return interleave_codes(vq02, vq06) + AUDIO_ID_OFFSET


def merge_vq0206_to_token_str(vq02, vq06) -> str:
    """The prompt string `<audio_a><audio_b>...` of the interleaved codes."""
    return "".join(f"<audio_{n}>" for n in interleave_codes(vq02, vq06))


_AUDIO_TOKEN = re.compile(r"<audio_(\d+)>")


def get_audio_tokens(text: str) -> np.ndarray:
    """LLM ids (N + 65536) of a string made only of `<audio_N>` tokens; "" gives no ids."""
    if not isinstance(text, str):
        raise AudioTokenError(f"expected a string of <audio_N> tokens, got {type(text).__name__}")
    numbers, pos = [], 0
    for m in _AUDIO_TOKEN.finditer(text):
        if m.start() != pos:
            break
        numbers.append(int(m.group(1)))
        pos = m.end()
    if pos != len(text):
        raise AudioTokenError(f"not an <audio_N> token at character {pos}: {text[pos:pos + 24]!r}")
    ids = np.array(numbers, np.int64)
    bad = ids >= AUDIO_TOKENS
    if bad.any():
        raise AudioTokenError(f"<audio_{int(ids[bad][0])}> is outside <audio_0> ... <audio_{AUDIO_TOKENS - 1}>")
    return ids + AUDIO_ID_OFFSET


def split_ids(ids, offset: int = AUDIO_ID_OFFSET) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `interleave_ids`: ids -> (vq02 codes, vq06 codes).

    `offset` is what was added to the `<audio_N>` numbers: 65536 for LLM ids, 0 for the vocoder's
    prompt values (ids - 65536). The length must be a whole number of groups, and every position must
    hold a code of its stream.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise AudioTokenError(f"ids must be a 1-D integer sequence, got {arr.dtype} shape {list(arr.shape)}")
    if arr.size % GROUP:
        raise AudioTokenError(f"{arr.size} audio ids are not a whole number of {GROUP}-token groups")
    groups = arr.astype(np.int64).reshape(-1, GROUP) - offset
    vq02 = groups[:, :VQ02_PER_GROUP]
    vq06 = groups[:, VQ02_PER_GROUP:] - VQ02_CODES
    for name, codes, size, first in (("vq02", vq02, VQ02_CODES, offset),
                                     ("vq06", vq06, VQ06_CODES, offset + VQ02_CODES)):
        bad = (codes < 0) | (codes >= size)
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            pos = row * GROUP + col + (0 if name == "vq02" else VQ02_PER_GROUP)
            raise AudioTokenError(f"id {int(arr[pos])} at position {pos} is not a {name} id "
                                  f"([{first}, {first + size}))")
    return vq02.reshape(-1), vq06.reshape(-1)
