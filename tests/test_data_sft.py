"""Upstream JSONL -> token ids and loss masks; malformed records; the Grain pipeline."""

import json
import sys

import numpy as np
import pytest
import soundfile as sf
from _sft_corpus import TINY_LLM, make_records, write_jsonl
from conftest import ROOT

from editx_jax.config import ConfigError, DataConfig, load_config
from editx_jax.data import dataset, jsonl, tfds_builder
from editx_jax.text import prompts
from editx_jax.text.prompts import chat_template
from editx_jax.text.tiny import train_layout_model
from editx_jax.text.tokenizer import TextTokenizer

sys.path.insert(0, str(ROOT / "tools"))
import prepare_data  # noqa: E402  (tools/prepare_data.py)

TOK = jsonl.ByteTokenizer()
V = 74752


def record(**kw):
    r = {"source_audio": "a.wav", "source_text": " Hello there ", "target_text": "Hello there",
         "source_vq02vq06": [65536, 65537, 66560], "target_vq02vq06": [65538, 70655],
         "task_type": "edit", "edit_type": "emotion", "edit_info": "happy"}
    r.update(kw)
    return r


def test_edit_record_layout_and_loss_mask():
    ex = jsonl.encode_record(record(), TOK, DataConfig(), V)
    toks = ex.tokens.tolist()
    instr = "Make the following audio more happy. The text corresponding to the audio is: Hello there\n"
    prompt = ([1, 4] + TOK.encode(" system\n" + jsonl.EDIT_SYSTEM_PROMPT) + [3, 4]
              + TOK.encode(" human\n" + instr + "\n") + [65536, 65537, 66560] + TOK.encode("\n") + [3, 4]
              + TOK.encode(" assistant\n"))
    assert toks == prompt + [65538, 70655, 3]  # audio ids spliced as they are, <|EOT|> trained by default
    assert ex.loss_mask.tolist() == [False] * len(prompt) + [True] * 3
    up = jsonl.encode_record(record(), TOK, DataConfig(upstream_compat=True), V)
    assert up.tokens.tolist() == prompt + [65538, 70655] and up.loss_mask.sum() == 2  # upstream: no EOT
    # a tiny vocabulary maps audio codes onto its own base
    small = jsonl.encode_record(record(), TOK, DataConfig(audio_id_base=324, audio_codes=6000), 6000)
    assert small.tokens[-3:].tolist() == [324 + 2, 324 + 5119, 3]


def test_instruction_strings():
    train = prompts.training_edit_instruction
    assert train("paralinguistic", "x", "a [Laughter]") == (
        "Add some non-verbal sounds to make the audio more natural, the new text is : a [Laughter]\n"
        "  The text corresponding to the audio is: a [Laughter]\n")
    assert train("style", "remove", " t ").startswith("Remove any speaking styles")
    assert train("speed", "faster", "t") == \
        "Make the following audio more faster. The text corresponding to the audio is: t\n"
    assert train("emotion", None, "t").startswith("Make the following audio more . ")
    assert train("mask", "empty", "t") == "Edit the audio based on text: t\n"
    # one source: every request the inference prompts accept gets the same instruction in training data
    for edit_type, values in prompts.EDIT_VALUES.items():
        for info in values or (None,):
            new_text = "a [Laughter] b" if edit_type == "paralinguistic" else None
            assert train(edit_type, info, " a b ", new_text) == \
                prompts.edit_instruction(edit_type, info, " a b ", new_text), (edit_type, info)
    assert not hasattr(jsonl, "edit_instruction")


def test_text_tokenizer_has_no_silent_default(tmp_path):
    """A config that names no text tokenizer fails on the key instead of reading text as bytes."""
    assert DataConfig().text_tokenizer == ""
    with pytest.raises(ConfigError, match="data.text_tokenizer is not set"):
        jsonl.load_text_tokenizer(DataConfig().text_tokenizer)
    with pytest.raises(ConfigError, match="data.text_tokenizer: .*nope does not exist"):
        jsonl.load_text_tokenizer(str(tmp_path / "nope"))
    assert isinstance(jsonl.load_text_tokenizer("bytes"), jsonl.ByteTokenizer)


