"""Text tokenizer and prompt assembly (architecture.md §1.6-1.8, §1.10).

The real `tokenizer.model` is not shipped with the tests, so a small SentencePiece Unigram model with the
released layout is trained here, offline: unk 0, `<s>` 1, `</s>` 2, `<|EOT|>` 3, `<|BOT|>` 4, byte fallback,
`<audio_N>` at 65536 + N for N < 5120, 74,752 pieces in all. The expected prompts are assembled plainly
from the strings as architecture.md §1.8.1 prints them, as whole strings with `<audio_N>` text, the way
`tts.py` does it. Set EDITX_TEXT_TOKENIZER to the released tokenizer.model (or its folder) to also check
the ids verified against the real tokenizer.
"""

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf

from conftest import AUDIO

from editx_jax.text import prompts
from editx_jax.text.prompts import EditError, build_clone_ids, build_edit_ids, chat_template, chat_template_ids
from editx_jax.text.tiny import train_layout_model
from editx_jax.text.tokenizer import TextTokenizer, TokenizerError, TokenizerSettings, audio_token_string

# ---------------------------------------------------------------- the strings, as architecture.md prints them

SYS_EDIT = (
    "As a highly skilled audio editing and tuning specialist, you excel in interpreting user instructions and applying precise adjustments to meet their needs. Your expertise spans a wide range of enhancement capabilities, including but not limited to:\n"  # noqa: E501
    "# Emotional Enhancement\n"
    "# Speaking Style Transfer\n"
    "# Non-linguistic Adjustments\n"
    "# Audio Tuning & Editing\n"
    "Note: You will receive instructions in natural language and are expected to accurately interpret and execute the most suitable audio edits and enhancements.\n"  # noqa: E501
)


def clone_sys(speaker, prompt_text, wav_tokens):
    return ("Generate audio with the following timbre, prosody and speaking style\n"
            "\n"
            "[speaker_start]\n"
            f"speaker name: {speaker}\n"
            "speaker prompt text: \n"
            f"{prompt_text}\n"
            "speaker audio tokens: \n"
            f"{wav_tokens}\n"
            "[speaker_end]\n")


def prefix_for(edit_type, info, text, new_text=None):
    t = text.strip()
    if edit_type in ("emotion", "speed") and info == "remove":
        return "Remove any emotion in the following audio and the reference text is: " + t + "\n"
    if edit_type in ("emotion", "speed"):
        return "Make the following audio more " + info + ". The text corresponding to the audio is: " + t + "\n"
    if edit_type == "style" and info == "remove":
        return "Remove any speaking styles in the following audio and the reference text is: " + t + "\n"
    if edit_type == "style":
        return ("Make the following audio more " + info + " style. The text corresponding to the audio is: "
                + t + "\n")
    if edit_type == "denoise":
        return ("Remove any noise from the given audio while preserving the voice content clearly. Ensure that "
                "the speech quality remains intact with minimal distortion, and eliminate all noise from the "
                "audio.\n")
    if edit_type == "vad":
        return ("Remove any silent portions from the given audio while preserving the voice content clearly. "
                "Ensure that the speech quality remains intact with minimal distortion, and eliminate all "
                "silence from the audio.\n")
    assert edit_type == "paralinguistic"
    return ("Add some non-verbal sounds to make the audio more natural, the new text is : " + new_text + "\n"
            "  The text corresponding to the audio is: " + t + "\n")


EMOTIONS = "happy angry sad humour confusion disgusted empathy embarrass fear surprised excited depressed " \
           "coldness admiration remove".split()
STYLES = "serious arrogant child older girl pure sister sweet ethereal whisper gentle recite generous act_coy " \
         "warm shy comfort authority chat radio soulful story vivid program news advertising roar murmur shout " \
         "deeply loudly remove exaggerated".split()
SPEEDS = ["faster", "slower", "more faster", "more slower"]
TAGS = "[Breathing] [Laughter] [Surprise-oh] [Confirmation-en] [Uhm] [Surprise-ah] [Surprise-wa] [Sigh] " \
       "[Question-ei] [Dissatisfaction-hnn]".split()

ALL_EDITS = ([("emotion", v) for v in EMOTIONS] + [("style", v) for v in STYLES] + [("speed", v) for v in SPEEDS]
             + [("denoise", None), ("vad", None), ("paralinguistic", None)])

# ---------------------------------------------------------------- a small model with the released layout (editx_jax.text.tiny)


