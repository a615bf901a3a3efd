"""GRPO / PPO prompt records: the prompt ids of each JSONL line and the record the rewards read."""

from __future__ import annotations

import numpy as np

from editx_jax.config import Config, ConfigError
from editx_jax.data import jsonl
from editx_jax.data.pairs import prompt_ids


def read_prompt_records(path: str, cfg: Config, tokenizer=None, speaker_fn=jsonl.clone_speaker):
    """GRPO / PPO prompts: (prompt ids, record) per line of a JSONL file. A line is either token-level,
    {"prompt": [ids], "source": [ids], "target": [ids]} (source / target optional, read by the
    token-level rewards), or an upstream edit record (prompt = the SFT chat up to the assistant turn,
    source / target = its audio tokens in model ids). Bad lines are skipped (data.strict: an error)."""
    if not path:
        raise ConfigError("data.train: no prompt file given")
    prompts, records, report, tok = [], [], jsonl.DataReport(), tokenizer
    for where, rec in jsonl.iter_jsonl(path):
        report.records += 1
        try:
            if isinstance(rec, jsonl.RecordError):
                raise rec
            if not isinstance(rec, dict):
                raise jsonl.RecordError("record is not a JSON object")
            if "prompt" in rec:
                ids = rec["prompt"]
                for key in ("prompt", "source", "target"):
                    v = rec.get(key, [])
                    if not isinstance(v, list) or not all(isinstance(i, int) and 0 <= i < cfg.llm.vocab_size for i in v):
                        raise jsonl.RecordError(f"{key} is not a list of token ids in [0, {cfg.llm.vocab_size})")
                if not ids:
                    raise jsonl.RecordError("empty prompt")
                extra = {k: v for k, v in rec.items() if k != "prompt"}
            else:
                tok = tok or jsonl.load_text_tokenizer(cfg.data.text_tokenizer)
                src = jsonl._audio_ids(rec, "source_vq02vq06", cfg.data, cfg.llm.vocab_size)
                tgt = jsonl._audio_ids(rec, "target_vq02vq06", cfg.data, cfg.llm.vocab_size) \
                    if rec.get("target_vq02vq06") is not None else np.zeros(0, np.int64)
                ids = prompt_ids(rec, tok, src, speaker_fn)
                extra = {**rec, "source": src.tolist(), "target": tgt.tolist()}
        except jsonl.RecordError as e:
            if cfg.data.strict:
                raise jsonl.RecordError(e.reason, e.detail, where) from None
            report.skipped[e.reason] += 1
            report.first_error.setdefault(e.reason, f"{where}: {e}")
            continue
        report.kept += 1
        prompts.append([int(i) for i in ids])
        records.append(extra)
    if not prompts:
        raise ValueError(f"{path}: no usable prompts ({report.summary()})")
    return prompts, records, report
