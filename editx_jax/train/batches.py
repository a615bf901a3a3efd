"""Prompt + response batches for the reward model, DPO, GRPO and PPO.

A sequence batch (`sequence_batch`) is right-padded, one sequence per row, batch-major [N, T]:

    tokens, positions (-1 on padding), segment_ids (1 real, 0 padding)
    targets       the next token (what position t predicts)
    action_mask   1 where targets[t] is a response token (the tokens a policy is scored / trained on)
    response_mask 1 where tokens[t] is a response token (where a reward model reads its score)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BatchError(ValueError):
    """Prompt / response lists that cannot form a batch (empty responses, mismatched lengths...)."""


def sequence_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], length: int | None = None,
                   pad_id: int = 0, multiple: int = 8, allow_empty: bool = False) -> dict:
    """Right-padded [N, T] arrays of prompt + response rows (see the module doc). T = `length`, or the
    longest row rounded up to `multiple`."""
    if len(prompts) != len(responses):
        raise BatchError(f"{len(prompts)} prompts for {len(responses)} responses")
    if not prompts:
        raise BatchError("an empty batch")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0:
            raise BatchError(f"row {i}: empty prompt")
        if len(r) == 0 and not allow_empty:
            raise BatchError(f"row {i}: empty response")
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    if length is None:
        length = -(-longest // multiple) * multiple
    elif longest > length:
        raise BatchError(f"a row of {longest} tokens does not fit the length {length}")
    n = len(prompts)
    out = {"tokens": np.full((n, length), pad_id, np.int32), "targets": np.full((n, length), pad_id, np.int32),
           "positions": np.full((n, length), -1, np.int32), "segment_ids": np.zeros((n, length), np.int32),
           "action_mask": np.zeros((n, length), np.float32), "response_mask": np.zeros((n, length), np.float32)}
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        k, lp = len(seq), len(p)
        out["tokens"][i, :k] = seq
        out["targets"][i, :k - 1] = seq[1:]
        out["positions"][i, :k] = np.arange(k)
        out["segment_ids"][i, :k] = 1
        out["action_mask"][i, lp - 1:k - 1] = 1.0
        out["response_mask"][i, lp:k] = 1.0
    return out


def pair_batch(prompts, chosen, rejected, length: int | None = None, pad_id: int = 0, multiple: int = 8) -> dict:
    """Both sides of each pair in one batch, interleaved (row 2i chosen, 2i + 1 rejected), so a pair
    never straddles two batch shards. Empty or identical responses are errors."""
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        if len(c) == 0 or len(r) == 0:
            raise BatchError(f"pair {i}: empty {'chosen' if len(c) == 0 else 'rejected'} response")
        if list(c) == list(r):
            raise BatchError(f"pair {i}: chosen and rejected responses are identical")
    rows_p, rows_r = [], []
    for p, c, r in zip(prompts, chosen, rejected):
        rows_p += [p, p]
        rows_r += [c, r]
    return sequence_batch(rows_p, rows_r, length, pad_id, multiple)
