"""The vocoders: HiFT (shipped) and BigVGAN v2, their converters and shared conv/activation layers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dirs

from editx_jax import config as config_mod
from editx_jax.config import ConfigError
from editx_jax.convert import bigvgan as convert_bigvgan
from editx_jax.convert.bigvgan import bigvgan_config_from_reference
from editx_jax.convert.decoder import CONVERTERS, vocoder_of_yaml
from editx_jax.convert import hift as convert_hift
from editx_jax.convert import sources
from editx_jax.convert.hift import hift_config_from_reference
from editx_jax.convert.keymap import ConversionError, DictSource
from editx_jax.decoder import vocoders
from editx_jax.decoder.bigvgan import BigVGANConfig, BigVGANInputError, bigvgan_inference
from editx_jax.decoder.hift import (HiFTConfig, HiFTInputError, NSFNoise, abstract_params, hift_decode,
                                    hift_inference, istft, stft)
from editx_jax.layers.conv import ConvTranspose1d
from editx_jax.parity import Fixture, check_fixture, compare

HIFT_DIRS = fixture_dirs("hift")
BIGVGAN_DIRS = fixture_dirs("bigvgan")


@pytest.fixture(scope="module")
def hift_fx():
    fx = Fixture.load(HIFT_DIRS[0])
    config = hift_config_from_reference(fx.config)
    return fx, config, convert_hift.from_state_dict(fx.weights(), config)


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("path", HIFT_DIRS + BIGVGAN_DIRS, ids=lambda p: p.name)
def test_vocoder_parity(path):
    result = check_fixture(path)
    assert result.status == "PASS", result.line()


def test_hift_decode_from_saved_source(hift_fx):
    """The fixture's speech is decode(speech_feat, source) exactly: check the decoder alone."""
    fx, config, params = hift_fx
    inputs, outputs = fx.inputs(), fx.outputs()
    speech = hift_decode(params, inputs["speech_feat"], outputs["source"][:, 0], config)
    ok, _, _, detail = compare({"speech": outputs["speech"]}, {"speech": np.asarray(speech)},
                               fx.manifest["atol"], fx.manifest["rtol"])
    assert ok, detail


def _pipeline_fixture(name):
    dirs = [d for d in fixture_dirs() if d.name == name]
    if not dirs:
        pytest.skip(f"fixture {name} not present")
    fx = Fixture.load(dirs[0])
    weights = {k[len("hift."):]: v for k, v in fx.weights().items() if k.startswith("hift.")}
    return fx, weights


def test_hift_on_token2wav_hift_mel():
    """The vocoder half of token2wav_hift: our HiFT on the fixture's saved flow mel."""
    fx, weights = _pipeline_fixture("token2wav_hift")
    config = hift_config_from_reference(fx.config["hift"])
    inputs, outputs = fx.inputs(), fx.outputs()
    out = hift_inference(convert_hift.from_state_dict(weights, config), outputs["mel"], config,
                         noise=NSFNoise(inputs["nsf_phase_rand"], inputs["nsf_sine_noise"]))
    ok, _, _, detail = compare({"speech": outputs["speech"]}, {"speech": np.asarray(out.speech)},
                               fx.manifest["atol"], fx.manifest["rtol"])
    assert ok, detail


@pytest.mark.slow
def test_bigvgan_on_token2wav_mel():
    """The vocoder half of token2wav: the saved mel, reflect-padded by 3 frames a side, through BigVGAN."""
    fx, weights = _pipeline_fixture("token2wav")
    config = bigvgan_config_from_reference(fx.config["hift"])
    outputs = fx.outputs()
    mel = np.pad(outputs["mel"], ((0, 0), (0, 0), (3, 3)), mode="reflect")
    wav = bigvgan_inference(convert_bigvgan.from_state_dict(weights, config), mel, config)
    ok, _, _, detail = compare({"speech": outputs["speech"]}, {"speech": np.asarray(wav)},
                               fx.manifest["atol"], fx.manifest["rtol"])
    assert ok, detail


# ------------------------------------------------------------------------------- lengths


def test_hift_lengths_real_config():
    """Appendix A: a (1, 80, 10) mel gives 4800 samples, a 4800-sample source and 10 f0 frames."""
    config = HiFTConfig()
    params = abstract_params(config)
    out = jax.eval_shape(lambda p, m, k: hift_inference(p, m, config, key=k), params,
                         jax.ShapeDtypeStruct((1, 80, 10), jnp.float32), jax.random.PRNGKey(0))
    assert out.speech.shape == (1, 4800) and out.source.shape == (1, 4800) and out.f0.shape == (1, 10)
    assert config.hop == 480 and config.source_down_rates == (15, 3, 1)


