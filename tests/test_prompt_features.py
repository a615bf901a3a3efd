"""The prompt features: the 24 kHz flow mel, the CAM++ fbank and the CAM++ speaker embedding.

Parity on the `mel_24k`, `campplus_fbank` and `campplus` fixtures; the campplus.onnx converter on an
ONNX file exported here from a small torch CAM++ (written below, checked against the fixture first);
shapes from architecture.md Appendix A; bad input.
"""

import json
import pathlib

import numpy as np
import pytest
from conftest import FIXTURES, fixture_dirs
from reference_models import export_campplus_onnx, torch_campplus

from editx_jax.config import ConfigError
from editx_jax.convert import campplus as convert_campplus
from editx_jax.convert.campplus import campplus_config_from_reference
from editx_jax.convert.decoder import mel_config_from_reference
from editx_jax.convert.keymap import ConversionError
from editx_jax.decoder import campplus, mel
from editx_jax.parity import Fixture, check_fixture, compare

COMPONENTS = ("mel_24k", "campplus_fbank", "campplus")


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("component", COMPONENTS)
def test_parity(component):
    dirs = fixture_dirs(component)
    assert dirs, f"no {component} fixture under {FIXTURES}"
    for path in dirs:
        result = check_fixture(path)
        assert result.status == "PASS", result.line()


def test_mel_symmetric_window_would_fail():
    """The periodic Hann window matters (the fixture's soft spot: 10-18x the tolerance)."""
    fx = Fixture.load(FIXTURES / "mel_24k")
    want = fx.outputs()["speech_feat"]
    config = mel.MelConfig()
    wave = fx.outputs()["wav"]
    padded = mel.reflect_pad(wave, config)
    n = np.arange(config.n_fft)
    symmetric = (0.5 - 0.5 * np.cos(2 * np.pi * n / (config.n_fft - 1))).astype(np.float32)
    idx = np.arange(want.shape[1])[:, None] * config.hop_size + n[None, :]
    spec = np.fft.rfft(padded[..., idx] * symmetric, axis=-1)
    wrong = np.log(np.maximum(np.sqrt(np.abs(spec) ** 2 + 1e-9) @ mel.mel_basis(config), 1e-5))
    assert np.abs(wrong - want).max() > 10 * float(fx.manifest["atol"])
    got = np.asarray(mel.mel_spectrogram(wave, config))
    assert np.abs(got - want).max() < float(fx.manifest["atol"])


# ----------------------------------------------------------------------------------- shapes, API


def test_mel_shape_appendix_a():
    """A 1 s, 24 kHz prompt gives a (1, 50, 80) mel (architecture.md Appendix A); batched too."""
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal((1, 24000))).astype(np.float32)
    out = mel.mel_spectrogram(wave)
    assert out.shape == (1, 50, 80)
    assert mel.num_mel_frames(24000) == 50
    batch = np.concatenate([wave, 0.5 * wave])
    both = np.asarray(mel.mel_spectrogram(batch))
    assert both.shape == (2, 50, 80)
    np.testing.assert_allclose(both[0], np.asarray(out[0]), atol=1e-5)
    # the traceable version agrees with the bucketed jitted one
    np.testing.assert_allclose(np.asarray(mel.mel_spectrogram_jnp(wave)), np.asarray(out), atol=1e-4)


def test_speaker_embedding_end_to_end():
    """wave at 24 kHz -> resample -> fbank + CMN -> CAM++, equal to the fixture's front end + network."""
    fx_fbank, fx_net = Fixture.load(FIXTURES / "campplus_fbank"), Fixture.load(FIXTURES / "campplus")
    config = campplus_config_from_reference(fx_net.config)
    params = convert_campplus.from_state_dict(fx_net.weights(), config)
    inputs = fx_fbank.inputs()
    emb = campplus.speaker_embedding(params, inputs["wav"][0], int(inputs["sample_rate"]), config)
    assert emb.shape == (config.embedding_size,)
    want = campplus.embed_feats(params, fx_fbank.outputs()["feat"][None], config)[0]
    np.testing.assert_allclose(np.asarray(emb), np.asarray(want), atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------ torch CAM++ and the ONNX path


@pytest.fixture(scope="module")
def torch_reference():
    """The torch CAM++ loaded strictly with the fixture weights, checked against the fixture."""
    torch = pytest.importorskip("torch")
    fx = Fixture.load(FIXTURES / "campplus")
    config = campplus_config_from_reference(fx.config)
    model = torch_campplus(config)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in fx.weights().items()}, strict=True)
    feat = fx.inputs()["feat"]
    with torch.no_grad():
        emb = model(torch.from_numpy(feat)).numpy()
    ok, _, _, detail = compare({"embedding": fx.outputs()["embedding"]}, {"embedding": emb},
                               float(fx.manifest["atol"]), float(fx.manifest["rtol"]))
    assert ok, f"the test's torch CAM++ does not reproduce the fixture: {detail}"
    return fx, config, model


