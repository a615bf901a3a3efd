"""A small SentencePiece model with the released id layout, trained offline in a second.

For tests and the built-in demo, where the released `tokenizer.model` is not available:
unk 0, `<s>` 1, `</s>` 2, `<|EOT|>` 3, `<|BOT|>` 4, byte fallback, `<audio_N>` at 65536 + N for
N < 5120, 74,752 pieces in all. SentencePiece's default normalisation is left on in the trained
model on purpose: `TextTokenizer` must turn it off, as HF's non-legacy conversion does.
"""

from __future__ import annotations

import io
from typing import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from editx_jax.text import prompts
from editx_jax.vocab import AUDIO_ID_END, AUDIO_ID_OFFSET, AUDIO_TOKENS

VOCAB_SIZE = 74752


def default_corpus() -> list[str]:
    """The prompt strings themselves plus a few sentences in English and Chinese."""
    lines = [line for line in prompts.EDIT_SYSTEM_PROMPT.split("\n") if line]
    lines += [line for line in prompts.clone_system_prompt("debug", "hello there", "").split("\n") if line]
    for edit_type, values in (("emotion", prompts.EMOTIONS), ("style", prompts.STYLES), ("speed", prompts.SPEEDS)):
        lines += [prompts.edit_instruction(edit_type, v, "the weather is nice today").strip() for v in values]
    lines += [prompts.edit_instruction(t, None, "the weather is nice today").strip() for t in ("denoise", "vad")]
    lines += [prompts.edit_instruction("paralinguistic", None, "the weather is nice today",
                                       "the weather [Laughter] is nice today").strip()]
    lines += ["system human assistant"] * 5
    lines += ["今天天气很好，我们出去走走吧。", "Hello world, this is a small test.",
              "What a lovely day it is to speak in a cloned voice."]
    return lines


def train_layout_model(corpus: Iterable[str] | None = None, vocab_size: int = 700) -> bytes:
    """Serialized SentencePiece model bytes with the released special-token and audio-id layout."""
    corpus = list(corpus or default_corpus())
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20), model_writer=writer, model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, control_symbols=["<|EOT|>", "<|BOT|>"], user_defined_symbols=["<|spare_5|>"], minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(writer.getvalue())
    kind = pb.ModelProto.SentencePiece
    for i in range(len(proto.pieces), AUDIO_ID_OFFSET):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"<unused_{i}>", 0.0, kind.UNUSED
    for n in range(AUDIO_TOKENS):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"<audio_{n}>", 0.0, kind.USER_DEFINED
    for i in range(AUDIO_ID_END, VOCAB_SIZE):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"<reserved_{i}>", 0.0, kind.USER_DEFINED
    return proto.SerializeToString()