def test_clone_record_uses_the_speaker_hash(tmp_path):
    wav = tmp_path / "p.wav"
    sf.write(wav, np.linspace(-0.5, 0.5, 3000, dtype=np.float32), 16000, subtype="PCM_16")
    rec = record(task_type="clone", source_audio=str(wav), emotion="neutral")
    ex = jsonl.encode_record(rec, TOK, DataConfig(), V)
    speaker = jsonl.clone_speaker(" Hello there ", str(wav))
    assert speaker.startswith("clone_") and len(speaker) == 22
    text = TOK.decode(ex.tokens.tolist())
    assert f"speaker name: {speaker}\nspeaker prompt text: \n Hello there \nspeaker audio tokens: \n" in text
    assert 65537 in ex.tokens.tolist()[:-3]  # the prompt audio sits in the system turn
    with pytest.raises(jsonl.RecordError, match="unreadable source_audio"):
        jsonl.encode_record(record(task_type="clone", source_audio=str(tmp_path / "no.wav"), emotion="x"),
                            TOK, DataConfig(), V)


def test_malformed_records_are_counted_per_reason_and_strict_fails(tmp_path):
    lines = [json.dumps(record()), "{not json", json.dumps(record(source_vq02vq06=[65536, 80000])),
             json.dumps(record(target_vq02vq06="<audio_1>")), json.dumps({"source_text": "x"}),
             json.dumps(record(source_vq02vq06=[12])), "", json.dumps(record())]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    examples, report = jsonl.read_examples(str(path), TOK, DataConfig(), V)
    assert len(examples) == 2 and report.records == 7 and report.kept == 2
    assert report.skipped == {"invalid JSON": 1, "token id out of range": 2, "missing source_audio": 1,
                              "target_vq02vq06 is not a list of token ids": 1}
    assert "d.jsonl:2" in report.summary()
    with pytest.raises(jsonl.RecordError, match=r"d.jsonl:2: invalid JSON"):
        jsonl.read_examples(str(path), TOK, DataConfig(strict=True), V)


def test_overlong_records_truncate_drop_or_fail(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [record(target_vq02vq06=[65536] * 50)])
    n_prompt = len(jsonl.encode_record(record(), TOK, DataConfig(), V).tokens) - 3
    cfg = DataConfig(max_length=n_prompt + 10)
    (ex,), report = jsonl.read_examples(path, TOK, cfg, V)
    assert report.truncated == 1 and len(ex.tokens) == n_prompt + 10 and ex.loss_mask.sum() == 10
    _, report = jsonl.read_examples(path, TOK, DataConfig(max_length=n_prompt + 10, overlong="drop"), V)
    assert report.kept == 0 and sum(report.skipped.values()) == 1
    with pytest.raises(jsonl.RecordError, match="longer than max_length"):
        jsonl.read_examples(path, TOK, DataConfig(max_length=n_prompt + 10, overlong="error"), V)


def _examples(n=24):
    tok = jsonl.WordHashTokenizer()
    cfg = DataConfig(audio_id_base=324, audio_codes=188, max_length=256)
    return [jsonl.encode_record(r, tok, cfg, 512) for r in make_records(n, 0)], cfg


def test_pipeline_shards_packs_and_resumes():
    examples, cfg = _examples()
    # Unpacked, one epoch: the global batches hold every example once (each process iterates them all
    # and places its own devices' rows: tests/test_train_multihost.py).
    ds = dataset.train_dataset(examples, DataConfig(**{**cfg.__dict__, "pack": False, "num_epochs": 1}), rows=4)
    rows = [tuple(r[r != 0]) for b in ds for r in b["tokens"][0]]
    assert len(rows) == 24 and len(set(rows)) == 24
    # Packed: several examples per row, positions restart, padding is invisible and carries no loss.
    ds = dataset.train_dataset(examples, cfg, rows=4, grad_accum=2)
    it = iter(ds)
    b = next(it)
    assert b["tokens"].shape == (2, 2, 256)
    assert b["segment_ids"].max() >= 2
    pad = b["segment_ids"] == 0
    assert (b["positions"][pad] == -1).all() and (b["weights"][pad] == 0).all()
    # The iterator state restores the exact stream (prefetching included).
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = iter(dataset.train_dataset(examples, cfg, rows=4, grad_accum=2))
    it2.set_state(state)
    for w in want:
        got = next(it2)
        for k in dataset.BATCH_KEYS:
            np.testing.assert_array_equal(got[k], w[k])