@pytest.fixture(scope="module")
def model_bytes():
    return train_layout_model()


@pytest.fixture(scope="module")
def tok(model_bytes):
    return TextTokenizer(model_bytes)


@pytest.fixture(scope="module")
def tok_no_bos(model_bytes):
    """The same model with a tokenizer_config.json that turns HF's add_bos_token off."""
    return TextTokenizer(model_bytes, {"legacy": False, "add_bos_token": False})


@pytest.fixture(params=[True, False], ids=["inner_bos", "no_inner_bos"])
def tok_bos(request, tok, tok_no_bos):
    """(tokenizer, whether its encode adds BOS)."""
    return (tok, True) if request.param else (tok_no_bos, False)


def audio_ids(n, seed=0):
    return (65536 + np.random.default_rng(seed).integers(0, 5120, size=n)).astype(np.int64)


def ref_edit(tok, edit_type, info, text, ids, new_text=None, inner_bos=True):
    """tts.py's `_encode_audio_edit_prompt`, with the audio as its `<audio_N>` string."""
    def enc(s):
        return ([1] if inner_bos else []) + tok.encode(s)
    prefix = prefix_for(edit_type, info, text, new_text)
    audio = "".join(f"<audio_{i - 65536}>" for i in ids)
    return ([1] + [4] + enc("system\n" + SYS_EDIT) + [3] + [4] + enc("human\n") + enc(prefix + "\n" + audio + "\n")
            + [3] + [4] + enc("assistant\n"))


def ref_clone(tok, prompt_text, ids, target, speaker="debug", inner_bos=True):
    """tts.py's `_encode_audio_edit_clone_prompt`, with the audio as its `<audio_N>` string."""
    def enc(s):
        return ([1] if inner_bos else []) + tok.encode(s)
    audio = "".join(f"<audio_{i - 65536}>" for i in ids)
    tgt = enc("\n" + target)[len(enc("\n")):]
    return ([1] + [4] + enc("system\n" + clone_sys(speaker, prompt_text, audio)) + [3] + [4] + enc("human\n") + tgt
            + [3] + [4] + enc("assistant\n"))


# ---------------------------------------------------------------- tokenizer