def test_hift_key_path_and_bad_input(hift_fx):
    fx, config, params = hift_fx
    mel = fx.inputs()["speech_feat"]  # the parity run's shape, so the compiled function is reused
    a = hift_inference(params, mel, config, key=jax.random.PRNGKey(1))
    b = hift_inference(params, mel, config, key=jax.random.PRNGKey(1))
    c = hift_inference(params, mel, config, key=jax.random.PRNGKey(2))
    assert a.speech.shape == (1, 20 * 480) and np.all(np.abs(np.asarray(a.speech)) <= config.audio_limit)
    np.testing.assert_array_equal(a.speech, b.speech)
    assert not np.array_equal(a.speech, c.speech)  # the NSF noise really comes from the key
    with pytest.raises(HiFTInputError, match="key="):
        hift_inference(params, mel, config)
    with pytest.raises(HiFTInputError, match="mel must be"):
        hift_inference(params, mel[:, :40], config, key=jax.random.PRNGKey(0))
    bad = NSFNoise(np.zeros((1, 9), np.float32), np.zeros((1, 100, 9), np.float32))
    with pytest.raises(HiFTInputError, match="sine_noise"):
        hift_inference(params, mel, config, noise=bad)


def test_bigvgan_lengths_and_bad_input():
    fx = Fixture.load(BIGVGAN_DIRS[0])
    config = bigvgan_config_from_reference(fx.config)
    t = fx.inputs()["mel"].shape[-1]
    assert config.frames_consumed == 6 and fx.outputs()["wav"].shape[-1] == (t - 6) * config.hop == (t - 6) * 480
    assert BigVGANConfig(conv_pre_padding=3).frames_consumed == 0  # NVIDIA's padding keeps every frame
    params = convert_bigvgan.abstract_params(config)
    with pytest.raises(BigVGANInputError, match="frames > 6"):
        bigvgan_inference(params, np.zeros((1, 80, 6), np.float32), config)
    with pytest.raises(BigVGANInputError, match="mel must be"):
        bigvgan_inference(params, np.zeros((1, 81, 16), np.float32), config)


# ---------------------------------------------------------------------------- STFT pieces


def test_stft_istft_round_trip_and_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 96)).astype(np.float32)
    re, im = stft(jnp.asarray(x), 16, 4)
    window = torch.hann_window(16, periodic=True)
    ref = torch.stft(torch.from_numpy(x), 16, 4, 16, window=window, center=True, return_complex=True)
    np.testing.assert_allclose(re, ref.real.numpy().transpose(0, 2, 1), atol=2e-5)
    np.testing.assert_allclose(im, ref.imag.numpy().transpose(0, 2, 1), atol=2e-5)
    back = istft(re, im, 16, 4)
    assert back.shape == (2, 96)
    np.testing.assert_allclose(back, x, atol=1e-5)


def test_conv_transpose_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for cin, cout, k, s, p in [(6, 4, 16, 8, 4), (5, 3, 11, 5, 3), (3, 2, 7, 3, 2), (4, 4, 4, 2, 1)]:
        ref = torch.nn.ConvTranspose1d(cin, cout, k, s, padding=p)
        x = rng.normal(size=(2, cin, 9)).astype(np.float32)
        want = ref(torch.from_numpy(x)).detach().numpy()
        params = {"kernel": ref.weight.detach().numpy().transpose(2, 1, 0), "bias": ref.bias.detach().numpy()}
        got = ConvTranspose1d(cout, k, stride=s, padding=p).apply({"params": params}, x.transpose(0, 2, 1))
        assert got.shape == (2, (9 - 1) * s - 2 * p + k, cout)
        np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1), want, atol=1e-5)


# ------------------------------------------------------------------------------ weight norm


