"""Audio I/O and tokenizer preprocessing: parity, the resampler, the silence trim, bad files."""

import math

import numpy as np
import pytest
import soundfile as sf

from conftest import AUDIO, fixture_dirs

from editx_jax.audio import io as audio_io
from editx_jax.audio.io import AudioError
from editx_jax.parity import check_fixture


@pytest.mark.parametrize("path", fixture_dirs("audio_preprocess"), ids=lambda p: p.name)
def test_preprocess_parity(path):
    result = check_fixture(path)
    assert result.status == "PASS", result.line()


# ------------------------------------------------------------------------------------ resampler


def _reference_resample(x, orig, new, width=6, rolloff=0.99):
    """The §7.2 formula, one output at a time, in float64: h(τ) with τ = m - q·o/n in input samples."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    base = rolloff * min(o, n)
    out = np.zeros(-(-len(x) * n // o))
    m = np.arange(len(x))
    for q in range(out.size):
        t = np.clip((m - q * o / n) * base / o, -width, width)
        h = (base / o) * np.sinc(t) * np.cos(np.pi * t / (2 * width)) ** 2
        out[q] = np.dot(x, h)
    return out


@pytest.mark.parametrize("orig,new", [(24000, 16000), (44100, 16000), (8000, 16000), (11025, 16000),
                                      (48000, 16000), (16001, 16000)])
def test_resample_matches_formula(orig, new):
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    got = audio_io.resample(x, orig, new)
    want = _reference_resample(x.astype(np.float64), orig, new)
    assert got.shape == want.shape == (math.ceil(300 * new / orig),)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("orig,new,n", [(24000, 16000, 95040), (24000, 16000, 7), (8000, 16000, 1001),
                                        (192000, 16000, 1999), (22050, 16000, 22051)])
def test_resample_lengths(orig, new, n):
    out = audio_io.resample(np.zeros(n, np.float32), orig, new)
    assert out.shape == (-(-n * new // orig),)


def test_resample_up_keeps_a_tone_and_batches():
    t = np.arange(8000) / 8000
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    up = audio_io.resample(tone, 8000, 16000)
    t16 = np.arange(16000) / 16000
    inner = slice(200, -200)  # away from the zero-padded edges
    np.testing.assert_allclose(up[inner], np.sin(2 * np.pi * 440 * t16)[inner], atol=2e-2)
    both = audio_io.resample(np.stack([tone, -tone]), 8000, 16000, max_block_elements=64)
    np.testing.assert_allclose(both[0], up, atol=1e-6)
    np.testing.assert_allclose(both[1], -up, atol=1e-6)
    # an odd rate pair takes the gathered-taps path, here in many small block batches
    odd = audio_io.resample(np.stack([tone, -tone]), 16001, 16000, max_block_elements=64)
    assert odd.shape == (2, math.ceil(8000 * 16000 / 16001))
    np.testing.assert_allclose(odd[1], -odd[0], atol=1e-6)
    np.testing.assert_allclose(odd[0], audio_io.resample(tone, 16001, 16000), atol=1e-6)


def test_resample_bad_rate():
    with pytest.raises(AudioError, match="positive"):
        audio_io.resample(np.zeros(10, np.float32), 0, 16000)


# ---------------------------------------------------------------------------------- trim, norm


def _speechlike(seed):
    rng = np.random.default_rng(seed)
    x = np.zeros(16000 * 2, np.float32)
    x[5000:20000] = rng.standard_normal(15000) * np.linspace(0.01, 0.5, 15000)
    x += rng.standard_normal(x.size).astype(np.float32) * 1e-3
    return x


def test_trim_span_matches_librosa():
    librosa = pytest.importorskip("librosa")
    waves = [_speechlike(s) for s in range(3)]
    waves += [audio_io.load_audio(AUDIO / name, mono=True)[0] for name in ("espeak_en_16k_b.wav", "vad_prompt.wav")]
    for x in waves:
        want = librosa.effects.trim(x, top_db=20, frame_length=512, hop_length=128)[1]
        assert audio_io.trim_span(x) == tuple(int(v) for v in want)


def test_trim_silence_grid_and_margins():
    x = np.zeros(16000, np.float32)
    x[4000:9000] = 0.5
    y, (s, e) = audio_io.trim_silence(x, return_span=True)
    assert s <= 4000 and e >= 9000
    assert y.size == math.ceil((e - s) / 240) * 240 + 4320
    start = s - 800  # > 0 here: the front is cropped, the end zero-padded to the grid length
    n = min(y.size, x.size - start)
    assert start > 0 and np.array_equal(y[:n], x[start:start + n]) and not np.any(y[n:])
    # a span starting near 0 is zero-padded in front: 800 - s leading zeros
    x2 = np.full(3000, 0.3, np.float32)
    y2, (s2, _) = audio_io.trim_silence(x2, return_span=True)
    assert s2 == 0 and np.all(y2[:800] == 0) and y2[800] == np.float32(0.3)


def test_all_silent_audio_is_defined():
    y = audio_io.preprocess_for_tokenizer(np.zeros(8000, np.float32), 16000)
    assert y.shape == (math.ceil(8000 / 240) * 240 + 4320,) and not np.any(y)


def test_energy_norm_and_cap():
    x = np.array([0.1, -0.5, 0.25], np.float32)
    np.testing.assert_allclose(audio_io.energy_norm(x), x / 0.5 * 0.999, rtol=1e-6)
    quiet = np.array([0.001, -0.002], np.float32)
    np.testing.assert_allclose(audio_io.energy_norm(quiet), quiet / 0.01 * 0.999, rtol=1e-6)  # floor 0.01
    loud = np.array([0.9, -1.2], np.float32)
    assert np.isclose(np.abs(audio_io.cap_peak(loud)).max(), 0.6)
    assert np.array_equal(audio_io.cap_peak(x), x)  # under the cap: untouched


def test_preprocess_8k_input_resamples_up():
    x = _speechlike(5)[::2].copy()  # 1 s at 8 kHz
    y = audio_io.preprocess_for_tokenizer(x, 8000)
    assert y.ndim == 1 and y.size % 240 == 0 and 0 < y.size <= 16000 + 4320
    assert np.isclose(np.abs(y).max(), 0.999, atol=1e-3)


def test_preprocess_rejects_non_finite_and_empty():
    with pytest.raises(AudioError, match="NaN or Inf"):
        audio_io.preprocess_for_tokenizer(np.array([0.1, np.nan], np.float32), 16000)
    with pytest.raises(AudioError, match="no samples"):
        audio_io.preprocess_for_tokenizer(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="shape"):
        audio_io.to_mono(np.zeros((1, 2, 3), np.float32))


# -------------------------------------------------------------------------------------- loading


def test_load_real_wav_like_torchaudio():
    wave, sr = audio_io.load_audio(AUDIO / "espeak_en_16k_a.wav")
    assert sr == 16000 and wave.dtype == np.float32 and wave.ndim == 2
    raw, _ = sf.read(AUDIO / "espeak_en_16k_a.wav", dtype="int16", always_2d=True)
    np.testing.assert_array_equal(wave, raw.T.astype(np.float32) / 32768)


def test_load_multichannel_flac_to_mono(tmp_path):
    rng = np.random.default_rng(1)
    data = (rng.uniform(-0.5, 0.5, (9600, 8))).astype(np.float32)
    path = tmp_path / "eight.flac"
    sf.write(path, data, 48000, subtype="PCM_24")
    wave, sr = audio_io.load_audio(path)
    assert sr == 48000 and wave.shape == (8, 9600)
    mono, _ = audio_io.load_audio(path, mono=True)
    np.testing.assert_allclose(mono, wave.mean(axis=0), atol=1e-7)


def test_bad_audio_files(tmp_path):
    def expect(path, pattern, **kw):
        with pytest.raises(AudioError, match=pattern) as info:
            audio_io.load_audio(path, **kw)
        assert "\n" not in str(info.value)

    expect(tmp_path / "missing.wav", "not found")
    (tmp_path / "empty.wav").write_bytes(b"")
    expect(tmp_path / "empty.wav", "empty")
    (tmp_path / "text.wav").write_text("this is not audio at all\n" * 20)
    expect(tmp_path / "text.wav", "cannot decode")
    good = tmp_path / "good.wav"
    sf.write(good, np.zeros(16000, np.float32), 16000)
    (tmp_path / "truncated.wav").write_bytes(good.read_bytes()[:30])
    expect(tmp_path / "truncated.wav", "truncated")
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros((0, 1), np.float32), 16000)
    expect(zero, "no samples")
    expect(good, "over the limit", max_seconds=0.5)
    nan = tmp_path / "nan.wav"
    samples = np.full(3200, 0.1, np.float32)  # 0.2 s: long enough that only the NaN is wrong
    samples[1] = np.nan
    sf.write(nan, samples, 16000, subtype="FLOAT")
    expect(nan, "NaN or Inf")
    expect(tmp_path, "not a file")


def test_prepare_clip_is_the_one_clip_preparation(tmp_path):
    rng = np.random.default_rng(0)
    stereo = (0.9 * rng.uniform(-1, 1, (2, 16000))).astype(np.float32)
    clip = audio_io.prepare_clip(stereo, 16000)
    mono = audio_io.to_mono(stereo)
    assert clip.sr == 16000 and np.array_equal(clip.raw, stereo)  # as read: every channel, no cap
    assert np.array_equal(clip.wave, audio_io.cap_peak(mono)) and np.isclose(np.abs(clip.wave).max(), 0.6)
    # the same clip as a file, as soundfile's [N, C] layout and as int16 PCM gives the same samples
    sf.write(tmp_path / "a.wav", stereo.T, 16000, subtype="FLOAT")
    assert np.array_equal(audio_io.prepare_clip(tmp_path / "a.wav").wave, clip.wave)
    assert np.array_equal(audio_io.prepare_clip(stereo.T, 16000).wave, clip.wave)
    pcm = audio_io.prepare_clip(np.round(mono * 32767).astype(np.int16), 16000, peak_cap=0)
    assert np.abs(pcm.wave - mono).max() < 1e-4
    assert np.array_equal(audio_io.prepare_clip(mono, 16000, peak_cap=0).wave, mono)
    for args, kwargs, msg in [((mono,), {}, "needs its sample rate"), ((mono, 0), {}, "invalid sample rate"),
                              ((mono[:800], 16000), {}, "too short"),
                              ((mono, 16000), {"max_seconds": 0.5}, "over the 0.5 s limit")]:
        with pytest.raises(AudioError, match=msg):
            audio_io.prepare_clip(*args, **kwargs)
