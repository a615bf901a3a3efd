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

from editx_jax.config import ConfigError
from editx_jax.convert import campplus as convert_campplus
from editx_jax.convert.keymap import ConversionError
from editx_jax.decoder import campplus, mel
from editx_jax.fixture_runners import decoder_prompt
from editx_jax.parity import Fixture, compare

RUNNERS = {"mel_24k": decoder_prompt.run_mel_24k, "campplus_fbank": decoder_prompt.run_campplus_fbank,
           "campplus": decoder_prompt.run_campplus}


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("component", sorted(RUNNERS))
def test_parity(component):
    dirs = fixture_dirs(component)
    assert dirs, f"no {component} fixture under {FIXTURES}"
    for path in dirs:
        fx = Fixture.load(path)
        ok, max_abs, max_rel, detail = compare(fx.outputs(), RUNNERS[component](fx), float(fx.manifest["atol"]),
                                               float(fx.manifest["rtol"]))
        assert ok, f"{path.name}: {detail} (max_abs={max_abs:.3g})"


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
    config = campplus.CAMPPlusConfig.from_reference(fx_net.config)
    params = convert_campplus.from_state_dict(fx_net.weights(), config)
    inputs = fx_fbank.inputs()
    emb = campplus.speaker_embedding(params, inputs["wav"][0], int(inputs["sample_rate"]), config)
    assert emb.shape == (config.embedding_size,)
    want = campplus.embed_feats(params, fx_fbank.outputs()["feat"][None], config)[0]
    np.testing.assert_allclose(np.asarray(emb), np.asarray(want), atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------ torch CAM++ and the ONNX path


def _torch_campplus(config):
    """A minimal torch CAM++ with 3D-Speaker / funasr state_dict names (test-only reference)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    def bn_relu(c):
        return nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(c)), ("relu", nn.ReLU())]))

    from collections import OrderedDict

    class Res(nn.Module):
        def __init__(self, c, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, (stride, 1), 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)
            self.shortcut = nn.Sequential()
            if stride != 1:
                self.shortcut = nn.Sequential(nn.Conv2d(c, c, 1, (stride, 1), bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + self.shortcut(x))

    class Head(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.conv1 = nn.Conv2d(1, m, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(m)
            self.layer1 = nn.Sequential(Res(m, 2), Res(m, 1))
            self.layer2 = nn.Sequential(Res(m, 2), Res(m, 1))
            self.conv2 = nn.Conv2d(m, m, 3, (2, 1), 1, bias=False)
            self.bn2 = nn.BatchNorm2d(m)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
            x = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(x)))))
            return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])

    class CAM(nn.Module):
        def __init__(self, c, out, k, d):
            super().__init__()
            self.linear_local = nn.Conv1d(c, out, k, padding=(k - 1) // 2 * d, dilation=d, bias=False)
            self.linear1 = nn.Conv1d(c, c // 2, 1)
            self.linear2 = nn.Conv1d(c // 2, out, 1)

        def forward(self, x):
            seg = F.avg_pool1d(x, config.seg_len, config.seg_len, ceil_mode=True)
            seg = seg.unsqueeze(-1).expand(*seg.shape, config.seg_len).reshape(*seg.shape[:-1], -1)
            context = x.mean(-1, keepdim=True) + seg[..., :x.shape[-1]]
            gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
            return self.linear_local(x) * gate

    class Layer(nn.Module):
        def __init__(self, c, d):
            super().__init__()
            self.nonlinear1 = bn_relu(c)
            self.linear1 = nn.Conv1d(c, config.bn_channels, 1, bias=False)
            self.nonlinear2 = bn_relu(config.bn_channels)
            self.cam_layer = CAM(config.bn_channels, config.growth_rate, config.kernel_size, d)

        def forward(self, x):
            return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))

    class Block(nn.ModuleDict):
        def forward(self, x):
            for layer in self.values():
                x = torch.cat([x, layer(x)], dim=1)
            return x

    class Transit(nn.Module):
        def __init__(self, c, out):
            super().__init__()
            self.nonlinear = bn_relu(c)
            self.linear = nn.Conv1d(c, out, 1, bias=False)

        def forward(self, x):
            return self.linear(self.nonlinear(x))

    class TDNN(nn.Module):
        def __init__(self, c, out):
            super().__init__()
            self.linear = nn.Conv1d(c, out, 5, stride=2, padding=2, bias=False)
            self.nonlinear = bn_relu(out)

        def forward(self, x):
            return self.nonlinear(self.linear(x))

    class Stats(nn.Module):
        def forward(self, x):
            return torch.cat([x.mean(-1), x.std(-1, unbiased=True)], dim=-1)

    class Dense(nn.Module):
        def __init__(self, c, out):
            super().__init__()
            self.linear = nn.Conv1d(c, out, 1, bias=False)
            self.nonlinear = nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(out, affine=False))]))

        def forward(self, x):
            return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            m = config.m_channels
            self.head = Head(m)
            xv = OrderedDict([("tdnn", TDNN(m * config.feat_dim // 8, config.init_channels))])
            for b, ((c, out), n, d) in enumerate(zip(config.block_channels(), config.num_layers, config.dilations), 1):
                xv[f"block{b}"] = Block({f"tdnnd{i + 1}": Layer(c + i * config.growth_rate, d) for i in range(n)})
                xv[f"transit{b}"] = Transit(c + n * config.growth_rate, out)
            xv["out_nonlinear"] = bn_relu(config.out_channels)
            xv["stats"] = Stats()
            xv["dense"] = Dense(2 * config.out_channels, config.embedding_size)
            self.xvector = nn.Sequential(xv)

        def forward(self, feat):
            return self.xvector(self.head(feat.permute(0, 2, 1)))

    return Model().eval()


@pytest.fixture(scope="module")
def torch_reference():
    """The torch CAM++ loaded strictly with the fixture weights, checked against the fixture."""
    torch = pytest.importorskip("torch")
    fx = Fixture.load(FIXTURES / "campplus")
    config = campplus.CAMPPlusConfig.from_reference(fx.config)
    model = _torch_campplus(config)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in fx.weights().items()}, strict=True)
    feat = fx.inputs()["feat"]
    with torch.no_grad():
        emb = model(torch.from_numpy(feat)).numpy()
    ok, _, _, detail = compare({"embedding": fx.outputs()["embedding"]}, {"embedding": emb},
                               float(fx.manifest["atol"]), float(fx.manifest["rtol"]))
    assert ok, f"the test's torch CAM++ does not reproduce the fixture: {detail}"
    return fx, config, model


def _export_onnx(model, feat, path):
    import torch
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(feat),), str(path), dynamo=False, input_names=["feat"],
                          output_names=["embedding"], opset_version=17)


def test_onnx_converter_matches_state_dict(torch_reference, tmp_path):
    onnx = pytest.importorskip("onnx")
    fx, config, model = torch_reference
    feat = fx.inputs()["feat"]
    path = tmp_path / "campplus.onnx"
    _export_onnx(model, feat, path)
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
    config = campplus.CAMPPlusConfig.from_reference(json.loads((FIXTURES / "campplus" / "manifest.json").read_text())["config"])
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
        campplus.CAMPPlusConfig.from_reference({"config_str": "batchnorm"})
    with pytest.raises(ConfigError, match="mel.fmax"):
        mel.MelConfig(fmax=20000)
    with pytest.raises(ConfigError, match="mel: unknown"):
        mel.MelConfig.from_reference({"num_mels": 80, "bogus": 1})
    assert mel.MelConfig.from_reference(json.loads(
        pathlib.Path(FIXTURES / "mel_24k" / "manifest.json").read_text())["config"]["mel_conf"]) == mel.MelConfig()