def test_layout(tok):
    assert tok.vocab_size == 74752 and tok.num_audio_tokens == 5120
    assert [tok.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>"]
    assert tok.audio_id(0) == 65536 and tok.audio_id(5119) == 70655
    assert tok.piece_to_id("<audio_1>") == 65537 and tok.is_audio(70655) and not tok.is_audio(70656)
    assert tok.id_to_piece(tok.encode("\n", prefix_space=False)[0]) == "<0x0A>"  # newline is a byte piece
    with pytest.raises(TokenizerError, match="audio_5120"):
        tok.audio_id(5120)


def test_encode_follows_hf_non_legacy_rules(tok, model_bytes):
    piece = tok.piece_to_id
    nl = piece("<0x0A>")
    # Stock SentencePiece adds the dummy "▁" to plain ASCII: the pieces of "▁assistant", found independently.
    assistant = spm.SentencePieceProcessor(model_proto=model_bytes).encode("assistant")
    assert tok.id_to_piece(assistant[0]).startswith("▁")
    # §1.6's verified example, on this vocabulary: specials cut out, " assistant" -> ▁assistant, no dummy prefix.
    assert tok.encode("<s><|BOT|> assistant\n<audio_1><|EOT|>") == [1, 4, *assistant, nl, 65537, 3]
    # "▁" only before text that starts the string.
    assert tok.encode("assistant\n") == [*assistant, nl]
    assert tok.encode("assistant\n", prefix_space=False) != tok.encode("assistant\n")
    assert tok.encode("<audio_3>assistant") == [65539] + tok.encode("assistant", prefix_space=False)
    # Control and user-defined pieces are split out anywhere; "<foo>"-like text that is no piece stays text.
    assert tok.encode("a<|spare_5|>b") == tok.encode("a") + [piece("<|spare_5|>")] + tok.encode("b", prefix_space=False)
    assert tok.decode(tok.encode("x <audio_9x> <audio_> y")) == "x <audio_9x> <audio_> y"
    # No normalization: double spaces, full-width and unseen characters survive (byte fallback), and the
    # decoder gives the text back.
    for text in ["two  spaces", "ＡＢ full width", "tab\there", "émoji 🎉 ok", "line\n\nbreaks\n",
                 "今天天气很好"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([1, 4, *assistant, nl, 65537, 3]) == "<s><|BOT|> assistant\n<audio_1><|EOT|>"
    assert tok.decode([1, 4, 65537, 3], skip_special_tokens=True) == "<audio_1>"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([74752])


def test_spliced_audio_ids_equal_tokenised_strings(tok):
    ids = audio_ids(37)
    text = "intro\n" + audio_token_string(ids) + "\n[speaker_end]\n"
    assert tok.encode_parts(["intro\n", ids, "\n[speaker_end]\n"]) == tok.encode(text)
    text = "intro\n" + audio_token_string(ids) + "\n"
    assert tok.encode_parts(["intro\n", ids, "\n"], prefix_space=False) == tok.encode(text, prefix_space=False)
    # An empty id run joins its neighbours, as the string would.
    assert tok.encode_parts(["a b", [], " c"]) == tok.encode("a b c")
    assert tok.encode_parts([ids[:2], "hi"]) == list(ids[:2]) + tok.encode("hi", prefix_space=False)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        TextTokenizer(tmp_path / "missing.model")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        TextTokenizer.from_pretrained(tmp_path)


def test_load_from_folder(tmp_path, model_bytes, tok):
    (tmp_path / "tokenizer.model").write_bytes(model_bytes)
    assert TextTokenizer.from_pretrained(tmp_path).encode("hello world") == tok.encode("hello world")


# ---------------------------------------------------------------- tokenizer_config.json


RELEASED_KEYS = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>", "eos_token": "</s>",
                 "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 65536, "padding_side": "left",
                 "clean_up_tokenization_spaces": False, "use_default_system_prompt": False,
                 "chat_template": "{{ bos_token }}..."}  # architecture.md §1.6: no add_bos_token key


def test_settings_follow_hf_defaults_for_absent_keys():
    s = TokenizerSettings.from_hf_config(RELEASED_KEYS)
    assert (s.add_bos_token, s.add_eos_token, s.legacy) == (True, False, False)  # HF LlamaTokenizerFast defaults
    s = TokenizerSettings.from_hf_config({"legacy": False, "add_bos_token": False, "add_eos_token": True,
                                          "bos_token": {"content": "<s>", "lstrip": False}, "pad_token": None})
    assert (s.add_bos_token, s.add_eos_token, s.bos_token, s.pad_token) == (False, True, "<s>", None)
    for bad, needle in [({}, "non-legacy"), ({"legacy": True}, "non-legacy"),
                        ({"legacy": False, "add_prefix_space": True}, "add_prefix_space"),
                        ({"legacy": False, "add_bos_token": "yes"}, "true or false"),
                        ({"legacy": False, "eos_token": 7}, "token string"), ([], "JSON object")]:
        with pytest.raises(TokenizerError, match=needle):
            TokenizerSettings.from_hf_config(bad)


def test_settings_read_beside_the_model(tmp_path, model_bytes, tok):
    (tmp_path / "tokenizer.model").write_bytes(model_bytes)
    assert TextTokenizer.from_pretrained(tmp_path).special_ids() == ([1], [])  # no config: the released one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(RELEASED_KEYS))
    released = TextTokenizer.from_pretrained(tmp_path / "tokenizer.model")
    assert released.special_ids() == ([1], []) and released.hf_config == RELEASED_KEYS
    ids = audio_ids(7)
    assert build_edit_ids(released, "emotion", "sad", "t", ids) == ref_edit(tok, "emotion", "sad", "t", ids)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**RELEASED_KEYS, "add_bos_token": False}))
    plain = TextTokenizer.from_pretrained(tmp_path)
    got = build_edit_ids(plain, "emotion", "sad", "t", ids)
    assert got == ref_edit(tok, "emotion", "sad", "t", ids, inner_bos=False) and got.count(1) == 1
    out = tmp_path / "copy"
    out.mkdir()
    plain.save(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert TextTokenizer.from_pretrained(out).special_ids() == ([], [])
    # add_eos_token: HF's encode appends EOS to every segment, the clone target cut included
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**RELEASED_KEYS, "add_eos_token": True}))
    eos = TextTokenizer.from_pretrained(tmp_path)
    enc = lambda text: [1] + tok.encode(text) + [2]  # noqa: E731
    want = ([1, 4] + enc("system\n" + clone_sys("debug", "p", audio_token_string(ids))) + [3, 4] + enc("human\n")
            + enc("\nsay it")[len(enc("\n")):] + [3, 4] + enc("assistant\n"))
    assert build_clone_ids(eos, "p", ids, "say it") == want
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**RELEASED_KEYS, "bos_token": "<bos>"}))
    with pytest.raises(TokenizerError, match="bos_token '<bos>' is not a piece"):
        TextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        TextTokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------- prompts


