"""The audio tokenizer end to end (tiny random weights, real clips): batching, long audio, bad input,
the released-folder converter and the checkpoint round trip, and the tokenize_audio CLI."""

import json
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, ROOT
from reference_models import write_step_audio_tokenizer

from editx_jax.audio import features
from editx_jax.audio import io as audio_io
from editx_jax.audio.io import AudioError
from editx_jax.codes import get_audio_tokens, interleave_ids, num_groups, split_ids
from editx_jax.config import ConfigError
from editx_jax.convert.keymap import ConversionError
from editx_jax.convert.tokenizer import convert_tokenizer, tokenizer_from_released
from editx_jax.tokenizer import codebook as cb
from editx_jax.tokenizer import paraformer as pf
from editx_jax.tokenizer import s3tokenizer as s3
from editx_jax.tokenizer.audio_tokenizer import AudioTokenizer, AudioTokenizerConfig
from editx_jax.tokenizer.vq02 import context_start, min_dependency, vq02_features

sys.path.insert(0, str(ROOT / "tools"))
import convert  # noqa: E402  (tools/convert.py)
import tokenize_audio  # noqa: E402  (tools/tokenize_audio.py)

CLIPS = ["espeak_en_16k_a.wav", "speed_prompt.wav", "whisper_prompt.wav", "fear_zh_female_prompt.wav"]  # 16/24/48 kHz


@pytest.fixture(scope="module")
def tok():
    return AudioTokenizer.random(AudioTokenizerConfig.tiny())


def _check_tokens(t):
    g = t.num_groups
    assert g == num_groups(t.vq02.size, t.vq06.size) > 0
    assert t.ids.tolist() == interleave_ids(t.vq02, t.vq06).tolist()
    assert get_audio_tokens(t.text).tolist() == t.ids.tolist()
    vq02, vq06 = split_ids(t.ids)
    assert vq02.tolist() == t.vq02[:2 * g].tolist() and vq06.tolist() == t.vq06[:3 * g].tolist()
    assert 0 <= t.vq02.min() and t.vq02.max() < 1024 and 0 <= t.vq06.min() and t.vq06.max() < 4096


# ------------------------------------------------------------------ batching


def test_batch_equals_alone(tok):
    files = [AUDIO / c for c in CLIPS]
    batch = tok.tokenize(files)
    for f, got in zip(files, batch):
        alone = tok.tokenize(f)[0]
        _check_tokens(got)
        assert np.array_equal(got.vq02, alone.vq02), f.name
        assert np.array_equal(got.vq06, alone.vq06), f.name
        assert got.text == alone.text
        # vq02 ~ 16.67 Hz and vq06 25 Hz of the trimmed audio (§0.2)
        assert abs(got.vq02.size - got.seconds * 50 / 3) <= 2 and abs(got.vq06.size - got.seconds * 25) <= 2
        assert len(np.unique(got.vq02)) > 10 and len(np.unique(got.vq06)) > 10  # random weights, not constant
    # waves with their rates give the same as the files
    wave, sr = sf.read(files[1], dtype="float32")
    assert tok.tokenize([wave], sr)[0].text == batch[1].text


def test_batch_matches_the_stream_reference(tok):
    """Batched pipeline codes == the plain per-clip path: streaming front end, sequential encoder
    loop (one call per 3840 samples), cdist k-means; whisper log-mel + S3 on each piece alone."""
    cfg = tok.config
    wave = tok.load(AUDIO / CLIPS[1])
    feats, lens = features.wav_frontend_online_stepwise(wave, tok.cmvn, cfg.fbank)
    enc, _ = pf.encode_stream(tok.paraformer_params, cfg.paraformer, feats[None], lens, method="sequential")
    got = tok.encode([tok.load(AUDIO / CLIPS[0]), wave])[1]
    assert np.array_equal(got[0], cb.quantize_vq02(enc, tok.vq02_codebook))
    mel = np.asarray(features.whisper_log_mel(wave))
    codes, n, _ = s3.tokenize(tok.s3_params, mel[None], np.array([mel.shape[1]], np.int32), cfg.s3)
    assert np.array_equal(got[1], np.asarray(codes)[0, :int(n[0])])


