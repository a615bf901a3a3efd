"""Tokenizer front ends: Kaldi fbank + LFR + CMVN (offline and streaming), am.mvn, whisper log-mel."""

import math

import jax
import numpy as np
import pytest
import soundfile as sf

from conftest import AUDIO, fixture_dirs

from editx_jax.config import ConfigError
from editx_jax.convert.tokenizer import fbank_config_from_reference
from editx_jax.parity import check_fixture
from editx_jax.audio import features
from editx_jax.audio.features import FbankConfig, FrontendError

COMPONENTS = ("wav_frontend", "wav_frontend_online", "whisper_logmel128")


@pytest.mark.parametrize("path", [p for c in COMPONENTS for p in fixture_dirs(c)], ids=lambda p: p.name)
def test_frontend_parity(path):
    result = check_fixture(path)
    assert result.status == "PASS", result.line()


def _wave(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 0.1).astype(np.float32)


# ------------------------------------------------------------------------------------- fbank


def test_fbank_shape_and_mel_banks():
    cfg = FbankConfig()
    assert (cfg.frame_length, cfg.frame_shift, cfg.n_fft, cfg.feat_dim) == (400, 160, 512, 560)
    banks = features.kaldi_mel_banks(cfg)
    assert banks.shape == (257, 80)
    assert not np.any(banks[-1]) and np.all(banks.max(axis=0) > 0.3) and banks.max() <= 1.0
    feats = features.kaldi_fbank(_wave(16000), cfg)
    assert feats.shape == (1 + (16000 - 400) // 160, 80) and np.all(np.isfinite(feats))
    batch = features.kaldi_fbank(np.stack([_wave(16000), _wave(16000, 1)]), cfg)
    np.testing.assert_allclose(batch[0], feats, atol=1e-4)
    # the traceable core inside a user's jit, without the bucket padding, gives the same frames
    jitted = jax.jit(lambda w: features.fbank_jnp(w, cfg))(_wave(16000))
    np.testing.assert_allclose(jitted, feats, atol=1e-4)


def test_fbank_too_short_and_dither_key():
    with pytest.raises(FrontendError, match="at least 400 samples"):
        features.kaldi_fbank(np.zeros(399, np.float32))
    cfg = FbankConfig(dither=1.0)
    with pytest.raises(FrontendError, match="PRNG key"):
        features.kaldi_fbank(_wave(1000), cfg)
    key = jax.random.PRNGKey(0)
    a, b = features.kaldi_fbank(_wave(1000), cfg, key), features.kaldi_fbank(_wave(1000), cfg, key)
    clean = features.kaldi_fbank(_wave(1000))
    np.testing.assert_array_equal(a, b)  # explicit key: reproducible
    assert np.abs(np.asarray(a) - np.asarray(clean)).max() > 1e-3


def test_config_validation():
    with pytest.raises(ConfigError, match="fbank.lfr_m"):
        FbankConfig(lfr_m=0)
    with pytest.raises(ConfigError, match="fbank.window"):
        FbankConfig(window="blackman")
    with pytest.raises(ConfigError, match="unknown"):
        fbank_config_from_reference({"fs": 16000, "bogus": 1})


def test_lfr_padding():
    feats = np.arange(13 * 2, dtype=np.float32).reshape(13, 2)
    out = np.asarray(features.apply_lfr(feats, 7, 6))
    assert out.shape == (3, 14)  # ceil(13 / 6)
    rows = out.reshape(3, 7, 2)[:, :, 0] / 2
    np.testing.assert_array_equal(rows[0], [0, 0, 0, 0, 1, 2, 3])  # 3 copies of frame 0 in front
    np.testing.assert_array_equal(rows[2], [9, 10, 11, 12, 12, 12, 12])  # last frame repeated


# ------------------------------------------------------------------------------------ am.mvn

AM_MVN = """<Nnet>
<Splice> 4 4
[ 0 ]
<AddShift> 4 4
<LearnRateCoef> 0 [ -1.5 2 3e-1 -4 ]
<Rescale> 4 4
<LearnRateCoef> 0 [ 0.5 0.25 1 2 ]
</Nnet>
"""


def test_am_mvn_parse_and_apply(tmp_path):
    path = tmp_path / "am.mvn"
    path.write_text(AM_MVN)
    cmvn = features.load_cmvn(path)
    np.testing.assert_array_equal(cmvn, np.array([[-1.5, 2, 0.3, -4], [0.5, 0.25, 1, 2]], np.float32))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(features.apply_cmvn(x, cmvn), [[-0.25, 0.75, 1.3, -6]] * 2, rtol=1e-6)


@pytest.mark.parametrize("text,pattern", [
    (AM_MVN.replace("<Rescale>", "<Other>"), "no <Rescale>"),
    (AM_MVN.replace("<AddShift> 4 4", "<AddShift> 5 5"), "declares 5"),
    (AM_MVN.replace("3e-1", "abc"), "bad number"),
    (AM_MVN.split("<Rescale>")[0] + "<Rescale> 4 4\n<LearnRateCoef> 0 0.5 0.25", "no \\[ ... \\]"),
])
def test_am_mvn_errors(text, pattern):
    with pytest.raises(FrontendError, match=pattern):
        features.parse_am_mvn(text)


def test_load_cmvn_missing(tmp_path):
    with pytest.raises(FrontendError, match="not found"):
        features.load_cmvn(tmp_path / "nope.mvn")


# ------------------------------------------------------------------------- streaming front end


def _formula_tokens(n):
    """§2.1.1 token count (vllm-omni estimate_vq02_len), stated as exact for 400..60000 samples."""
    full, r = divmod(n, 3840)
    total = 4 * full
    if r:
        eff = r + (320 if full else 0)
        frames = (eff - 400) // 160 + 1 if eff >= 400 else 0
        lfr = frames + (1 if full else 3)
        total += math.ceil((lfr - 3) / 6) if lfr >= 7 else 0
    return total


def test_online_frame_count_formula():
    for n in range(400, 60000, 7):
        lens = features.online_chunk_lens(n)
        assert sum(lens) == _formula_tokens(n), n
        assert all(x == 4 for x in lens[:n // 3840])


@pytest.mark.parametrize("n", [399, 400, 1000, 3839, 3840, 7680, 7680 + 479, 3 * 3840 + 826, 20011])
def test_online_equals_offline_except_tail(n):
    wave = _wave(n, seed=n)
    cmvn = np.stack([np.full(560, -8.0, np.float32), np.full(560, 0.2, np.float32)])
    steps, lens = features.wav_frontend_online_stepwise(wave, cmvn)
    fast, fast_lens = features.wav_frontend_online(wave, cmvn)
    assert lens == fast_lens and steps.shape == (sum(lens), 560)
    np.testing.assert_allclose(np.asarray(fast), steps, atol=1e-4)
    if n < 400:
        assert lens == []
        return
    offline = np.asarray(features.wav_frontend(wave, cmvn))
    assert offline.shape[0] - steps.shape[0] in (0, 1)  # the official dropped tail frame
    np.testing.assert_allclose(steps, offline[:steps.shape[0]], atol=1e-4)


def test_online_tail_quirk_on_real_audio():
    wave, _ = sf.read(AUDIO / "espeak_en_16k_b.wav", dtype="float32")
    feats, lens = features.wav_frontend_online(wave)
    assert len(wave) % 3840 == 826 and lens == [4] * 17
    assert features.wav_frontend(wave).shape[0] == 69 and feats.shape[0] == 68


def test_online_frontend_refuses_after_final():
    fe = features.OnlineFrontend()
    fe(_wave(5000), is_final=True)
    with pytest.raises(FrontendError, match="final"):
        fe(_wave(100))


# ---------------------------------------------------------------------------- whisper log-mel


def test_slaney_filters_match_librosa():
    librosa = pytest.importorskip("librosa")
    want = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128)
    np.testing.assert_allclose(features.slaney_mel_filters(16000, 400, 128), want, atol=1e-7)
    want80 = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)
    np.testing.assert_allclose(features.slaney_mel_filters(16000, 400, 80), want80, atol=1e-7)


def test_whisper_log_mel_shape_range_batch():
    a, b = _wave(16000, 3), _wave(16000, 4) * 0.01
    mel = np.asarray(features.whisper_log_mel(a))
    assert mel.shape == (128, 100)
    assert mel.min() >= mel.max() - 2.0 - 1e-6  # the max-8 floor, after the /4 rescale
    both = np.asarray(features.whisper_log_mel(np.stack([a, b])))
    np.testing.assert_allclose(both[0], mel, atol=1e-5)
    np.testing.assert_allclose(both[1], features.whisper_log_mel(b), atol=1e-5)


def test_whisper_log_mel_bucketing_is_exact():
    a = _wave(9999, 7)
    padded = np.pad(a, 200, mode="reflect")
    direct = jax.jit(lambda p: features.whisper_log_mel_jnp(p, 9999 // 160))(padded)
    np.testing.assert_allclose(features.whisper_log_mel(a), direct[:, :9999 // 160], atol=1e-5)


def test_whisper_log_mel_too_short():
    with pytest.raises(FrontendError, match="more than 200 samples"):
        features.whisper_log_mel(np.zeros(200, np.float32))
