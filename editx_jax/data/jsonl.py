"""Upstream's JSONL training records (upstream-training.md §1) -> token ids and a loss mask.

A record becomes the chat that upstream renders with the Step1 template,

    <s><|BOT|> system\\n{SYS}<|EOT|><|BOT|> human\\n{user}<|EOT|><|BOT|> assistant\\n{target audio}[<|EOT|>]

assembled at the id level: text pieces go through the text tokenizer, audio ids are spliced in as they
are (never rendered to `<audio_N>` strings and re-tokenised). The loss mask covers the assistant audio
tokens and, by default, a final `<|EOT|>` (training.md §3; `upstream_compat` drops it, as upstream SFT
does).

The ids come from `editx_jax.text.prompts.chat_template_ids` (training's path: the template string
tokenised once, audio ids spliced in). The text tokenizer is `editx_jax.text.TextTokenizer` (a path)
or a toy with the same `encode_parts` ("bytes", "words") for tests and demos; `data.text_tokenizer` has
no default, so a config that forgets it fails instead of training a real model on bytes. The
instruction text is `prompts.training_edit_instruction`: the inference prompts' strings, with
upstream's *training* rules (any edit type, unknown ones get the generic instruction).

Bad records are never dropped silently: each is counted under a reason (`DataReport`), and
`strict=True` raises `RecordError` on the first one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import zlib
from typing import Iterable, Protocol, Sequence

import numpy as np

from editx_jax.config import ConfigError, DataConfig
from editx_jax.text.prompts import (
    CLONE_SYSTEM_HEAD,
    CLONE_SYSTEM_TAIL,
    EDIT_SYSTEM_PROMPT,
    chat_template_ids,
    clone_speaker_id_from_file,
    training_edit_instruction,
)
from editx_jax.text.tokenizer import TextTokenizer

from editx_jax.vocab import AUDIO_ID_OFFSET, EOT_ID

class RecordError(ValueError):
    """A JSONL record cannot become a training example; `reason` is the counted category."""

    def __init__(self, reason: str, detail: str = "", where: str = "", fatal: bool = False):
        self.reason, self.detail, self.fatal = reason, detail, fatal  # fatal: raised even when not strict
        msg = f"{where}: {reason}" if where else reason
        super().__init__(f"{msg} ({detail})" if detail else msg)


class TextEncoder(Protocol):
    def encode_parts(self, parts, *, prefix_space: bool = True) -> list[int]: ...


def _encode_parts(encode, parts) -> list[int]:
    """Strings tokenized (adjacent ones joined), id runs spliced in as they are."""
    ids, pending = [], ""
    for part in parts:
        if isinstance(part, str):
            pending += part
            continue
        if pending:
            ids += encode(pending)
            pending = ""
        ids += [int(i) for i in np.asarray(part).reshape(-1)]
    return ids + (encode(pending) if pending else [])


class ByteTokenizer:
    """UTF-8 bytes -> ids 68 + byte: the byte-fallback region of the real vocabulary (`\\n` -> 78).
    Not the real tokenizer: for tests, demos and synthetic corpora only."""

    offset = 68

    def encode(self, text: str) -> list[int]:
        return [self.offset + b for b in text.encode("utf-8")]

    def encode_parts(self, parts, *, prefix_space: bool = True) -> list[int]:
        return _encode_parts(self.encode, parts)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256).decode("utf-8", "replace")


class WordHashTokenizer:
    """A toy for synthetic corpora: each space-separated word (and each newline) -> one id in the
    byte region [68, 324) by CRC32. Lossy and not the real tokenizer; it keeps prompts short, so
    CPU tests can train on the real chat layout quickly."""

    def encode(self, text: str) -> list[int]:
        ids = []
        for line_no, line in enumerate(text.split("\n")):
            if line_no:
                ids.append(78)  # "\n", as in the real vocabulary
            ids += [68 + zlib.crc32(w.encode("utf-8")) % 256 for w in line.split(" ") if w]
        return ids

    def encode_parts(self, parts, *, prefix_space: bool = True) -> list[int]:
        return _encode_parts(self.encode, parts)


def load_text_tokenizer(spec: str) -> TextEncoder:
    """data.text_tokenizer: the released model folder / tokenizer.model (`editx_jax.text.TextTokenizer`),
    or a toy for synthetic data ("bytes", "words"). There is no default: a config that names none gets
    this error, never a silent toy tokenizer."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "words":
        return WordHashTokenizer()
    if not spec:
        raise ConfigError("data.text_tokenizer is not set: name the released model folder (tokenizer.model), "
                          "or 'bytes' / 'words' for synthetic data")
    if not pathlib.Path(spec).exists():
        raise ConfigError(f"data.text_tokenizer: {spec} does not exist (a model folder or tokenizer.model, or "
                          "'bytes' / 'words')")
    return TextTokenizer.from_pretrained(spec)


clone_speaker = clone_speaker_id_from_file  # (source_text, wav path) -> "clone_<16 hex>"


@dataclasses.dataclass
class Example:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]: token n is a prediction target
    truncated: bool = False


