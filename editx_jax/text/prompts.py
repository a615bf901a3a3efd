"""Exact prompt strings, supported edit values, and the token-level prompt assembly (architecture.md §1.8, §1.10).

Two assemblies of the same chat exist upstream:

* Official inference (`tts.py`), reproduced by `build_edit_ids` / `build_clone_ids`: each segment is encoded
  on its own with `tokenizer.encode(s)` and glued with literal ids,

      edit:  [1, 4] + enc("system\\n" + SYS) + [3, 4] + enc("human\\n") + enc(prefix + "\\n" + AUDIO + "\\n")
             + [3, 4] + enc("assistant\\n")
      clone: [1, 4] + enc("system\\n" + CLONE_SYS) + [3, 4] + enc("human\\n") + TGT + [3, 4] + enc("assistant\\n")
             with TGT = enc("\\n" + target_text)[len(enc("\\n")):]

* Training (TRL `apply_chat_template`), reproduced by `chat_template_ids`: the string
  `<s><|BOT|> system\\n{SYS}<|EOT|><|BOT|> human\\n{USER}<|EOT|><|BOT|> assistant\\n` tokenized once.

BOS decision. `enc` is HF `tokenizer.encode` with its default `add_special_tokens=True`, so what it puts around
a segment comes from the checkpoint's `tokenizer_config.json` (`TextTokenizer.special_ids`, from its
`add_bos_token` / `add_eos_token`, HF LlamaTokenizerFast defaults True / False where absent). The released file
names `LlamaTokenizer`, sets `legacy: false` and has no `add_bos_token` key; `AutoTokenizer` (transformers
4.53.3, pinned upstream) builds a `LlamaTokenizerFast` whose post-processor puts BOS (1) in front of every
`encode` result. So the prompt `tts.py` feeds the model is `1, 4, 1, ▁system, ...`, with BOS again before
`▁human`, before the edit instruction and before `▁assistant`: 4 inner BOS in an edit prompt, 3 in a clone
prompt (TGT loses its BOS with the cut). A folder whose config says `add_bos_token: false` gives prompts without
inner BOS. The chat template has no inner BOS, and its edit human turn starts `Make` where `tts.py`'s starts
`▁Make` (the instruction keeps its `▁`, as `enc` always gives it).

Audio tokens are spliced in as ids (65536 + N), never rendered to `<audio_N>` strings and re-tokenized: the
result is the same (they are added tokens, cut out of the text before SentencePiece), and it is faster.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import soundfile as sf

from editx_jax.text.tokenizer import BOS_ID, BOT_ID, EOT_ID, Part, TextTokenizer, TokenizerError

# ---------------------------------------------------------------------- exact strings (§1.8.1)

EDIT_SYSTEM_PROMPT = (
    "As a highly skilled audio editing and tuning specialist, you excel in interpreting user instructions and "
    "applying precise adjustments to meet their needs. Your expertise spans a wide range of enhancement "
    "capabilities, including but not limited to:\n"
    "# Emotional Enhancement\n"
    "# Speaking Style Transfer\n"
    "# Non-linguistic Adjustments\n"
    "# Audio Tuning & Editing\n"
    "Note: You will receive instructions in natural language and are expected to accurately interpret and "
    "execute the most suitable audio edits and enhancements.\n"
)

# The clone system prompt, split where the prompt's audio tokens go. Trailing spaces after "text:" and
# "tokens:" are part of the template.
CLONE_SYSTEM_HEAD = (
    "Generate audio with the following timbre, prosody and speaking style\n"
    "\n"
    "[speaker_start]\n"
    "speaker name: {speaker}\n"
    "speaker prompt text: \n"
    "{prompt_text}\n"
    "speaker audio tokens: \n"
)
CLONE_SYSTEM_TAIL = "\n[speaker_end]\n"
CLONE_SYSTEM_PROMPT_TEMPLATE = CLONE_SYSTEM_HEAD + "{prompt_wav_tokens}" + CLONE_SYSTEM_TAIL

DEFAULT_SPEAKER = "debug"  # what earlier versions and all peers use instead of clone_<hash>

_MORE = "Make the following audio more {info}. The text corresponding to the audio is: {text}\n"
_MORE_STYLE = "Make the following audio more {info} style. The text corresponding to the audio is: {text}\n"
_REMOVE_EMOTION = "Remove any emotion in the following audio and the reference text is: {text}\n"
_REMOVE_STYLE = "Remove any speaking styles in the following audio and the reference text is: {text}\n"
_DENOISE = ("Remove any noise from the given audio while preserving the voice content clearly. Ensure that the "
            "speech quality remains intact with minimal distortion, and eliminate all noise from the audio.\n")
_VAD = ("Remove any silent portions from the given audio while preserving the voice content clearly. Ensure that "
        "the speech quality remains intact with minimal distortion, and eliminate all silence from the audio.\n")
# Space before ":" and two spaces before "The" are as upstream writes them.
_PARALINGUISTIC = ("Add some non-verbal sounds to make the audio more natural, the new text is : {new_text}\n"
                   "  The text corresponding to the audio is: {text}\n")

# Training data only: any edit type the inference prompts do not know (upstream's dataset fallback).
_GENERIC = "Edit the audio based on text: {text}\n"

# ---------------------------------------------------------------------- edit values (§1.10)

EMOTIONS = ("happy", "angry", "sad", "humour", "confusion", "disgusted", "empathy", "embarrass", "fear",
            "surprised", "excited", "depressed", "coldness", "admiration")
STYLES = ("serious", "arrogant", "child", "older", "girl", "pure", "sister", "sweet", "ethereal", "whisper",
          "gentle", "recite", "generous", "act_coy", "warm", "shy", "comfort", "authority", "chat", "radio",
          "soulful", "story", "vivid", "program", "news", "advertising", "roar", "murmur", "shout", "deeply",
          "loudly", "exaggerated")
SPEEDS = ("faster", "slower", "more faster", "more slower")
PARALINGUISTIC_TAGS = ("[Breathing]", "[Laughter]", "[Surprise-oh]", "[Confirmation-en]", "[Uhm]",
                       "[Surprise-ah]", "[Surprise-wa]", "[Sigh]", "[Question-ei]", "[Dissatisfaction-hnn]")
REMOVE = "remove"

# Edit type -> accepted edit_info values; an empty tuple means the type takes no edit_info.
EDIT_VALUES: dict[str, tuple[str, ...]] = {
    "emotion": EMOTIONS + (REMOVE,),
    "style": STYLES + (REMOVE,),
    "speed": SPEEDS,
    "paralinguistic": (),
    "denoise": (),
    "vad": (),
}
EDIT_TYPES = ("clone",) + tuple(EDIT_VALUES)
NO_TEXT_EDITS = ("denoise", "vad")  # the only edits that need no transcript of the source audio

# Target-text prefixes; Mandarin and English need none (README).
LANGUAGE_TAGS = {"sichuanese": "[Sichuanese]", "cantonese": "[Cantonese]", "japanese": "[Japanese]",
                 "korean": "[Korean]"}
UNTAGGED_LANGUAGES = ("mandarin", "english")


class EditError(ValueError):
    """An edit or clone request that cannot become a prompt."""


def list_edits() -> str:
    """Every supported edit type and value, one type per line (for `--list-edits`)."""
    lines = ["clone: (prompt audio + prompt text + target text)"]
    for edit_type, values in EDIT_VALUES.items():
        if values:
            lines.append(f"{edit_type}: {', '.join(values)}")
        elif edit_type == "paralinguistic":
            lines.append(f"paralinguistic: (new text with inline tags: {' '.join(PARALINGUISTIC_TAGS)})")
        else:
            lines.append(f"{edit_type}: (no value, no transcript needed)")
    lines.append(f"languages (tag before the target text): {', '.join(LANGUAGE_TAGS.values())}; "
                 f"{' and '.join(UNTAGGED_LANGUAGES)} need none")
    return "\n".join(lines)


def with_language(text: str, language: str | None) -> str:
    """`text` with the language/dialect tag put in front (`[Cantonese]...`), unless it already has it."""
    if language is None or language.lower() in UNTAGGED_LANGUAGES:
        return text
    tag = LANGUAGE_TAGS.get(language.lower())
    if tag is None:
        valid = ", ".join(tuple(LANGUAGE_TAGS) + UNTAGGED_LANGUAGES)
        raise EditError(f"unknown language {language!r}; valid: {valid}")
    return text if text.startswith(tag) else tag + text


def edit_instruction(edit_type: str, edit_info: str | None, audio_text: str | None,
                     new_text: str | None = None) -> str:
    """The instruction prefix (`_build_audio_edit_instruction`); validates the request. Ends with `\\n`."""
    if edit_type not in EDIT_VALUES:
        hint = " (clone prompts come from build_clone_ids)" if edit_type == "clone" else ""
        raise EditError(f"unknown edit type {edit_type!r}{hint}; valid: {', '.join(EDIT_VALUES)}")
    values = EDIT_VALUES[edit_type]
    if values and edit_info not in values:
        raise EditError(f"unknown {edit_type} value {edit_info!r}; valid: {', '.join(values)}")
    text = audio_text.strip() if audio_text else ""
    if not text and edit_type not in NO_TEXT_EDITS:
        raise EditError(f"a {edit_type} edit needs the transcript of the source audio (audio_text)")
    if edit_type == "paralinguistic" and (not new_text or not new_text.strip()):
        raise EditError("a paralinguistic edit needs new_text: the transcript with inline tags such as [Laughter]")
    return _instruction(edit_type, edit_info, text, new_text)


def training_edit_instruction(edit_type: str, edit_info, source_text: str, new_text: str | None = None) -> str:
    """The instruction prefix of upstream's SFT / DPO / GRPO *training* datasets (upstream-training.md §1.2),
    from the same strings as `edit_instruction`: no validation (training data may carry any edit type or
    value; unknown types get the generic instruction), `edit_info` None reads "", and the paralinguistic
    "new text" is the source text unless given (what every upstream training dataset passes)."""
    info = "" if edit_info is None else str(edit_info)
    return _instruction(edit_type, info, source_text.strip(), source_text if new_text is None else new_text)


def _instruction(edit_type: str, info: str, text: str, new_text: str | None) -> str:
    """The one formatting of the edit instruction strings, shared by inference and training prompts."""
    if edit_type in ("emotion", "speed"):
        return _REMOVE_EMOTION.format(text=text) if info == REMOVE else _MORE.format(info=info, text=text)
    if edit_type == "style":
        return _REMOVE_STYLE.format(text=text) if info == REMOVE else _MORE_STYLE.format(info=info, text=text)
    if edit_type == "denoise":
        return _DENOISE
    if edit_type == "vad":
        return _VAD
    if edit_type == "paralinguistic":
        return _PARALINGUISTIC.format(new_text=new_text, text=text)
    return _GENERIC.format(text=text)


def clone_system_prompt(speaker: str, prompt_text: str, prompt_wav_tokens: str) -> str:
    """The clone system prompt as a string (audio tokens as `<audio_N>` text)."""
    return CLONE_SYSTEM_PROMPT_TEMPLATE.format(speaker=speaker, prompt_text=prompt_text,
                                               prompt_wav_tokens=prompt_wav_tokens)


# ---------------------------------------------------------------------- token-level assembly (§1.8.2)


def _audio(tok: TextTokenizer, ids, what: str) -> np.ndarray:
    try:
        arr = tok.check_audio_ids(ids)
    except TokenizerError as e:
        raise EditError(f"{what}: {e}") from None
    if arr.size == 0:
        raise EditError(f"{what} is empty")
    return arr


def _enc(tok: TextTokenizer):
    """`tokenizer.encode(s)` of `tts.py`: with the BOS / EOS the tokenizer's settings add (module doc)."""
    head, tail = tok.special_ids()

    def enc(*parts: Part) -> list[int]:
        return head + tok.encode_parts(parts) + tail
    return enc


