"""Dual-codebook token reshape and embedding of the flow model (architecture.md §3.2, §5 item 5, §6 fact 8).

The LLM emits groups of five audio values `[a, b, c, d, e]` = `[vq02, vq02, vq06+1024, vq06+1024,
vq06+1024]` (its ids minus 65536). The flow model runs at 25 Hz on time-aligned (vq02, vq06) pairs:

    [a, b, c, d, e]  ->  (a, c+1), (b, d+1), (1024, e+1)

Column 0 is the vq02 stream with the pad id 1024 in every third frame; column 1 is the vq06 code + 1025.
Both columns index ONE shared table of 5121 rows (1024 vq02 + 1 pad + 4096 vq06) of width input_size/2,
and the two looked-up halves are concatenated to input_size.
"""

from __future__ import annotations


import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from editx_jax.codes import AudioTokenError, checked_codes
from editx_jax.config.decoder import DualCodebookConfig
from editx_jax.vocab import AUDIO_TOKENS, GROUP, VQ02_CODES

PAD_ID = VQ02_CODES  # 1024: the vq02 slot of every third frame
VQ06_SHIFT = VQ02_CODES + 1  # a vq06 value v (= code + 1024) indexes row v + 1 = code + 1025
# A ragged tail is completed with the LAST `pad` values of this pattern, so missing vq02 slots get
# code 0 and missing vq06 slots get vq06 code 0 (value 1024).
_TAIL_PATTERN = (0, 0, 0, PAD_ID, PAD_ID, PAD_ID)


def reshape_tokens(mix_tokens) -> np.ndarray:
    """The official `_reshape`: audio values (LLM ids - 65536) [..., N] -> (vq02, vq06) pairs
    [..., 3*ceil(N/5), 2]; a batch [B, N] is reshaped row by row.

    A ragged tail is padded with `[0, 0, 0, 1024, 1024, 1024][-pad:]`, pad = 5 - N % 5, before grouping.
    Values must lie in [0, 5120); the group pattern itself is not checked (the official code embeds
    whatever the LLM produced).
    """
    arr = np.asarray(mix_tokens)
    if arr.ndim == 0:
        raise AudioTokenError("audio values must be a sequence [N] or a batch [..., N], got a scalar")
    return group_pairs(checked_codes(arr.reshape(-1), AUDIO_TOKENS, "audio value").reshape(arr.shape))


def group_pairs(arr: np.ndarray) -> np.ndarray:
    """`reshape_tokens` without the range check: int64 values [..., N] -> pair rows [..., 3*ceil(N/5), 2]."""
    arr = np.asarray(arr, np.int64)
    lead = arr.shape[:-1]
    pad = (-arr.shape[-1]) % GROUP
    if pad:
        tail = np.broadcast_to(np.asarray(_TAIL_PATTERN[-pad:], np.int64), lead + (pad,))
        arr = np.concatenate([arr, tail], axis=-1)
    groups = arr.reshape(lead + (-1, GROUP))
    vq02 = np.stack([groups[..., 0], groups[..., 1], np.full(groups.shape[:-1], PAD_ID, np.int64)], axis=-1)
    vq06 = groups[..., 2:] - VQ02_CODES + VQ06_SHIFT
    return np.stack([vq02.reshape(lead + (-1,)), vq06.reshape(lead + (-1,))], axis=-1)


def dual_frames(num_tokens: int) -> int:
    """Pair frames from N audio values: 3 * ceil(N / 5) (Appendix A)."""
    return 3 * (-(-int(num_tokens) // GROUP))


class DualCodebookEmbedding(nn.Module):
    """pairs [..., 2] int -> [..., input_size]: concat(E[pairs[..., 0]], E[pairs[..., 1]]), one table E.

    Any leading dims, as the official module: a batch [B, T, 2] (what `_reshape` of each row of a
    batch [B, N] of audio values gives, see `reshape_tokens`), one sequence [T, 2], a single frame.

    Indices are clamped at 0 first, as `flow.inference` does (`torch.clamp(token, min=0)`), so a -1
    padding id reads row 0.
    """

    config: DualCodebookConfig = DualCodebookConfig()

    @nn.compact
    def __call__(self, pairs):
        cfg = self.config
        if pairs.shape[-1:] != (2,):
            raise AudioTokenError(f"token pairs must have a last axis of 2, got shape {list(pairs.shape)}")
        table = nn.Embed(cfg.vocab_size, cfg.input_size // 2, name="embedding")
        rows = table(jnp.maximum(pairs.astype(jnp.int32), 0))  # [..., 2, input_size/2]
        return rows.reshape(*pairs.shape[:-1], cfg.input_size)
