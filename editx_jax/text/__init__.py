"""The LM's text side: the SentencePiece text tokenizer and the edit / clone prompts (architecture.md §1.6-1.8,
§1.10).

`TextTokenizer` reads the released `tokenizer.model` and encodes text the way the official code's HF tokenizer
does (transformers 4.53.3, `LlamaTokenizer` config with `legacy: false`, loaded as the fast tokenizer): added
and special tokens (`<s>`, `<|BOT|>`, `<audio_N>`, ...) are cut out of the text first, the SentencePiece
normalizer is off, spaces become `▁`, and a `▁` is put in front of the text only where it starts the whole
string. `encode` never adds BOS by itself.

`prompts` holds the exact prompt strings, the supported edit values, and the token-level assembly of the
official `tts.py` (`build_edit_ids`, `build_clone_ids`) and of the chat template used in training
(`chat_template_ids`).

The BOS question of §1.8.2: `tts.py` calls `tokenizer.encode(s)` with default arguments for every segment, so
each segment gets what the checkpoint's `tokenizer_config.json` makes HF add. The released file has no
`add_bos_token` key, HF's default (True) applies, and the official prompts read `1, 4, 1, ▁system, ...`.
`TextTokenizer` reads that file (`TokenizerSettings`) and the builders follow it (`TextTokenizer.special_ids`).
The clone target text is unaffected either way: it is cut as `enc("\\n" + text)[len(enc("\\n")):]`, which drops
BOS and the `▁` together. See `prompts.py` for the full reasoning.
"""

from editx_jax.text.prompts import (  # noqa: F401
    EDIT_TYPES,
    EDIT_VALUES,
    EditError,
    build_clone_ids,
    build_edit_ids,
    chat_template,
    chat_template_ids,
    clone_speaker_id,
)
from editx_jax.text.tokenizer import TextTokenizer, TokenizerError, TokenizerSettings  # noqa: F401