def build_edit_ids(tok: TextTokenizer, edit_type: str, edit_info: str | None, audio_text: str | None,
                   audio_ids, new_text: str | None = None) -> list[int]:
    """Prompt ids of an edit, as `tts.py::_encode_audio_edit_prompt` builds them."""
    prefix = edit_instruction(edit_type, edit_info, audio_text, new_text)
    audio = _audio(tok, audio_ids, "audio_ids")
    enc = _enc(tok)
    return ([BOS_ID, BOT_ID] + enc("system\n" + EDIT_SYSTEM_PROMPT) + [EOT_ID, BOT_ID] + enc("human\n")
            + enc(prefix + "\n", audio, "\n") + [EOT_ID, BOT_ID] + enc("assistant\n"))


def build_clone_ids(tok: TextTokenizer, prompt_text: str, prompt_audio_ids, target_text: str,
                    speaker: str = DEFAULT_SPEAKER, *, language: str | None = None) -> list[int]:
    """Prompt ids of a clone, as `tts.py::_encode_audio_edit_clone_prompt` builds them. `speaker` is
    "debug" or `clone_speaker_id(...)`; `language` puts its tag in front of the target text."""
    if not prompt_text or not prompt_text.strip():
        raise EditError("clone needs prompt_text: the transcript of the prompt audio")
    if not target_text or not target_text.strip():
        raise EditError("clone needs target_text: the text to speak")
    target_text = with_language(target_text, language)
    audio = _audio(tok, prompt_audio_ids, "prompt_audio_ids")
    enc = _enc(tok)
    head = CLONE_SYSTEM_HEAD.format(speaker=speaker, prompt_text=prompt_text)
    # Whatever enc puts in front of a lone "\n" (BOS, "▁") is cut off the target, so it starts bare.
    target = enc("\n" + target_text)[len(enc("\n")):]
    return ([BOS_ID, BOT_ID] + enc("system\n" + head, audio, CLONE_SYSTEM_TAIL) + [EOT_ID, BOT_ID]
            + enc("human\n") + target + [EOT_ID, BOT_ID] + enc("assistant\n"))