# ------------------------------------------------------------------ long audio


def test_context_start_steady_state():
    cfg = AudioTokenizerConfig().paraformer  # released: cache of 16 frames = the 4 previous calls
    plan = pf.window_plan(cfg, np.full((1, 600), 4), 2400)
    dep = min_dependency(plan)
    assert dep[0] == 0 and dep[1] == 0 and dep[10] == 6
    assert context_start(dep, 500, cfg.num_blocks) == 500 - 4 * 50
    assert context_start(dep, 30, cfg.num_blocks) == 0


def test_long_audio_equals_official_chunking(tok):
    """~80 s (three 30 s vq06 pieces and a tail; vq02 in several blocks with their context):
    the same codes as one streaming pass and as the official per-piece vq06 loop."""
    cfg = tok.config
    waves = [tok.load(AUDIO / c) for c in ["denoise_prompt.wav", "vad_prompt.wav", "en_happy_prompt.wav"]]
    long = np.concatenate(waves * 2 + waves[:1])[:16000 * 80 + 1234]
    small = AudioTokenizer(AudioTokenizerConfig.tiny(vq02_block_calls=64), tok.params)
    (vq02, vq06), = small.encode([long])
    # vq02: the fbank of a long clip in segments == in one go; then one whole sequential stream
    feats, lens = features.wav_frontend_online(long, tok.cmvn, cfg.fbank)
    seg, seg_lens = vq02_features(long, tok.cmvn, cfg.fbank, segment_frames=1000)
    assert seg_lens == lens and np.array_equal(seg, np.asarray(feats))
    enc, _ = pf.encode_stream(tok.paraformer_params, cfg.paraformer, np.asarray(feats)[None], lens,
                              method="sequential")
    assert np.array_equal(vq02, cb.quantize_vq02(enc, tok.vq02_codebook))
    # vq06: each 30 s piece alone, batch 1, unpadded
    pieces = s3.split_chunks(long, cfg.s3)
    assert len(pieces) == 3
    want = []
    for piece in pieces:
        mel = np.asarray(features.whisper_log_mel(piece))
        codes, n, _ = s3.tokenize(tok.s3_params, mel[None], np.array([mel.shape[1]], np.int32), cfg.s3)
        want.append(np.asarray(codes)[0, :int(n[0])])
    assert np.array_equal(vq06, np.concatenate(want))
    # and the whole clip batched with a short one gives the same again
    both = small.encode([waves[2], long])
    assert np.array_equal(both[1][0], vq02) and np.array_equal(both[1][1], vq06)


# ------------------------------------------------------------------ bad input


def _write(path, data, sr, **kw):
    sf.write(str(path), data, sr, **kw)
    return path


def test_bad_files_give_one_line_errors(tok, tmp_path):
    good = AUDIO / CLIPS[0]
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:30])
    zero = _write(tmp_path / "zero.wav", np.zeros((0,), np.float32), 16000)
    nan = _write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 4000, np.float32), 16000, subtype="FLOAT")
    inf = _write(tmp_path / "inf.wav", np.array([0.1, np.inf, 0.2] * 4000, np.float32), 16000, subtype="FLOAT")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])  # header promises more than is there
    bad = [empty, text, truncated, zero, nan, inf, tmp_path / "missing.wav"]
    results = tok.tokenize([good, *bad, cut], errors="keep")
    last = results.pop()
    assert isinstance(last, AudioError) and "truncated" in str(last) and cut.name in str(last)
    assert results[0].text == tok.tokenize(good)[0].text  # the good file is unaffected
    for path, r in zip(bad, results[1:]):
        assert isinstance(r, AudioError), (path, r)
        assert "\n" not in str(r) and path.name in str(r)
    with pytest.raises(AudioError, match="empty"):
        tok.tokenize([good, empty])


