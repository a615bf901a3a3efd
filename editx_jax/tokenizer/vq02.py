"""The vq02 half of the audio tokenizer: the streaming Paraformer front end and encoder driven over
whole clips, several clips at once, in bounded memory (architecture.md §2.1, §2.2).

Batching. The encoder lays every streaming call of every clip out as one row
(`paraformer.window_plan`) with masks, so each clip gets exactly its codes alone.

Long audio, bounded memory. vq02 is a single stream over the whole clip, but a layer's k/v cache
for call i only holds frames of the few calls before it, so the output of calls [s, e) depends only
on calls [c, e) where c walks back one cache span per layer (`context_start`). The calls are
processed in blocks of `block_calls` rows, each with that exact context recomputed in front of it
(about 200 calls = 48 s for the released 50 layers); the codes equal those of one pass over the
whole clip. The front end is frame-local, so the fbank of a long clip is computed in fixed-size
segments too (`vq02_features`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from editx_jax.audio import features
from editx_jax.audio.features import FbankConfig
from editx_jax.tokenizer import codebook as cb
from editx_jax.tokenizer import paraformer as pf
from editx_jax.tokenizer.paraformer import ParaformerEncoderConfig


def min_dependency(plan: pf.WindowPlan) -> np.ndarray:
    """[R] the earliest row whose k/v each row's cache holds (the row itself when its cache is empty)."""
    width = plan.source.shape[1]
    rows = np.arange(plan.cache_index.shape[0])
    refs = np.where(plan.cache_index >= 0, plan.cache_index // width, rows[:, None])
    return np.minimum(refs.min(axis=1), rows)


def context_start(min_dep: np.ndarray, start: int, num_layers: int) -> int:
    """First row to recompute so that rows >= `start` come out exactly as in one whole pass.

    Layer l's output for rows [y, e) needs layer l-1's outputs for rows [min_dep[y], e) (their k/v
    fill the caches; min_dep is non-decreasing), and the embedded inputs are exact for any row.
    """
    c = start
    for _ in range(num_layers):
        c = int(min_dep[c])
    return c


def _row_bucket(n: int) -> int:
    """Rows of a single pass: 2^k or 3·2^(k-1), at least 8 (few compilations, at most 1/3 padding)."""
    return features.bucket_length(n, 8)


@functools.partial(jax.jit, static_argnames="cfg")
def _vq02_window_codes(params, centroids, feats, positions, window_valid, cache_index, *, cfg):
    """Encoder over laid-out windows, then the nearest centroid of every frame: int32 [R, W]."""
    hidden = pf.ParaformerEncoder(cfg).apply({"params": params}, feats, positions, window_valid, cache_index,
                                             method=pf.ParaformerEncoder.encode_windows)
    return cb.nearest_centroid(hidden, centroids)[0]


def vq02_codes_from_features(params, centroids, cfg: ParaformerEncoderConfig, feats: Sequence[np.ndarray],
                             chunk_lens: Sequence[Sequence[int]], block_calls: int = 1024) -> list[np.ndarray]:
    """vq02 codes of several clips from their streaming features (feats [T_b, input_size], chunk
    lens per call), as the official per-call loop computes them, in bounded memory.

    All calls of all clips are rows of one window plan; they run `block_calls` target rows at a
    time, each block preceded by the context rows its exactness needs (`context_start`). When
    everything fits in one block there is no context and one pass (rows padded to a power of two).
    """
    batch = len(feats)
    totals = [int(sum(lens)) for lens in chunk_lens]
    out = [np.zeros((t,), np.int32) for t in totals]
    if not any(totals):
        return out
    n_calls = max(len(lens) for lens in chunk_lens)
    lens = np.zeros((batch, max(n_calls, 1)), np.int64)
    for b, row in enumerate(chunk_lens):
        lens[b, :len(row)] = row
    frames = max(totals)
    flat = np.zeros((batch, frames, cfg.input_size), np.float32)
    for b, f in enumerate(feats):
        flat[b, :totals[b]] = np.asarray(f, np.float32)[:totals[b]]
    flat = flat.reshape(batch * frames, cfg.input_size)
    plan = pf.window_plan(cfg, lens, frames)
    n_rows, width = plan.source.shape
    p = cfg.overlap_frames
    dep = min_dependency(plan)
    blocks = []
    for s in range(0, n_rows, block_calls):
        e = min(n_rows, s + block_calls)
        blocks.append((context_start(dep, s, cfg.num_blocks), s, e))
    if len(blocks) == 1:
        rows_per_pass = _row_bucket(n_rows)
    else:  # one shape for every block: one compilation however long the audio
        rows_per_pass = max(e - c for c, _, e in blocks)
        rows_per_pass = -(-rows_per_pass // 8) * 8
    for c, s, e in blocks:
        source = np.full((rows_per_pass, width), -1, np.int64)
        positions = np.zeros((rows_per_pass, width), np.int32)
        valid = np.zeros((rows_per_pass, width), bool)
        valid[:, :p] = True  # padding rows see their zero prefix, so no softmax is empty
        cache = np.full((rows_per_pass, plan.cache_index.shape[1]), -1, np.int32)
        n = e - c
        source[:n], positions[:n], valid[:n] = plan.source[c:e], plan.positions[c:e], plan.window_valid[c:e]
        ci = plan.cache_index[c:e]
        # rebase onto the block's rows; slots of rows before the block are dropped (those rows are
        # context whose own output is not kept)
        cache[:n] = np.where((ci >= 0) & (ci // width >= c), ci - c * width, -1)
        windows = np.where((source >= 0)[..., None], flat[np.maximum(source, 0)], 0.0).astype(np.float32)
        codes = np.asarray(_vq02_window_codes(params, centroids, windows, positions, valid, cache, cfg=cfg))
        for r in range(s, e):
            b, start, k = plan.rows[r]
            out[b][start:start + k] = codes[r - c, p:p + k]
    return out


# ------------------------------------------------------------------------------- vq02 front end


def vq02_features(wave: np.ndarray, cmvn, config: FbankConfig, segment_frames: int = 1 << 14):
    """`features.wav_frontend_online` (feats [T, 560], chunk lens) of a 16 kHz clip, with the fbank
    of a long clip computed `segment_frames` frames at a time (fbank frames only see their own 400
    samples, so the segments join exactly) before LFR and CMVN."""
    wave = np.asarray(wave, np.float32).reshape(-1)
    lens = features.online_chunk_lens(wave.shape[0], config)
    total = sum(lens)
    if total == 0:
        return np.zeros((0, config.feat_dim), np.float32), lens
    n_frames = features.num_fbank_frames(wave.shape[0], config)
    if n_frames <= segment_frames:
        feats, _ = features.wav_frontend_online(wave, cmvn, config)
        return np.asarray(feats), lens
    shift, length = config.frame_shift, config.frame_length
    parts = []
    for f0 in range(0, n_frames, segment_frames):
        f1 = min(n_frames, f0 + segment_frames)
        piece = wave[f0 * shift:(f1 - 1) * shift + length]
        if f1 - f0 < segment_frames:  # the same padded length as the other segments: one compilation
            piece = np.pad(piece, (0, (segment_frames - 1) * shift + length - piece.shape[0]))
        parts.append(np.asarray(features.kaldi_fbank(piece, config))[:f1 - f0])
    fbank = np.concatenate(parts)
    feats = features.apply_lfr(fbank, config.lfr_m, config.lfr_n)[:total]
    if cmvn is not None:
        feats = features.apply_cmvn(feats, cmvn)
    return np.asarray(feats, np.float32), lens