@dataclasses.dataclass
class DataReport:
    """What reading a dataset did: examples kept, records skipped per reason, truncations."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_error: dict = dataclasses.field(default_factory=dict)  # reason -> first message

    def summary(self) -> str:
        lines = [f"{self.records} records: {self.kept} kept, {sum(self.skipped.values())} skipped, "
                 f"{self.truncated} truncated"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped {n}: {reason} (first: {self.first_error[reason]})")
        return "\n".join(lines)


def _audio_ids(record: dict, key: str, cfg: DataConfig, vocab_size: int) -> np.ndarray:
    value = record.get(key)
    if value is None:
        raise RecordError(f"missing {key}")
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RecordError(f"{key} is not a list of token ids", f"got {type(value).__name__}")
    if not value:
        raise RecordError(f"empty {key}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RecordError(f"{key} is not a list of token ids", "non-integer entry")
    ids = np.asarray(value, np.int64)
    codes = ids - AUDIO_ID_OFFSET  # records carry LLM ids 65536 + code (upstream-training.md §1.4)
    model_ids = codes + cfg.audio_id_base
    bad = (codes < 0) | (codes >= cfg.audio_codes) | (model_ids >= vocab_size)
    if bad.any():
        raise RecordError("token id out of range", f"{key} has {int(ids[bad][0])}; audio ids are "
                          f"[{AUDIO_ID_OFFSET}, {AUDIO_ID_OFFSET + min(cfg.audio_codes, vocab_size - cfg.audio_id_base)})")
    return model_ids.astype(np.int32)


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing {key}")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{key} is not a string")
    return value


def encode_record(record, tok: TextEncoder, cfg: DataConfig, vocab_size: int, speaker_fn=clone_speaker) -> Example:
    """One upstream record -> tokens + loss mask. Raises RecordError (with a counted reason)."""
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    for key in ("source_audio", "source_text", "target_text"):
        _text(record, key)
    source_text = record["source_text"]
    src = _audio_ids(record, "source_vq02vq06", cfg, vocab_size)
    tgt = _audio_ids(record, "target_vq02vq06", cfg, vocab_size)
    task = record.get("task_type") or "edit"
    if task == "edit":
        if "edit_type" not in record or "edit_info" not in record:
            raise RecordError("missing edit_type or edit_info")
        prefix = training_edit_instruction(str(record["edit_type"]), record["edit_info"], source_text)
        system, user = [EDIT_SYSTEM_PROMPT], [prefix + "\n", src, "\n"]
    else:
        if "emotion" not in record:
            raise RecordError("missing emotion (clone record)")
        try:
            speaker = speaker_fn(source_text, record["source_audio"])
        except Exception as e:  # noqa: BLE001 - any unreadable wav is one counted reason
            raise RecordError("unreadable source_audio", f"{type(e).__name__}: {e}") from None
        system = [CLONE_SYSTEM_HEAD.format(speaker=speaker, prompt_text=source_text), src, CLONE_SYSTEM_TAIL]
        user = [source_text]  # training: the prompt's own transcript (upstream-training.md §1.3)
    prompt = chat_template_ids(tok, system, user)  # ends with "<|BOT|> assistant\n"
    completion = list(tgt) + ([EOT_ID] if cfg.eos_in_loss and not cfg.upstream_compat else [])
    tokens = np.asarray(prompt + completion, np.int32)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise RecordError("token id out of range", f"text id {int(tokens.max())} >= vocab {vocab_size}")
    mask = np.zeros(tokens.size, bool)
    mask[len(prompt):] = True
    truncated = False
    if tokens.size > cfg.max_length:
        if cfg.overlong == "error":
            raise RecordError("longer than max_length", f"{tokens.size} > {cfg.max_length} tokens "
                              "(data.overlong=error)", fatal=True)
        if cfg.overlong == "drop":
            raise RecordError("longer than max_length (dropped)", f"{tokens.size} > {cfg.max_length} tokens")
        tokens, mask, truncated = tokens[:cfg.max_length], mask[:cfg.max_length], True
        if not mask.any():
            raise RecordError("no completion left after truncation", f"prompt of {len(prompt)} tokens")
    return Example(tokens, mask, truncated)


def iter_jsonl(paths: str | Sequence[str]) -> Iterable[tuple[str, object]]:
    """(where, parsed record or a RecordError) for every non-blank line of the files, in order."""
    if isinstance(paths, (str, pathlib.Path)):
        paths = [p for p in str(paths).split(",") if p]
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, RecordError("invalid JSON", str(e), where)


def read_records(paths, encode, strict: bool = False):
    """encode(record) over every JSONL record: (the results, a DataReport). A RecordError skips the
    record and is counted by reason, or is raised with its file:line when `strict` (or fatal).
    Results with a `truncated` flag are counted as truncated."""
    report = DataReport()
    results = []
    for where, record in iter_jsonl(paths):
        report.records += 1
        try:
            if isinstance(record, RecordError):
                raise record
            result = encode(record)
        except RecordError as e:
            if strict or e.fatal:
                raise RecordError(e.reason, e.detail, where) from None
            report.skipped[e.reason] += 1
            report.first_error.setdefault(e.reason, f"{where}: {e}")
            continue
        report.kept += 1
        report.truncated += result.truncated
        results.append(result)
    return results, report


def read_examples(paths, tok: TextEncoder, cfg: DataConfig, vocab_size: int, speaker_fn=clone_speaker,
                  strict: bool | None = None) -> tuple[list[Example], DataReport]:
    """All examples of the JSONL file(s) and the report of what was skipped or truncated."""
    strict = cfg.strict if strict is None else strict
    return read_records(paths, lambda record: encode_record(record, tok, cfg, vocab_size, speaker_fn), strict)