def test_bad_waves(tok):
    with pytest.raises(AudioError, match="NaN or Inf"):
        tok.tokenize([np.array([0.0, np.inf] * 1000, np.float32)], 16000)
    with pytest.raises(AudioError, match="no samples"):
        tok.tokenize([np.zeros(0, np.float32)], 16000)
    with pytest.raises(AudioError, match="sample rate"):
        tok.tokenize([np.zeros(1000, np.float32)])
    with pytest.raises(AudioError, match="sample rate"):
        tok.tokenize([np.zeros(1000, np.float32)], 0)
    with pytest.raises(ValueError, match="errors"):
        tok.tokenize([np.zeros(1000, np.float32)], 16000, errors="ignore")


def test_channels_rates_silence_and_short_clips(tok, tmp_path):
    wave, sr = sf.read(AUDIO / "speed_prompt.wav", dtype="float32")  # 24 kHz mono
    mono = tok.tokenize([wave], sr)[0]
    # 8 channels: averaged to mono (identical channels give the mono codes)
    eight = _write(tmp_path / "eight.wav", np.repeat(wave[:, None], 8, axis=1), sr, subtype="FLOAT")
    assert tok.tokenize(eight)[0].text == mono.text
    assert tok.tokenize([np.stack([wave, wave], axis=1)], sr)[0].text == mono.text  # soundfile's [N, C]
    pcm = np.round(wave * 32767).astype(np.int16)
    assert tok.tokenize([pcm], sr)[0].num_groups == mono.num_groups  # int16 PCM is scaled like torchaudio
    # 8 kHz (resampled up; the official code asserts there) and 192 kHz: defined codes of the right length
    for rate in (8000, 192000):
        r = tok.tokenize([audio_io.resample(wave, sr, rate)], rate)[0]
        _check_tokens(r)
        assert abs(r.seconds - mono.seconds) < 0.05
    # all-silent audio is not trimmed and gives the codes of silence, deterministically
    silent = tok.tokenize([np.zeros(16000, np.float32)], 16000)[0]
    assert silent.seconds == (67 * 240 + 4320) / 16000  # 1 s kept whole + the 0.05 / 0.22 s margins
    _check_tokens(silent)
    assert silent.text == tok.tokenize([np.zeros(16000, np.float32)], 16000)[0].text
    # under audio.MIN_AUDIO_SECONDS: refused, as a wave and as a file, as in every tool
    blip = np.sin(np.arange(160) / 3).astype(np.float32)
    with pytest.raises(AudioError, match="too short.*minimum is 0.1 s"):
        tok.tokenize([blip], 16000)
    one = _write(tmp_path / "one.wav", blip[:1], 16000)
    with pytest.raises(AudioError, match="too short.*one.wav"):
        tok.tokenize([one])
    # just over it: the trim margins pad it (>= 0.27 s, at least 2 groups) ...
    short = np.tile(blip, 11)  # 0.11 s
    assert tok.tokenize([short], 16000)[0].num_groups >= 2
    # ... and without the trim the minimum still holds one 2+3 group (the rule is set so that it does)
    untrimmed = AudioTokenizer(AudioTokenizerConfig.tiny(trim=False), tok.params)
    assert untrimmed.tokenize([np.ones(1600, np.float32) * 0.1], 16000)[0].num_groups == 1
    assert untrimmed.tokenize([np.tile(blip, 40)], 16000)[0].num_groups > 0


def test_config_and_params_validation(tok):
    with pytest.raises(ConfigError, match="vq02_block_calls"):
        AudioTokenizerConfig.tiny(vq02_block_calls=2)
    with pytest.raises(ConfigError, match="paraformer.input_size"):
        AudioTokenizerConfig(paraformer=pf.ParaformerEncoderConfig(input_size=80))
    params = dict(tok.params)
    params["vq02_codebook"] = np.zeros((1024, 7), np.float32)
    with pytest.raises(ConfigError, match="vq02_codebook"):
        AudioTokenizer(tok.config, params)