def chat_template(system: str, user: str, assistant: str | None = None) -> str:
    """The Step1 chat template as a string (what TRL's `apply_chat_template` renders). With `assistant=None`
    it ends with the generation prompt; a final assistant message gets no `<|EOT|>`."""
    text = f"<s><|BOT|> system\n{system}<|EOT|><|BOT|> human\n{user}<|EOT|><|BOT|> assistant\n"
    return text if assistant is None else text + assistant


def chat_template_ids(tok: TextTokenizer, system: Sequence[Part], user: Sequence[Part],
                      assistant: Sequence[Part] = ()) -> list[int]:
    """Ids of `chat_template(...)` tokenized once with no added special tokens (training's path), built from
    parts so audio ids are spliced in: `system` / `user` / `assistant` are sequences of strings and id runs."""
    def turn(parts: Sequence[Part]) -> list[int]:
        return tok.encode_parts(list(parts), prefix_space=False)
    return ([BOS_ID, BOT_ID] + turn([" system\n", *system]) + [EOT_ID, BOT_ID] + turn([" human\n", *user])
            + [EOT_ID, BOT_ID] + turn([" assistant\n", *assistant]))


def edit_turns(edit_type: str, edit_info: str | None, audio_text: str | None, audio_ids,
               new_text: str | None = None) -> tuple[list[Part], list[Part]]:
    """(system parts, user parts) of an edit chat, for `chat_template_ids`."""
    prefix = edit_instruction(edit_type, edit_info, audio_text, new_text)
    return [EDIT_SYSTEM_PROMPT], [prefix + "\n", np.asarray(audio_ids), "\n"]


