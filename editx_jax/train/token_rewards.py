"""Upstream's four token-level GRPO rewards (upstream-training.md §4.2), exactly, plus a corrected edit
reward; pure Python over lists of ids (no decoding, no servers).

Every reward takes (output ids, source ids, target ids) and returns a float. Preprocessing: the output
loses one trailing <|EOT|> (3); `units(x)` cuts x into consecutive 5-token tuples, dropping a partial
last one. Source and target are used as given (no EOS stripping).
"""

from __future__ import annotations

import math
from typing import Sequence

UNIT_SIZE = 5
EOS = 3
SEGMENT_SEARCH_MARGIN = 30


def strip_eos(ids: Sequence[int]) -> list[int]:
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] == EOS else ids


def units(ids: Sequence[int]) -> list[tuple]:
    n = len(ids) // UNIT_SIZE
    return [tuple(ids[i * UNIT_SIZE:(i + 1) * UNIT_SIZE]) for i in range(n)]


def preserved_segments(src_units: list, tgt_units: list) -> list[list]:
    """Runs of target units matched in order against the source; on a mismatch only the source
    pointer advances (upstream's two-pointer walk, quirks included)."""
    segs, run, i, j = [], [], 0, 0
    while i < len(src_units) and j < len(tgt_units):
        if src_units[i] == tgt_units[j]:
            run.append(tgt_units[j])
            i += 1
            j += 1
        else:
            if run:
                segs.append(run)
                run = []
            i += 1
    if run:
        segs.append(run)
    return segs


def _levenshtein(a: list, b: list) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def edit_reward(output, source, target) -> float:
    """token_level_edit: mean over preserved segments of 1 - d / max(|W|, m, 1) on a window W that runs
    30 units past the segment (so a perfect output usually scores < 1; see `edit_reward_corrected`)."""
    out = units(strip_eos(output))
    segs = preserved_segments(units(source), units(target))
    if not segs:
        return 0.0
    p, total = 0, 0.0
    for s in segs:
        m = len(s)
        w = out[p:min(p + m + SEGMENT_SEARCH_MARGIN, len(out))]
        if w:
            d = _levenshtein(w, s)
            total += max(0.0, 1.0 - d / max(len(w), m, 1))
        p += max(1, m - UNIT_SIZE)
    return total / len(segs)


def edit_reward_corrected(output, source, target) -> float:
    """Ours: each preserved segment scored against the best-matching window of exactly its length
    (searched from the previous match onwards), times the output's unit-level similarity to the whole
    target (1 - edit distance / the longer length), so an output equal to the target scores 1.0 and one
    that keeps the segments but skips the edit (a copy of the source) scores less."""
    out, tgt = units(strip_eos(output)), units(target)
    whole = 1.0 - _levenshtein(out, tgt) / max(len(out), len(tgt), 1)
    segs = preserved_segments(units(source), tgt)
    if not segs:
        return whole
    p, total = 0, 0.0
    for s in segs:
        m = len(s)
        best, best_at = 0.0, p
        for start in range(p, max(p, len(out) - m) + 1):
            w = out[start:start + m]
            if not w:
                break
            score = max(0.0, 1.0 - _levenshtein(w, s) / max(len(w), m, 1))
            if score > best:
                best, best_at = score, start
            if best == 1.0:
                break
        total += best
        p = best_at + m if best > 0 else p
    return total / len(segs) * whole


def consistency_reward(output, source, target=None) -> float:
    """token_level_consistency: the share of output units that occur among the source units."""
    out = units(strip_eos(output))
    if not out:
        return 0.0
    src = set(units(source))
    return sum(u in src for u in out) / len(out)


def follow_reward(output, source, target) -> float:
    """token_level_follow: the share of preserved segments whose first unit appears, in order, in the
    output (1.0 when there is no preserved segment, as upstream)."""
    out = units(strip_eos(output))
    segs = preserved_segments(units(source), units(target))
    if not segs:
        return 1.0
    hits, c = 0, 0
    for s in segs:
        for k in range(c, len(out)):
            if out[k] == s[0]:
                hits += 1
                c = k + 1
                break
    return hits / len(segs)


def length_reward(output, source, target) -> float:
    """token_level_length on raw token counts: exp(-(|len(out) - len(tgt)| / 5) / D),
    D = max(len(tgt) / 5, 1) * 0.1 + 1; an empty target wants an empty output."""
    out, tgt = strip_eos(output), list(target)
    if not tgt:
        return 1.0 if not out else 0.0
    delta = abs(len(out) - len(tgt))
    d = max(len(tgt) / UNIT_SIZE, 1) * 0.1 + 1
    return math.exp(-(delta / UNIT_SIZE) / d)


TOKEN_REWARDS = {
    "token_level_edit": edit_reward,
    "token_level_edit_corrected": edit_reward_corrected,
    "token_level_consistency": consistency_reward,
    "token_level_follow": follow_reward,
    "token_level_length": length_reward,
}
ALIASES = {"mask_" + k[len("token_level_"):]: v for k, v in TOKEN_REWARDS.items()}