# ------------------------------------------------------------------ released folder -> checkpoint


@pytest.fixture(scope="module")
def released(tmp_path_factory, tok):
    frames = tok.load(AUDIO / CLIPS[0]).size // 160  # the ONNX export runs on this mel length only
    return write_step_audio_tokenizer(tmp_path_factory.mktemp("released") / "Step-Audio-Tokenizer",
                                      onnx_frames=frames)


def test_convert_round_trip_and_onnxruntime(released, tmp_path):
    files = [AUDIO / CLIPS[0], AUDIO / CLIPS[2]]
    direct = tokenizer_from_released(released)
    assert direct.config.s3.n_audio_state == 64 and direct.config.s3.n_audio_head == 4
    assert direct.config.paraformer.num_blocks == 4 and direct.config.fbank.dither == 0.0
    want = direct.tokenize(files)
    summary = convert_tokenizer(released, tmp_path / "tok", progress=False)
    assert summary["tensors"] == (4 * 13 + 2) + (2 * 15 + 6) + 2 and summary["ignored"] == 2
    loaded = AudioTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == direct.config
    for a, b in zip(want, loaded.tokenize(files)):
        assert np.array_equal(a.vq02, b.vq02) and np.array_equal(a.vq06, b.vq06) and a.text == b.text
    # the vq06 codes are those of the ONNX file run by onnxruntime on the same log-mel
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(released / "speech_tokenizer_v1.onnx"), providers=["CPUExecutionProvider"])
    mel = np.asarray(features.whisper_log_mel(direct.load(files[0])))[None]
    codes = session.run(None, {"feats": mel, "feats_length": np.array([mel.shape[2]], np.int32)})[0]
    assert np.array_equal(np.asarray(codes).reshape(-1), want[0].vq06)
    # a second conversion replaces the folder; a folder of something else is refused
    convert_tokenizer(released, tmp_path / "tok", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        convert_tokenizer(released, other, progress=False)


def test_convert_errors(released, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(released, broken)
    (broken / "speech_tokenizer_v1.onnx").unlink()
    with pytest.raises(ConversionError, match="speech_tokenizer_v1.onnx"):
        tokenizer_from_released(broken)
    with pytest.raises(ConversionError, match="not a folder"):
        tokenizer_from_released(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="float32"):
        convert_tokenizer(released, tmp_path / "x", dtype="bfloat16", progress=False)


# ------------------------------------------------------------------ CLIs


def test_tokenize_audio_cli(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    out = tmp_path / "out.jsonl"
    files = [str(AUDIO / CLIPS[0]), str(bad), str(AUDIO / CLIPS[1])]
    rc = tokenize_audio.main([*files, "--random-tiny", "--out", str(out), "--batch", "2", "--quiet"])
    assert rc == 1
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["file"] for x in lines] == [files[0], files[2]]
    assert lines[0]["ids"] == get_audio_tokens(lines[0]["tokens"]).tolist()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "bad.wav" in err[0] and err[-1] == "1 of 3 file(s) failed"
    assert tokenize_audio.main([files[0], "--random-tiny", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == files[0]


def test_convert_cli(released, tmp_path, capsys):
    if "tokenizer" not in convert.SUBCOMMANDS:
        pytest.skip("tools/convert.py has no tokenizer subcommand yet")
    assert convert.main(["tokenizer", str(released), str(tmp_path / "ckpt"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["dst"] == str((tmp_path / "ckpt").absolute())
    assert AudioTokenizer.from_pretrained(tmp_path / "ckpt").config.s3.n_audio_layer == 2
    assert convert.main(["tokenizer", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--quiet"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