def test_every_edit_matches_the_official_assembly(tok_bos):
    tok, inner_bos = tok_bos
    text = "  the weather is nice today "  # the transcript is stripped in the instruction
    new_text = "the weather [Laughter] is nice [Sigh] today"
    ids = audio_ids(23, seed=1)
    assert len(ALL_EDITS) == 15 + 33 + 4 + 3
    for edit_type, info in ALL_EDITS:
        nt = new_text if edit_type == "paralinguistic" else None
        got = build_edit_ids(tok, edit_type, info, text, ids, new_text=nt)
        want = ref_edit(tok, edit_type, info, text, ids, nt, inner_bos=inner_bos)
        assert got == want, (edit_type, info)
        assert got[:2] == [1, 4]
        assert got.count(1) == (5 if inner_bos else 1)  # outer BOS + one per enc() call
        assert got.count(3) == 2 and got.count(4) == 3
        assert np.array_equal(np.array([i for i in got if i >= 65536]), ids)


def test_instruction_strings_exact():
    assert prompts.edit_instruction("paralinguistic", None, " hi ", "hi [Laughter]") == (
        "Add some non-verbal sounds to make the audio more natural, the new text is : hi [Laughter]\n"
        "  The text corresponding to the audio is: hi\n")
    assert prompts.edit_instruction("speed", "more faster", "x") == (
        "Make the following audio more more faster. The text corresponding to the audio is: x\n")
    assert prompts.edit_instruction("denoise", None, None).endswith("all noise from the audio.\n")
    assert prompts.clone_system_prompt("debug", "p", "<audio_1>") == clone_sys("debug", "p", "<audio_1>")
    assert prompts.EDIT_SYSTEM_PROMPT == SYS_EDIT
    assert len(prompts.EMOTIONS) == 14 and len(prompts.STYLES) == 32 and prompts.PARALINGUISTIC_TAGS == tuple(TAGS)
    listing = prompts.list_edits()
    for value in EMOTIONS + STYLES + SPEEDS + TAGS + ["denoise", "vad", "clone", "[Cantonese]"]:
        assert value in listing


def test_clone_matches_the_official_assembly(tok_bos):
    tok, inner_bos = tok_bos
    ids = audio_ids(31, seed=2)
    for target in ["What a lovely day it is.", "  leading spaces", "今天天气很好", "[Laughter] ha"]:
        got = build_clone_ids(tok, "hello there ", ids, target, speaker="clone_0123456789abcdef")
        assert got == ref_clone(tok, "hello there ", ids, target, "clone_0123456789abcdef", inner_bos)
        # The target carries neither BOS nor the "▁" dummy prefix: it tokenizes as a continuation.
        tail = tok.encode(target, prefix_space=False) + [3, 4] + ([1] if inner_bos else []) \
            + tok.encode("assistant\n")
        assert got[-len(tail):] == tail
    tagged = build_clone_ids(tok, "p", ids, "你好", language="cantonese")
    assert tagged == ref_clone(tok, "p", ids, "[Cantonese]你好", inner_bos=inner_bos)
    assert prompts.with_language("[Korean]x", "Korean") == "[Korean]x"
    assert prompts.with_language("x", "english") == "x"


