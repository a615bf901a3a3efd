"""Preference pairs (prompt, chosen, rejected[, margin]) for the reward model and DPO.

Two JSONL layouts are read:
  * token-level pairs: {"prompt": [ids], "chosen": [ids], "rejected": [ids], "margin": float (optional)};
  * upstream edit records (upstream-training.md §1): prompt = the SFT chat up to "<|BOT|> assistant\\n",
    chosen = target_vq02vq06, rejected = rejected_vq02vq06 when the record has it and
    `dpo.use_rejected_field` (ours), else source_vq02vq06 (upstream's behaviour, §3.1); <|EOT|> appended
    to both (TRL appends the tokenizer's EOS).

Truncation (`dpo.truncation`): "source_audio" (ours) cuts the source audio tokens, at a 5-token unit
boundary, until the prompt fits `max_prompt_length`, so the instruction survives; "upstream" keeps the
last `max_prompt_length` prompt tokens (which can cut the system prompt and instruction) and then drops
the front of any sequence over `max_length` (TRL's keep_end). With ours, completions over the budget
are cut at their end.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from editx_jax.config import DataConfig, DPOConfig
from editx_jax.data import jsonl
from editx_jax.data.jsonl import RecordError, _audio_ids, _text
from editx_jax.text.prompts import (
    CLONE_SYSTEM_HEAD,
    CLONE_SYSTEM_TAIL,
    EDIT_SYSTEM_PROMPT,
    chat_template_ids,
    training_edit_instruction,
)
from editx_jax.vocab import EOT_ID

UNIT = 5  # tokens per 2:3 audio unit


@dataclasses.dataclass
class Pair:
    prompt: list
    chosen: list
    rejected: list
    margin: float = 0.0
    truncated: bool = False


def prompt_ids(record, tok, src, speaker_fn):
    if (record.get("task_type") or "edit") == "edit":
        if "edit_type" not in record or "edit_info" not in record:
            raise RecordError("missing edit_type or edit_info")
        prefix = training_edit_instruction(str(record["edit_type"]), record["edit_info"], record["source_text"])
        return chat_template_ids(tok, [EDIT_SYSTEM_PROMPT], [prefix + "\n", src, "\n"])
    if "emotion" not in record:
        raise RecordError("missing emotion (clone record)")
    speaker = speaker_fn(record["source_text"], record["source_audio"])
    head = CLONE_SYSTEM_HEAD.format(speaker=speaker, prompt_text=record["source_text"])
    return chat_template_ids(tok, [head, src, CLONE_SYSTEM_TAIL], [record["source_text"]])


def record_to_pair(record: dict, tok, data: DataConfig, dpo: DPOConfig, vocab_size: int,
                   speaker_fn=jsonl.clone_speaker) -> Pair:
    """One JSONL record -> a Pair (see the module doc). Raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    if "chosen" in record:  # token-level pair
        ids = {}
        for key in ("prompt", "chosen", "rejected"):
            v = record.get(key)
            if not isinstance(v, list) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in v):
                raise RecordError(f"{key} is not a list of token ids in [0, {vocab_size})")
            ids[key] = v
        pair = Pair(ids["prompt"], ids["chosen"], ids["rejected"], float(record.get("margin", 0.0)))
    else:
        for key in ("source_audio", "source_text", "target_text"):
            _text(record, key)
        src = _audio_ids(record, "source_vq02vq06", data, vocab_size)
        chosen = _audio_ids(record, "target_vq02vq06", data, vocab_size).tolist()
        use_field = dpo.use_rejected_field and record.get("rejected_vq02vq06") is not None
        rejected = (_audio_ids(record, "rejected_vq02vq06", data, vocab_size) if use_field else src).tolist()
        eos = [EOT_ID] if dpo.append_eos else []
        prompt = prompt_ids(record, tok, src, speaker_fn)
        truncated = False
        if dpo.truncation == "source_audio" and len(prompt) > dpo.max_prompt_length:
            keep = len(src) - (len(prompt) - dpo.max_prompt_length)
            keep -= keep % UNIT
            if keep <= 0:
                raise RecordError("prompt too long", f"the instruction alone exceeds max_prompt_length "
                                  f"{dpo.max_prompt_length}")
            prompt, truncated = prompt_ids(record, tok, src[:keep], speaker_fn), True
        pair = Pair(prompt, chosen + eos, rejected + eos, float(record.get("margin", 0.0)), truncated)
    if not pair.chosen or not pair.rejected:
        raise RecordError("empty response")
    if pair.chosen == pair.rejected:
        raise RecordError("chosen and rejected are identical")
    return truncate(pair, dpo)


def truncate(pair: Pair, dpo: DPOConfig) -> Pair:
    """Fit prompt + each completion into dpo.max_length (see the module doc)."""
    p, c, r = pair.prompt, pair.chosen, pair.rejected
    cut = pair.truncated
    if dpo.truncation == "upstream":
        if len(p) > dpo.max_prompt_length:
            p, cut = p[-dpo.max_prompt_length:], True
        over = len(p) + max(len(c), len(r)) - dpo.max_length
        if over > 0:  # keep_end: the front of the sequence goes
            p, cut = p[over:], True
            if not p:
                raise RecordError("nothing of the prompt left after truncation")
    else:
        if len(p) > dpo.max_prompt_length:
            p, cut = p[:dpo.max_prompt_length], True
        room = dpo.max_length - len(p)
        if len(c) > room or len(r) > room:
            c, r, cut = c[:room], r[:room], True
            if c == r:
                raise RecordError("chosen and rejected are identical after truncation")
    return Pair(list(p), list(c), list(r), pair.margin, cut)


def read_pairs(paths, tok, data: DataConfig, dpo: DPOConfig, vocab_size: int, strict: bool = False):
    """All pairs of the JSONL file(s) and the report of what was skipped / truncated."""
    return jsonl.read_records(paths, lambda record: record_to_pair(record, tok, data, dpo, vocab_size), strict)


def as_arrays(pairs):
    return ([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
            np.asarray([p.margin for p in pairs], np.float32))