@pytest.mark.parametrize("kind", ["conv", "conv_transpose"])
def test_weight_norm_fold_matches_torch(kind):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.parametrizations import weight_norm  # noqa: PLC0415  (torch is optional: the convert extra)
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(5, 7, 3) if kind == "conv" else torch.nn.ConvTranspose1d(5, 7, 4, 2)
    conv = weight_norm(conv)  # dim 0: per output channel for Conv1d, per *input* channel for the transpose
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(torch.rand_like(conv.parametrizations.weight.original0) + 0.5)
    sd = {k: v.detach().numpy() for k, v in conv.state_dict().items()}
    g, v = sd["parametrizations.weight.original0"], sd["parametrizations.weight.original1"]
    want = conv.weight.detach().numpy()
    np.testing.assert_allclose(sources.fold_weight_norm(g, v), want, rtol=1e-6, atol=1e-7)
    # the source view exposes the pair as one `weight`, for the old API's names too
    old_style = {"m.weight_g": g, "m.weight_v": v, "m.bias": sd["bias"]}
    src = sources.WeightNormSource(DictSource(old_style))
    assert sorted(src.names()) == ["m.bias", "m.weight"]
    np.testing.assert_allclose(src.get("m.weight"), want, rtol=1e-6, atol=1e-7)
    g2, v2 = sources.unfold_weight_norm(want)
    np.testing.assert_allclose(sources.fold_weight_norm(g2, v2), want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- converters


def test_hift_round_trip(hift_fx):
    fx, config, params = hift_fx
    sd = convert_hift.to_state_dict(params, config)
    assert set(sd) == set(fx.weights())
    again = convert_hift.from_state_dict(sd, config)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    old = convert_hift.to_state_dict(params, config, weight_norm="old")
    assert "conv_pre.weight_g" in old and "conv_pre.parametrizations.weight.original0" not in old


def test_hift_converter_bad_input(hift_fx, tmp_path):
    fx, config, _ = hift_fx
    w = fx.weights()
    missing = dict(w)
    del missing["ups.1.parametrizations.weight.original1"]
    with pytest.raises(ConversionError, match="ups.1.parametrizations.weight.original0"):
        convert_hift.from_state_dict(missing, config)
    wrong = dict(w)
    wrong["conv_post.bias"] = np.zeros(17, np.float32)
    with pytest.raises(ConversionError, match="conv_post.bias"):
        convert_hift.from_state_dict(wrong, config)
    bad_g = dict(w)
    bad_g["conv_pre.parametrizations.weight.original0"] = np.ones((1, 80, 1), np.float32)
    with pytest.raises(ConversionError, match="conv_pre.parametrizations.weight.original0"):
        convert_hift.from_state_dict(bad_g, config)
    extra = dict(w, **{"spurious.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="spurious.weight"):
        convert_hift.from_state_dict(extra, config)
    with pytest.raises(ConversionError, match="not found"):
        convert_hift.from_checkpoint(tmp_path / "nope.pt", config)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable torch checkpoint"):
        convert_hift.from_checkpoint(junk, config)


def test_hift_from_torch_file(hift_fx, tmp_path):
    torch = pytest.importorskip("torch")
    fx, config, params = hift_fx
    path = tmp_path / "hift.pt"
    torch.save({k: torch.from_numpy(v) for k, v in fx.weights().items()}, path)
    loaded = convert_hift.from_checkpoint(path, config)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_bigvgan_converter_checks_filters():
    fx = Fixture.load(BIGVGAN_DIRS[0])
    config = bigvgan_config_from_reference(fx.config)
    w = dict(fx.weights())
    w["resblocks.3.activations.2.upsample.filter"] = w["resblocks.3.activations.2.upsample.filter"] * 1.01
    with pytest.raises(ConversionError, match="resblocks.3.activations.2.upsample.filter"):
        convert_bigvgan.from_state_dict(w, config)


# ---------------------------------------------------------------------------------- configs


def test_configs_validate():
    manifest = json.loads((HIFT_DIRS[0] / "manifest.json").read_text())
    config = hift_config_from_reference(manifest["config"])
    assert config.base_channels == 64 and config.f0_cond_channels == 64 and config.istft_n_fft == 16
    with pytest.raises(ConfigError, match="hift.upsample_kernel_sizes"):
        HiFTConfig(upsample_kernel_sizes=(16, 11))
    with pytest.raises(ConfigError, match="hift.istft_hop_len"):
        HiFTConfig(istft_hop_len=5)
    with pytest.raises(ConfigError, match="hift.bogus"):
        hift_config_from_reference({"bogus": 1})
    with pytest.raises(ConfigError, match="bigvgan.resblock"):
        BigVGANConfig(resblock="3")
    with pytest.raises(ConfigError, match="bigvgan.activation"):
        BigVGANConfig(activation="relu")


# ------------------------------------------------------------------------------------ the registry


def test_vocoder_registry_is_the_one_table():
    """token2wav.vocoder's names, the decoder's table, the converters' table and the config sections
    agree, and an entry's fields fit its config class."""
    assert tuple(vocoders.REGISTRY) == config_mod.VOCODERS == tuple(CONVERTERS)
    for name, entry in vocoders.REGISTRY.items():
        default = entry.config_class()
        assert entry.name == name and isinstance(getattr(config_mod.Config(), name), entry.config_class)
        assert entry.mel_channels(default) == 80 and vocoders.for_config(default) is entry
        assert vocoders.get(name) is entry
    assert vocoders.get("hift").nsf is not None and vocoders.get("hift").context == 0
    assert vocoders.get("bigvgan").nsf is None and vocoders.get("bigvgan").context == config_mod.BIGVGAN_CONTEXT
    assert vocoder_of_yaml({"in_channels": 80}) == "hift"
    assert vocoder_of_yaml({"upsample_initial_channel": 512}) == "bigvgan"
    with pytest.raises(ConfigError, match="token2wav.vocoder: one of"):
        vocoders.get("vocos")
    with pytest.raises(ConfigError, match="HiFTConfig or BigVGANConfig"):
        vocoders.for_config(object())
    mel = np.arange(2 * 80 * 5, dtype=np.float32).reshape(2, 80, 5)
    padded = vocoders.get("bigvgan").pad(mel)
    assert padded.shape == (2, 80, 11)
    np.testing.assert_array_equal(padded[..., :3], mel[..., 3:0:-1])  # reflect, edge not repeated
    assert vocoders.get("hift").pad(mel) is mel