def test_chat_template_equivalence(tok, tok_no_bos):
    """The template string tokenized once (training's path) against the id-level builders."""
    ids, src = audio_ids(12, seed=3), audio_ids(9, seed=4)
    # Clone: template ids == official assembly without inner BOS.
    system, user = prompts.clone_turns("hello there", ids, "What a lovely day.")
    text = chat_template(clone_sys("debug", "hello there", audio_token_string(ids)), "What a lovely day.")
    assert chat_template_ids(tok, system, user) == tok.encode(text)
    assert tok.encode(text) == build_clone_ids(tok_no_bos, "hello there", ids, "What a lovely day.")
    # Edit, with a completion: template ids == official assembly without inner BOS, except that the
    # instruction tokenizes as a continuation of " human\n" ("Make", not "▁Make").
    system, user = prompts.edit_turns("emotion", "happy", "hi there", ids)
    prefix = prefix_for("emotion", "happy", "hi there")
    text = chat_template(SYS_EDIT, prefix + "\n" + audio_token_string(ids) + "\n", audio_token_string(src))
    templ = chat_template_ids(tok, system, user, [src])
    assert templ == tok.encode(text)
    official = build_edit_ids(tok_no_bos, "emotion", "happy", "hi there", ids) + list(src)
    first_word = tok.encode(prefix + "\n" + audio_token_string(ids) + "\n")
    continued = tok.encode(prefix + "\n" + audio_token_string(ids) + "\n", prefix_space=False)
    assert first_word != continued
    start = official.index(3) + 2 + len(tok.encode("human\n"))
    assert official[start:start + len(first_word)] == first_word
    assert templ == official[:start] + continued + official[start + len(first_word):]


def test_bad_input(tok):
    ids = audio_ids(5)
    with pytest.raises(EditError, match="unknown edit type 'pitch'; valid: emotion, style, speed"):
        build_edit_ids(tok, "pitch", None, "t", ids)
    with pytest.raises(EditError, match="build_clone_ids"):
        build_edit_ids(tok, "clone", None, "t", ids)
    with pytest.raises(EditError, match="unknown emotion value 'joy'; valid: happy, angry") as e:
        build_edit_ids(tok, "emotion", "joy", "t", ids)
    assert "\n" not in str(e.value)
    with pytest.raises(EditError, match="unknown speed value 'remove'"):
        build_edit_ids(tok, "speed", "remove", "t", ids)
    with pytest.raises(EditError, match="needs new_text"):
        build_edit_ids(tok, "paralinguistic", None, "t", ids)
    with pytest.raises(EditError, match="needs the transcript"):
        build_edit_ids(tok, "style", "warm", "  ", ids)
    assert build_edit_ids(tok, "vad", None, None, ids)  # denoise / vad need no transcript
    with pytest.raises(EditError, match="clone needs prompt_text"):
        build_clone_ids(tok, "", ids, "target")
    with pytest.raises(EditError, match="clone needs target_text"):
        build_clone_ids(tok, "p", ids, " ")
    with pytest.raises(EditError, match="not an audio token id"):
        build_edit_ids(tok, "emotion", "sad", "t", [65536, 42])
    with pytest.raises(EditError, match="audio_ids is empty"):
        build_edit_ids(tok, "emotion", "sad", "t", [])
    with pytest.raises(EditError, match="unknown language 'klingon'"):
        build_clone_ids(tok, "p", ids, "t", language="klingon")
    for err in (EditError, TokenizerError):
        assert issubclass(err, ValueError)


def test_clone_speaker_id():
    wav = np.linspace(-1, 1, 2 * 3000, dtype=np.float32).reshape(2, 3000)  # [channels, frames]
    flat = wav.reshape(-1)
    want = hashlib.sha256("你好 hi".encode() + np.concatenate([flat[:1000], flat[-1000:]]).tobytes()).hexdigest()
    assert prompts.clone_speaker_id("你好 hi", wav) == "clone_" + want[:16]
    short = wav[:, :700]
    want = hashlib.sha256(b"x" + short.reshape(-1).tobytes()).hexdigest()
    assert prompts.clone_speaker_id("x", short) == "clone_" + want[:16]
    wav_path = sorted(pathlib.Path(AUDIO).glob("*.wav"))[0]
    data, _ = sf.read(wav_path, dtype="float32", always_2d=True)
    assert prompts.clone_speaker_id_from_file("t", str(wav_path)) == prompts.clone_speaker_id("t", data.T)


# ---------------------------------------------------------------- the released tokenizer, when available


@pytest.mark.skipif(not os.environ.get("EDITX_TEXT_TOKENIZER"), reason="set EDITX_TEXT_TOKENIZER to tokenizer.model")
def test_released_tokenizer():
    real = TextTokenizer.from_pretrained(os.environ["EDITX_TEXT_TOKENIZER"])
    assert real.vocab_size == 74752 and real.num_audio_tokens == 5120
    assert real.encode("<s><|BOT|> assistant\n<audio_1><|EOT|>") == [1, 4, 15886, 78, 65537, 3]
    ids = audio_ids(10)
    assert build_edit_ids(real, "emotion", "happy", "hi", ids) == ref_edit(real, "emotion", "happy", "hi", ids)
