"""The LLM's id layout, defined once (architecture.md §1.6-1.7, §2.3, §3.2).

    0 <unk>  1 <s>  2 </s>  3 <|EOT|>  4 <|BOT|>  ...text pieces...
    65536 + N = <audio_N>, N in [0, 5120): vq02 code c -> 65536 + c, vq06 code c -> 66560 + c
    70656 ... 74751: reserved pieces past the audio range

The stray-id rule. The LLM may write a non-audio id inside its audio stream. The official decoder
takes `id - 65536` of every id, so a text id becomes a negative audio value that `flow.inference`
clamps to row 0 of the embedding table, whichever column (vq02 or vq06 slot) it sits in; the
decoder (`decoder/token2wav.py`) follows that rule itself, so such ids are passed to it unchanged.
An id past the audio range would index past the 5121-row table and crash the official decoder; it
is replaced by `STRAY_ID`, a text id, so that it reads the same row a stray text id reads.
"""

from __future__ import annotations

import numpy as np

UNK_ID, BOS_ID, EOS_ID, EOT_ID, BOT_ID = 0, 1, 2, 3, 4

VQ02_CODES = 1024
VQ06_CODES = 4096
VQ02_PER_GROUP, VQ06_PER_GROUP = 2, 3
GROUP = VQ02_PER_GROUP + VQ06_PER_GROUP
AUDIO_ID_OFFSET = 65536  # id of <audio_0>
AUDIO_TOKENS = VQ02_CODES + VQ06_CODES  # <audio_0> ... <audio_5119>
AUDIO_ID_END = AUDIO_ID_OFFSET + AUDIO_TOKENS  # first id past the audio range (70656)
STRAY_ID = UNK_ID  # what an id past the audio range becomes before decoding (see the module doc)


def is_audio_id(ids) -> np.ndarray:
    """Boolean mask (same shape) of the ids that are `<audio_N>` tokens."""
    arr = np.asarray(ids, np.int64)
    return (arr >= AUDIO_ID_OFFSET) & (arr < AUDIO_ID_END)


def audio_only(ids) -> list[int]:
    """The audio ids of a sequence, in order, everything else dropped."""
    arr = np.asarray(ids, np.int64).reshape(-1)
    return [int(i) for i in arr[is_audio_id(arr)]]


def for_decoder(ids) -> tuple[np.ndarray, int, int]:
    """(ids for the decoder, stray text ids, ids past the audio range) of one generated sequence.

    Text ids stay as they are (the decoder's own clamp rule handles them, as the official one does);
    ids past the audio range become `STRAY_ID`."""
    arr = np.asarray(ids, np.int64).reshape(-1)
    text = arr < AUDIO_ID_OFFSET
    past = arr >= AUDIO_ID_END
    return np.where(past, STRAY_ID, arr), int(text.sum()), int(past.sum())
