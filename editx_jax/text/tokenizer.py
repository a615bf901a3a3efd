"""SentencePiece text tokenizer of the Step1 LM, encoding as the official HF tokenizer does (architecture.md §1.6).

The released `tokenizer.model` is a Unigram model with byte fallback and 74,752 pieces: unk 0, `<s>` 1,
`</s>` 2, `<|EOT|>` 3, `<|BOT|>` 4, further control / user-defined pieces, the 256 byte pieces (`\\n` is
`<0x0A>` = 78), the text pieces, and `<audio_N>` = 65536 + N for N < 5120 (more reserved pieces follow).

What the official code runs is transformers' `LlamaTokenizerFast` converted from that model with
`legacy: false`. Its behaviour, which `encode` reproduces:

1. Every non-text piece (unknown, control, user-defined: 9,284 "added tokens") is cut out of the raw text
   first and becomes its own id; `<audio_7>` is one id wherever it appears, with no `▁` around it.
2. The text between them gets no Unicode normalization (the converter drops the SentencePiece normalizer),
   spaces become `▁`, and a `▁` is prepended only to a section that starts the whole string (Metaspace,
   `prepend_scheme="first"`, `split=False`) and does not already start with `▁`. So
   `encode("<s><|BOT|> assistant\\n<audio_1><|EOT|>") == [1, 4, 15886, 78, 65537, 3]`: " assistant" ->
   `▁assistant`, "\\n" -> the byte piece, no dummy prefix because the text does not start the string.
3. Each section is segmented by the Unigram model over its whole length (no whitespace split); characters
   outside the vocabulary fall back to their UTF-8 byte pieces.
4. No BOS or EOS is added (`add_special_tokens=False` semantics): what HF's `encode` adds by default
   (`add_bos_token` / `add_eos_token` of `tokenizer_config.json`) is `special_ids()`, which the prompt
   assembly puts around each segment.

`tokenizer_config.json` (kept beside `tokenizer.model` in a model folder) is read into `TokenizerSettings`
with HF `LlamaTokenizerFast`'s defaults for absent keys: `add_bos_token` True, `add_eos_token` False,
`legacy` True, bos `<s>`, eos `</s>`, unk `<unk>`. The released file sets `legacy: false` and has no
`add_bos_token` key, so BOS starts every `encode` (architecture.md §1.6, §1.8.2). Only the non-legacy
encoding is implemented, so a file that asks for the legacy one (or sets `add_prefix_space`) is refused
rather than encoded differently. Without the file (folders converted before it was kept, random demo
models), `RELEASED_CONFIG` applies.

`decode` mirrors the fast tokenizer's decoder: pieces concatenated, `▁` -> space, byte pieces fused into
UTF-8, then one leading space stripped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Sequence, Union

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from editx_jax.vocab import AUDIO_ID_OFFSET, AUDIO_TOKENS, BOS_ID, BOT_ID, EOS_ID, EOT_ID, UNK_ID

SPIECE = "\u2581"  # "▁", SentencePiece's whitespace marker
MODEL_FILENAME = "tokenizer.model"
CONFIG_FILENAME = "tokenizer_config.json"

# The released tokenizer_config.json without its chat_template (architecture.md §1.6).
RELEASED_CONFIG = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 65536, "padding_side": "left",
                   "clean_up_tokenization_spaces": False, "use_default_system_prompt": False}

# (id, piece) pairs the prompt assembly hard-codes; a model that disagrees is refused at load time.
_FIXED_PIECES = ((UNK_ID, "<unk>"), (BOS_ID, "<s>"), (EOS_ID, "</s>"), (EOT_ID, "<|EOT|>"), (BOT_ID, "<|BOT|>"))
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ANGLE_TOKEN = re.compile(r"<[^<>]+>")

# One text piece of a prompt: a string to tokenize, or ids that go in as they are (audio tokens).
Part = Union[str, Sequence[int], np.ndarray]


class TokenizerError(ValueError):
    """The text tokenizer cannot be loaded or cannot handle the given ids."""


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """The keys of `tokenizer_config.json` that change ids; defaults are HF LlamaTokenizerFast's."""

    bos_token: str = "<s>"
    eos_token: str = "</s>"
    unk_token: str = "<unk>"
    pad_token: str | None = None
    legacy: bool = True  # HF's default when the key is absent (with a warning)
    add_bos_token: bool = True
    add_eos_token: bool = False

    @classmethod
    def from_hf_config(cls, config: dict, where: str = CONFIG_FILENAME) -> "TokenizerSettings":
        if not isinstance(config, dict):
            raise TokenizerError(f"{where}: expected a JSON object, got {type(config).__name__}")
        values = {}
        for field in dataclasses.fields(cls):
            if config.get(field.name) is None:
                continue  # absent (or null): HF's default
            value = config[field.name]
            if field.name.endswith("_token") and not field.name.startswith("add_"):
                value = value.get("content") if isinstance(value, dict) else value  # AddedToken form
                if not isinstance(value, str) or not value:
                    raise TokenizerError(f"{where}: {field.name} must be a token string, got {config[field.name]!r}")
            elif not isinstance(value, bool):
                raise TokenizerError(f"{where}: {field.name} must be true or false, got {value!r}")
            values[field.name] = value
        settings = cls(**values)
        if settings.legacy:
            raise TokenizerError(f"{where}: only the non-legacy encoding is implemented (the released file sets "
                                 f"\"legacy\": false; HF's default when absent is legacy)")
        if config.get("add_prefix_space") is not None:
            raise TokenizerError(f"{where}: add_prefix_space is not supported (the released file has none)")
        return settings