def test_eval_batches_cover_every_example_once():
    examples, cfg = _examples(10)
    batches = dataset.eval_batches(examples, 256, rows=4)
    assert len(batches) == 3
    total = sum(float(b["weights"].sum()) for b in batches)
    assert total == sum(float(e.loss_mask[1:].sum()) for e in examples)


def test_array_record_shards_round_trip(tmp_path):
    cfg = load_config(None, TINY_LLM + ["data.max_length=256"])
    path = write_jsonl(tmp_path / "d.jsonl", make_records(10, 0) + [{"bad": 1}])
    info = prepare_data.write_shards(path, tmp_path / "shards" / "train", cfg, num_shards=3)
    assert info["examples"] == 10 and sum(info["report"].skipped.values()) == 1 and len(info["paths"]) == 3
    src = dataset.ArrayRecordExamples(str(tmp_path / "shards" / "train-*.array_record"))
    want, _ = jsonl.read_examples(path, jsonl.WordHashTokenizer(), cfg.data, 512)
    assert len(src) == 10 and dataset.is_array_record(str(tmp_path / "shards" / "train-*.array_record"))
    got = sorted(src[i].tokens.tolist() for i in range(10))
    assert got == sorted(e.tokens.tolist() for e in want)
    a = next(iter(dataset.train_dataset(src, cfg.data, rows=2)))
    assert a["tokens"].shape == (1, 2, 256)


def test_tokenize_manifest_resumes_and_reports_failures(tmp_path):
    class FakeTokenizer:  # the AudioTokenizer.tokenize contract, without running the model
        calls = 0

        def tokenize(self, paths, errors="keep"):
            FakeTokenizer.calls += len(paths)
            return [ValueError(f"{p}: unreadable") if "bad" in p else
                    type("T", (), {"ids": np.array([65536 + len(p), 66560])})() for p in paths]

    rows = [{"source_audio": f"s{i}.wav", "target_audio": "bad.wav" if i == 2 else f"t{i}.wav",
             "source_text": "x", "target_text": "x", "edit_type": "emotion", "edit_info": "happy"} for i in range(4)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out.jsonl"
    info = prepare_data.tokenize_manifest(manifest, out, FakeTokenizer(), batch=2, progress=False)
    assert info["written"] == 3 and info["failed"][0][0] == 3
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:1]) + "\n")  # as if interrupted after the first record
    FakeTokenizer.calls = 0
    info = prepare_data.tokenize_manifest(manifest, out, FakeTokenizer(), batch=2, progress=False)
    assert FakeTokenizer.calls == 6  # only the 3 records not yet written
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["_index"] for r in recs) == [0, 1, 3]
    assert recs[0]["source_vq02vq06"] == [65536 + 6, 66560] and "target_audio" not in recs[0]


def test_tfds_builder_reads_back_the_same_examples(tmp_path):
    cfg = load_config(None, TINY_LLM + ["data.max_length=256"])
    path = write_jsonl(tmp_path / "d.jsonl", make_records(6, 0))
    tfds_builder.build_tfds(cfg, tmp_path / "tfds", train=path)
    src = tfds_builder.TfdsExamples(tmp_path / "tfds", "train")
    want, _ = jsonl.read_examples(path, jsonl.WordHashTokenizer(), cfg.data, 512)
    assert len(src) == 6
    assert sorted(src[i].tokens.tolist() for i in range(6)) == sorted(e.tokens.tolist() for e in want)
    assert sorted(int(src[i].loss_mask.sum()) for i in range(6)) == sorted(int(e.loss_mask.sum()) for e in want)


def test_real_tokenizer_gives_the_training_chat_template(tmp_path):
    """With a SentencePiece model of the released layout, a record's ids are the chat template string
    tokenised once (TRL's path), with the completion appended as ids."""
    tok = TextTokenizer(train_layout_model())
    ex = jsonl.encode_record(record(), tok, DataConfig(), V)
    instr = prompts.training_edit_instruction("emotion", "happy", " Hello there ")
    user = instr + "\n<audio_0><audio_1><audio_1024>\n"
    want = chat_template(jsonl.EDIT_SYSTEM_PROMPT, user, "<audio_2><audio_5119><|EOT|>")
    assert tok.decode(ex.tokens.tolist()) == want
    assert ex.tokens[:2].tolist() == [1, 4] and ex.tokens[-3:].tolist() == [65538, 70655, 3]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(train_layout_model())
    assert type(jsonl.load_text_tokenizer(str(path))).__name__ == "TextTokenizer"