def test_onnx_converter_matches_state_dict(torch_reference, tmp_path):
    onnx = pytest.importorskip("onnx")
    fx, config, model = torch_reference
    feat = fx.inputs()["feat"]
    path = tmp_path / "campplus.onnx"
    export_campplus_onnx(model, feat, path)
    graph = onnx.load(str(path)).graph
    # like the released file: the exporter folded conv+BN pairs into anonymous conv weights
    anonymous = [t.name for t in graph.initializer if t.name.startswith("onnx::")]
    assert anonymous, "expected BN-folded anonymous initializers in the export"
    assert any(n.op_type == "BatchNormalization" for n in graph.node)

    tensors, eps, found = convert_campplus.onnx_to_state_dict(str(path))
    assert found == config
    assert "head.bn1.running_mean" not in tensors and "head.conv1.bias" in tensors  # folded in the file
    from_onnx = convert_campplus.from_onnx(str(path))
    from_sd = convert_campplus.from_state_dict(fx.weights(), config)
    emb_onnx = np.asarray(campplus.embed_feats(from_onnx, feat, config))
    emb_sd = np.asarray(campplus.embed_feats(from_sd, feat, config))
    np.testing.assert_allclose(emb_onnx, emb_sd, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(emb_onnx, fx.outputs()["embedding"], atol=float(fx.manifest["atol"]),
                               rtol=float(fx.manifest["rtol"]))

    # without node names the convs are mapped by execution order, with the same result
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.name = ""
    by_order = convert_campplus.from_onnx(proto)
    emb_order = np.asarray(campplus.embed_feats(by_order, feat, config))
    np.testing.assert_array_equal(emb_order, emb_onnx)


# --------------------------------------------------------------------------------------- bad input


def _small_weights():
    return Fixture.load(FIXTURES / "campplus").weights()


def test_converter_rejects_bad_state_dicts():
    config = campplus_config_from_reference(json.loads((FIXTURES / "campplus" / "manifest.json").read_text())["config"])
    weights = _small_weights()
    missing = dict(weights)
    del missing["xvector.block2.tdnnd3.cam_layer.linear2.weight"]
    with pytest.raises(ConversionError, match=r"xvector\.block2\.tdnnd3\.cam_layer\.linear2\.weight"):
        convert_campplus.from_state_dict(missing, config)
    no_bias = dict(weights)
    del no_bias["xvector.block1.tdnnd4.cam_layer.linear1.bias"]
    with pytest.raises(ConversionError, match=r"missing.*tdnnd4\.cam_layer\.linear1\.bias.*\[8\]"):
        convert_campplus.from_state_dict(no_bias, config)
    bad_bn = dict(weights, **{"head.bn1.running_var": np.ones(7, np.float32)})
    with pytest.raises(ConversionError, match=r"head\.bn1\.running_var.*\[7\].*\[32\]"):
        convert_campplus.from_state_dict(bad_bn, config)
    extra = dict(weights, **{"xvector.block1.tdnnd1.linear1.bias": np.zeros(16, np.float32),
                             "extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="extra.weight"):
        convert_campplus.from_state_dict(extra, config)
    bad_kernel = dict(weights, **{"xvector.tdnn.linear.weight": np.zeros((32, 320, 3), np.float32)})
    with pytest.raises(ConversionError, match=r"xvector\.tdnn\.linear\.weight"):
        convert_campplus.from_state_dict(bad_kernel, config)
    wrong_config = campplus.CAMPPlusConfig(growth_rate=8, bn_size=2, init_channels=32, embedding_size=100)
    with pytest.raises(ConversionError, match=r"xvector\.dense"):
        convert_campplus.from_state_dict(weights, wrong_config)


def test_converter_rejects_bad_onnx(tmp_path):
    with pytest.raises(ConversionError, match="not found"):
        convert_campplus.from_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not a protobuf \x00\xff" * 10)
    with pytest.raises(ConversionError):
        convert_campplus.from_onnx(junk)


def test_bad_input_errors():
    with pytest.raises(mel.MelError, match="samples"):
        mel.mel_spectrogram(np.zeros(500, np.float32))
    with pytest.raises(campplus.SpeakerEmbeddingError, match="400 samples"):
        campplus.campplus_fbank(np.zeros(399, np.float32))
    with pytest.raises(campplus.SpeakerEmbeddingError, match="feats"):
        campplus.embed_feats({}, np.zeros((1, 50, 40), np.float32))
    with pytest.raises(campplus.SpeakerEmbeddingError, match="NaN"):
        campplus.speaker_embedding({}, np.full(16000, np.nan, np.float32), 16000)
    for error in (mel.MelError, campplus.SpeakerEmbeddingError):
        assert issubclass(error, ValueError)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="campplus.feat_dim"):
        campplus.CAMPPlusConfig(feat_dim=81)
    with pytest.raises(ConfigError, match="campplus.dilations"):
        campplus.CAMPPlusConfig(dilations=(1, 2))
    with pytest.raises(ConfigError, match="campplus.config_str"):
        campplus_config_from_reference({"config_str": "batchnorm"})
    with pytest.raises(ConfigError, match="mel.fmax"):
        mel.MelConfig(fmax=20000)
    with pytest.raises(ConfigError, match="mel: unknown"):
        mel_config_from_reference({"num_mels": 80, "bogus": 1})
    assert mel_config_from_reference(json.loads(
        pathlib.Path(FIXTURES / "mel_24k" / "manifest.json").read_text())["config"]["mel_conf"]) == mel.MelConfig()