def clone_turns(prompt_text: str, prompt_audio_ids, user_text: str,
                speaker: str = DEFAULT_SPEAKER) -> tuple[list[Part], list[Part]]:
    """(system parts, user parts) of a clone chat, for `chat_template_ids`. Training puts the prompt's own
    transcript in the user turn; inference puts the target text there."""
    head = CLONE_SYSTEM_HEAD.format(speaker=speaker, prompt_text=prompt_text)
    return [head, np.asarray(prompt_audio_ids), CLONE_SYSTEM_TAIL], [user_text]


# ---------------------------------------------------------------------- clone speaker name


def clone_speaker_id(prompt_text: str, wav) -> str:
    """`clone_` + first 16 hex of sha256(utf-8 prompt text ‖ float32 bytes of the first and last 1000 samples).

    `wav` is the raw loaded audio as torchaudio returns it: float32 [channels, frames] (or [frames] for mono),
    before any mono mix or normalization; channels are flattened channel-major. At most 2000 samples: all.
    """
    flat = np.ascontiguousarray(np.asarray(wav, dtype=np.float32)).reshape(-1)
    sample = np.concatenate([flat[:1000], flat[-1000:]]) if flat.size > 2000 else flat
    digest = hashlib.sha256(prompt_text.encode("utf-8") + sample.tobytes()).hexdigest()
    return "clone_" + digest[:16]


def clone_speaker_id_from_file(prompt_text: str, path: str) -> str:
    """`clone_speaker_id` of an audio file, read as torchaudio would (float32, int PCM / 2^(bits-1))."""
    wav, _ = sf.read(path, dtype="float32", always_2d=True)  # [frames, channels]
    return clone_speaker_id(prompt_text, wav.T)
