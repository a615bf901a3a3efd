"""Bad input through the command lines, as a user types it: one `error:` line on stderr (no
traceback), a non-zero exit, nothing written, and (for argument errors) no model loaded."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from editx_jax.audio.io import MIN_AUDIO_SECONDS
from editx_jax.checkpoint import CheckpointError
from editx_jax.config import load_config
from editx_jax.decoder.token2wav import Decoder
from editx_jax.pipeline import EditX

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import infer
import prepare_data
import tokenize_audio
import train


def _run(script, *argv, cwd):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd, capture_output=True, check=False,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _files(folder: pathlib.Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture()
def clips(tmp_path):
    """A good 0.5 s clip, the same cut in half, one whose header lies about its length, one sample."""
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "good.wav"
    sf.write(good, (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32), 16000,
             subtype="PCM_16")
    data = good.read_bytes()
    (folder / "cut.wav").write_bytes(data[:len(data) // 2])
    at = data.index(b"data") + 4  # the data chunk's size field: promise twice the samples
    lying = data[:at] + (2 * int.from_bytes(data[at:at + 4], "little")).to_bytes(4, "little") + data[at + 4:]
    (folder / "lying.wav").write_bytes(lying)
    sf.write(folder / "one.wav", np.array([0.1], np.float32), 16000)
    sf.write(folder / "long.wav", (0.1 * np.random.default_rng(1).standard_normal(64000)).astype(np.float32), 16000)
    return folder


EDIT = ["edit", "--random-tiny", "--audio-text", "hi", "--edit-type", "emotion", "--edit-info", "happy"]


@pytest.mark.parametrize("extra, why", [
    (["--audio", "in/cut.wav"], "truncated.*cut.wav"),
    (["--audio", "in/lying.wav"], "truncated.*lying.wav"),
    (["--audio", "in/one.wav"], f"too short.*minimum is {MIN_AUDIO_SECONDS:g} s.*one.wav"),
    (["--audio", "in/good.wav", "--seed", "-1"], "--seed"),
    (["--audio", "in/good.wav", "--n-iter", "0"], "--n-iter"),
    (["--audio", "in/good.wav", "--temperature", "abc"], "--temperature.*invalid float"),
    (["--audio", "in/good.wav", "--temperature", "0"], "temperature"),
    (["--audio", "in/good.wav", "--out", "in"], "is a folder"),
    # 4 s of audio give at least 155 ids: with 100 new tokens asked for, more than max_length 200
    (["--audio", "in/long.wav", "--set", "generation.max_length=200", "--max-new-tokens", "100"],
     "--max-new-tokens 100 more exceeds max_length 200"),
    (["--audio", "in/good.wav", "--set", "mesh.data=3"], "mesh.*not divisible by 3"),
    (["--audio", "in/good.wav", "--out", "in/good.wav/x.wav"], "good.wav is a file, not a folder"),
])
def test_infer_edit_refuses_before_loading(clips, extra, why):
    argv = EDIT + extra + ([] if "--out" in extra else ["--out", "out/x.wav"])
    before = _files(clips.parent)
    rc, out, err = _run("infer.py", *argv, cwd=clips.parent)
    assert rc != 0
    assert re.search(why, _one_error_line(err)), err
    assert "model ready" not in out  # checked before any model loads
    assert _files(clips.parent) == before  # nothing written, no temporary file


def test_infer_clone_refuses_an_unknown_language(clips):
    rc, out, err = _run("infer.py", "clone", "--random-tiny", "--prompt-audio", "in/good.wav", "--prompt-text", "a",
                        "--text", "b", "--language", "klingon", "--out", "out/x.wav", cwd=clips.parent)
    assert rc != 0 and "unknown language 'klingon'" in _one_error_line(err) and "model ready" not in out
    assert not (clips.parent / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the check cannot be seen")
def test_infer_refuses_a_read_only_folder(clips):
    ro = clips.parent / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, out, err = _run("infer.py", *EDIT, "--audio", "in/good.wav", "--out", "ro/x.wav", cwd=clips.parent)
        assert rc != 0 and "not writable" in _one_error_line(err) and "model ready" not in out
    finally:
        ro.chmod(0o755)


def test_tokenize_audio_reports_bad_clips_per_file(clips, capsys):
    out = clips.parent / "tokens.jsonl"
    files = [clips / "good.wav", clips / "cut.wav", clips / "lying.wav", clips / "one.wav"]
    assert tokenize_audio.main([*map(str, files), "--random-tiny", "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, err
    assert "truncated" in errors[0] and "cut.wav" in errors[0]
    assert "truncated" in errors[1] and "lying.wav" in errors[1]
    assert "too short" in errors[2] and "one.wav" in errors[2]
    assert len(out.read_text().splitlines()) == 1  # the good file only
    assert not list(clips.parent.glob(".*.tmp"))


def test_tokenize_audio_writes_nothing_when_every_file_fails(clips, capsys):
    out = clips.parent / "tokens.jsonl"
    assert tokenize_audio.main([str(clips / "cut.wav"), "--random-tiny", "--quiet", "--out", str(out)]) == 1
    assert not out.exists() and not list(clips.parent.glob(".*.tmp"))


@pytest.mark.parametrize("target, why", [("in", "is a folder"), ("in/good.wav/t.jsonl", "is a file, not a folder")])
def test_tokenize_audio_checks_out_before_loading(clips, capsys, target, why):
    before = _files(clips.parent)
    assert tokenize_audio.main([str(clips / "good.wav"), "--model", "no-such-model", "--out",
                                str(clips.parent / target)]) != 0  # the model would fail: --out fails first
    assert why in _one_error_line(capsys.readouterr().err)
    assert _files(clips.parent) == before


def test_train_checks_the_output_folder_first(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    argv = ["--config", str(ROOT / "configs/sft_tiny.yaml"), "--set", f"train.output_dir={blocker / 'sft'}",
            "--set", "data.train=missing.jsonl"]
    assert train.main(argv) == 1
    assert "train.output_dir" in _one_error_line(capsys.readouterr().err)
    assert _files(tmp_path) == {pathlib.Path("runs")}


def test_prepare_data_refuses_an_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert prepare_data.main(["shards", str(empty), str(tmp_path / "shards" / "train"),
                              "--config", str(ROOT / "configs/sft_tiny.yaml")]) == 1
    assert "no examples" in _one_error_line(capsys.readouterr().err)
    assert _files(tmp_path) == {pathlib.Path("empty.jsonl")}


def test_a_misshapen_decoder_tensor_is_one_line(clips, capsys):
    """The decoder load checks every name and shape (the check the LLM and tokenizer loads use)."""
    model = clips.parent / "model"
    EditX.random(load_config(ROOT / "configs/tiny.yaml")).save(model)
    good = Decoder.from_pretrained(model / "decoder")
    table = np.asarray(good.flow_params["input_embedding"]["embedding"]["embedding"])
    bad_flow = {**good.flow_params, "input_embedding": {"embedding": {"embedding": table[:-1]}}}
    Decoder(bad_flow, good.flow_config, good.vocoder_params, good.vocoder_config, good.campplus_params,
            good.campplus_config, good.config).save(model / "decoder")
    with pytest.raises(CheckpointError, match="param flow/input_embedding/embedding/embedding has shape"):
        Decoder.from_pretrained(model / "decoder")
    capsys.readouterr()
    assert infer.main(["edit", "--model", str(model), "--audio", str(clips / "good.wav"), "--audio-text", "hi",
                       "--edit-type", "emotion", "--edit-info", "happy", "--out", str(clips.parent / "x.wav")]) == 1
    assert "flow/input_embedding/embedding/embedding has shape" in _one_error_line(capsys.readouterr().err)
    assert not (clips.parent / "x.wav").exists()