def read_hf_config(path: str | pathlib.Path) -> dict:
    """A `tokenizer_config.json` as a dict (TokenizerError, one line, if it is not JSON)."""
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


class TextTokenizer:
    """The Step1 LM's text tokenizer over a SentencePiece `tokenizer.model` (path, folder or serialized bytes)
    and the settings of its `tokenizer_config.json` (a dict; default `RELEASED_CONFIG`)."""

    def __init__(self, model: str | pathlib.Path | bytes, hf_config: dict | None = None):
        if isinstance(model, (bytes, bytearray)):
            blob, where = bytes(model), "<bytes>"
        else:
            path = pathlib.Path(model)
            if path.is_dir():
                path = path / MODEL_FILENAME
            if not path.is_file():
                raise TokenizerError(f"text tokenizer model not found: {path}")
            blob, where = path.read_bytes(), str(path)
        self.model_bytes = blob  # kept so a model folder can be written back out
        proto = model_pb2.ModelProto()
        try:
            proto.ParseFromString(blob)
        except Exception as e:  # noqa: BLE001 - any protobuf failure means "not a SentencePiece model"
            raise TokenizerError(f"{where} is not a SentencePiece model ({type(e).__name__})") from None
        if not proto.pieces:
            raise TokenizerError(f"{where} is not a SentencePiece model (no pieces)")

        # The HF fast conversion of a non-legacy Llama tokenizer has no normalizer: text reaches the Unigram
        # model as it is, apart from " " -> "▁" and the first-section prefix, which `encode` does itself.
        norm = proto.normalizer_spec
        norm.name = "identity"
        norm.precompiled_charsmap = b""
        norm.add_dummy_prefix = False
        norm.remove_extra_whitespaces = False
        norm.escape_whitespaces = True
        norm.normalization_rule_tsv = ""
        proto.ClearField("denormalizer_spec")
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        types = proto.SentencePiece.Type
        unknown, control, user_defined, byte_type = (types.Value(n) for n in
                                                     ("UNKNOWN", "CONTROL", "USER_DEFINED", "BYTE"))
        self._pieces: list[str] = []
        self._added: dict[str, int] = {}  # cut out of text before SentencePiece (HF's AddedTokens)
        self._special: set[int] = set()  # what `decode(skip_special_tokens=True)` drops
        self._byte_value: dict[int, int] = {}  # byte piece id -> byte
        for i, p in enumerate(proto.pieces):
            piece, kind = p.piece, p.type
            self._pieces.append(piece)
            if kind == unknown or kind == control:
                self._added[piece] = i
                self._special.add(i)
            elif kind == user_defined:
                self._added[piece] = i
            elif kind == byte_type and (m := _BYTE_PIECE.fullmatch(piece)):
                self._byte_value[i] = int(m.group(1), 16)
        self.vocab_size = len(self._pieces)
        self._split = self._added_token_regex(self._added)

        for i, piece in _FIXED_PIECES:
            if i >= self.vocab_size or self._pieces[i] != piece:
                got = self._pieces[i] if i < self.vocab_size else "nothing"
                raise TokenizerError(f"{where}: id {i} must be {piece!r}, found {got!r}")
        # Audio pieces sit at their fixed ids; count how many this model has (5120 in the released one).
        n = 0
        while (AUDIO_ID_OFFSET + n < self.vocab_size and n < AUDIO_TOKENS
               and self._pieces[AUDIO_ID_OFFSET + n] == f"<audio_{n}>"):
            n += 1
        self.num_audio_tokens = n

        self.hf_config = dict(RELEASED_CONFIG if hf_config is None else hf_config)  # written back by `save`
        self.settings = TokenizerSettings.from_hf_config(self.hf_config)
        s = self.settings
        ids = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = getattr(s, name)
            try:
                ids[name] = None if token is None else self.piece_to_id(token)
            except TokenizerError:
                raise TokenizerError(f"{CONFIG_FILENAME}: {name} {token!r} is not a piece of {where}") from None
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path) -> "TextTokenizer":
        """Load `tokenizer.model` from a model folder, or a model file directly, with the
        `tokenizer_config.json` beside it (`RELEASED_CONFIG` when there is none)."""
        path = pathlib.Path(path)
        config = (path if path.is_dir() else path.parent) / CONFIG_FILENAME
        return cls(path, read_hf_config(config) if config.is_file() else None)

    def save(self, folder: str | pathlib.Path) -> None:
        """Write `tokenizer.model` and `tokenizer_config.json` into `folder`."""
        folder = pathlib.Path(folder)
        (folder / MODEL_FILENAME).write_bytes(self.model_bytes)
        (folder / CONFIG_FILENAME).write_text(json.dumps(self.hf_config, indent=2, ensure_ascii=False),
                                              encoding="utf-8")

    def special_ids(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) that HF's `encode(s)` with default arguments puts around a segment:
        BOS if `add_bos_token`, EOS if `add_eos_token` (architecture.md §1.8.2)."""
        return ([self.bos_id] if self.settings.add_bos_token else [],
                [self.eos_id] if self.settings.add_eos_token else [])

    # ------------------------------------------------------------------ encode

    @staticmethod
    def _added_token_regex(added: dict[str, int]) -> re.Pattern:
        # A regex alternation over 9,284 literals is slow to run, so tokens shaped "<...>" (nearly all of
        # them) are found by shape and looked up; any other added tokens are literal alternatives,
        # longest first, as HF matches leftmost-longest.
        literals = sorted((t for t in added if not _ANGLE_TOKEN.fullmatch(t)), key=len, reverse=True)
        longest = max((len(t) for t in added if _ANGLE_TOKEN.fullmatch(t)), default=2)
        alternatives = [f"<[^<>]{{1,{max(longest - 2, 1)}}}>"] + [re.escape(t) for t in literals]
        return re.compile("|".join(alternatives))

    def _split_added(self, text: str) -> list[str | int]:
        """The text as a list of text sections (str) and added-token ids (int), in order."""
        out: list[str | int] = []
        start = 0
        for m in self._split.finditer(text):
            token_id = self._added.get(m.group(0))
            if token_id is None:
                continue  # "<foo>" that is not a token: stays text
            if m.start() > start:
                out.append(text[start:m.start()])
            out.append(token_id)
            start = m.end()
        if start < len(text):
            out.append(text[start:])
        return out

    def _encode_section(self, section: str, at_start: bool) -> list[int]:
        section = section.replace(" ", SPIECE)
        if at_start and not section.startswith(SPIECE):
            section = SPIECE + section
        return self._sp.encode(section)

    def encode(self, text: str, *, prefix_space: bool = True) -> list[int]:
        """Token ids of `text`, no BOS/EOS. `prefix_space=False` treats the text as the continuation of a
        longer string (no `▁` before its first word), e.g. text that follows an audio token."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        at_start = prefix_space
        for item in self._split_added(text):
            if isinstance(item, int):
                ids.append(item)
            else:
                ids.extend(self._encode_section(item, at_start))
            at_start = False
        return ids

    def encode_parts(self, parts: Sequence[Part], *, prefix_space: bool = True) -> list[int]:
        """Ids of the concatenation of `parts`: strings are tokenized, id sequences (audio tokens) go in as
        they are. Equals `encode` of the whole string with the ids written as their pieces, because added
        tokens split the text anyway; adjacent strings are joined first so that an empty id run changes
        nothing."""
        ids: list[int] = []
        pending = ""
        for part in parts:
            if isinstance(part, str):
                pending += part
                continue
            run = [int(i) for i in np.asarray(part, dtype=np.int64).reshape(-1)]
            if not run:
                continue
            if pending:
                ids.extend(self.encode(pending, prefix_space=prefix_space and not ids))
                pending = ""
            ids.extend(run)
        if pending:
            ids.extend(self.encode(pending, prefix_space=prefix_space and not ids))
        return ids

    # ------------------------------------------------------------------ decode and pieces

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; added tokens appear as their piece (`<audio_3>`), as in HF with default arguments."""
        buf = bytearray()
        for i in self._check_ids(ids):
            if skip_special_tokens and i in self._special:
                continue
            byte = self._byte_value.get(i)
            if byte is not None:
                buf.append(byte)
            else:
                buf += self._pieces[i].replace(SPIECE, " ").encode("utf-8")
        text = buf.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return out

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[self._check_ids([token_id])[0]]

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece; KeyError-free: unknown pieces raise TokenizerError."""
        token_id = self._added.get(piece)
        if token_id is None:
            token_id = self._sp.piece_to_id(piece)
            if token_id == UNK_ID and piece != "<unk>":
                raise TokenizerError(f"{piece!r} is not a piece of this tokenizer")
        return token_id

    # ------------------------------------------------------------------ audio ids

    def audio_id(self, n: int) -> int:
        """Id of `<audio_n>`."""
        if not 0 <= int(n) < self.num_audio_tokens:
            raise TokenizerError(f"<audio_{n}> is not in this tokenizer (audio tokens 0..{self.num_audio_tokens - 1})")
        return AUDIO_ID_OFFSET + int(n)

    def is_audio(self, token_id: int) -> bool:
        return AUDIO_ID_OFFSET <= int(token_id) < AUDIO_ID_OFFSET + self.num_audio_tokens

    def check_audio_ids(self, ids) -> np.ndarray:
        """`ids` as a 1-D int64 array, or TokenizerError if any is not an audio token id."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return np.zeros((0,), np.int64)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TokenizerError(f"audio ids must be a 1-D integer sequence, got shape {list(arr.shape)} "
                                 f"of {arr.dtype}")
        arr = arr.astype(np.int64)
        bad = np.flatnonzero((arr < AUDIO_ID_OFFSET) | (arr >= AUDIO_ID_OFFSET + self.num_audio_tokens))
        if bad.size:
            raise TokenizerError(f"id {int(arr[bad[0]])} at position {int(bad[0])} is not an audio token id "
                                 f"[{AUDIO_ID_OFFSET}, {AUDIO_ID_OFFSET + self.num_audio_tokens})")
        return arr


def audio_token_string(ids) -> str:
    """`"<audio_a><audio_b>..."` of LLM audio ids (65536 + N), no separators: the string form the official
    code builds with `merge_vq0206_to_token_str`."""
    return "".join(f"<audio_{int(i) - AUDIO_ID_OFFSET}>" for i in np.asarray(ids).reshape(-1))
