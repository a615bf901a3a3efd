"""Reference models and small released-format files shared by the tests.

* A fake `Step-Audio-Tokenizer/` folder: a FunASR Paraformer folder (torch pickle in the official
  names, config.yaml, am.mvn), the k-means codebook, and a `speech_tokenizer_v1.onnx` exported from
  the PyPI `s3tokenizer` model (random init, small config) with the legacy exporter, so the graph has
  the release's node naming.
* A minimal torch CAM++ in the 3D-Speaker / funasr state_dict names and its `campplus.onnx` export.
"""

from __future__ import annotations

import pathlib
import sys
import types
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import yaml

from editx_jax.convert import paraformer as cp
from editx_jax.tokenizer.audio_tokenizer import AudioTokenizerConfig
from editx_jax.tokenizer.paraformer import random_params


def import_pypi_s3tokenizer():
    """(torch, s3tokenizer.model), skipping the test when they are not installed."""
    torch = pytest.importorskip("torch")
    try:
        import torchaudio  # noqa: F401, PLC0415  (optional, and only to satisfy s3tokenizer's import)
    except ImportError:  # s3tokenizer.utils imports it only for load_audio, which is not used here
        sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    model = pytest.importorskip("s3tokenizer.model")
    return torch, model


def export_s3_onnx(path: pathlib.Path, ref_cfg: dict, seed: int = 1234, frames: int = 301, mel=None):
    """Export a random PyPI S3Tokenizer (25 Hz v1, `ref_cfg` = its ModelConfig fields) to `path`, as
    (feats [1, n_mels, T], feats_length int32 [1]) -> indices, traced on `mel` ([1, n_mels, T] float32;
    default: seeded noise of `frames` frames). Returns the torch model (eval mode)."""
    torch, model = import_pypi_s3tokenizer()
    torch.manual_seed(seed)
    tok = model.S3Tokenizer("speech_tokenizer_v1_25hz", model.ModelConfig(**ref_cfg)).eval()
    with torch.no_grad():  # non-trivial values everywhere, so no two initializers are equal
        for name, p in list(tok.named_parameters()) + list(tok.named_buffers()):
            if name.endswith("positional_embedding"):
                continue
            if name.endswith("_ln.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("embed"):
                p.copy_(torch.randn_like(p) * (0.05 + 0.1 * torch.rand(p.shape[0], 1)))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))

    class Exported(torch.nn.Module):  # the release's signature: (feats, feats_length) -> codes
        def __init__(self, tok):
            super().__init__()
            self.encoder, self.quantizer = tok.encoder, tok.quantizer

        def forward(self, mel, mel_len):
            hidden, _ = self.encoder(mel, mel_len)
            return self.quantizer.encode(hidden)

    if mel is None:
        mel = (np.random.default_rng(seed).standard_normal((1, ref_cfg["n_mels"], frames)) * 0.5).astype(np.float32)
    mel = torch.from_numpy(np.asarray(mel, np.float32))
    mel_len = torch.tensor([mel.shape[-1]], dtype=torch.int32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Exported(tok).eval(), (mel, mel_len), str(path), input_names=["feats", "feats_length"],
                          output_names=["indices"],
                          dynamic_axes={"feats": {2: "T"}},  # keeps the full position table + Slice
                          opset_version=17, dynamo=False)
    return tok


def write_am_mvn(path: pathlib.Path, cmvn: np.ndarray) -> None:
    d = cmvn.shape[1]
    fmt = lambda v: " ".join(f"{x:.9g}" for x in v)  # noqa: E731
    path.write_text(f"<Nnet>\n<Splice> {d} {d}\n[ 0 ]\n<AddShift> {d} {d}\n<LearnRateCoef> 0 [ {fmt(cmvn[0])} ]\n"
                    f"<Rescale> {d} {d}\n<LearnRateCoef> 0 [ {fmt(cmvn[1])} ]\n</Nnet>\n")


TINY_S3 = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
               n_codebook_size=4096)


def write_step_audio_tokenizer(root: pathlib.Path, seed: int = 0, s3_cfg: dict | None = None,
                               onnx_frames: int = 301) -> pathlib.Path:
    """A fake released `Step-Audio-Tokenizer/` at `root` with a small Paraformer (560 -> 64, 4 blocks)
    and a small S3 tokenizer; the front ends are the real ones. The legacy exporter traces the
    padding mask with a constant length, so onnxruntime runs the ONNX file on `onnx_frames` mel
    frames only."""
    import torch  # noqa: PLC0415  (torch is optional: the convert extra)

    cfg = AudioTokenizerConfig.tiny().paraformer
    folder = root / cp.PARAFORMER_SUBDIR
    folder.mkdir(parents=True)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
          cp.export_state_dict(random_params(cfg, seed)).items()}
    sd["decoder.decoders.0.self_attn.linear_q.weight"] = torch.zeros(4, 4)  # non-encoder keys: ignored
    sd["predictor.cif_output.bias"] = torch.zeros(1)
    torch.save(sd, folder / "model.pt")
    conf = {
        "model": "ParaformerStreaming",
        "encoder": "SANMEncoderChunkOpt",
        "encoder_conf": {"output_size": cfg.output_size, "attention_heads": cfg.attention_heads,
                         "linear_units": cfg.linear_units, "num_blocks": cfg.num_blocks, "dropout_rate": 0.1,
                         "input_layer": "pe_online", "kernel_size": cfg.kernel_size, "sanm_shfit": 0,
                         "selfattention_layer_type": "sanm", "chunk_size": [12, 15], "stride": [8, 10]},
        "frontend": "WavFrontendOnline",
        "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25, "frame_shift": 10,
                          "lfr_m": 7, "lfr_n": 6},
        "input_size": 560,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(conf))
    rng = np.random.default_rng(seed)
    cmvn = np.stack([-10.0 + rng.standard_normal(560), 0.25 + 0.02 * rng.standard_normal(560)]).astype(np.float32)
    write_am_mvn(folder / "am.mvn", cmvn)
    np.save(root / cp.CODEBOOK_FILE, rng.standard_normal((1024, cfg.output_size)).astype(np.float32))
    export_s3_onnx(root / "speech_tokenizer_v1.onnx", s3_cfg or TINY_S3, seed=seed + 1234, frames=onnx_frames)
    return root


# ------------------------------------------------------------------ torch CAM++


def torch_campplus(config):
    """A minimal torch CAM++ with 3D-Speaker / funasr state_dict names (test-only reference)."""
    import torch  # noqa: PLC0415  (torch is optional: the convert extra)
    import torch.nn.functional as F  # noqa: PLC0415  (as above)
    from torch import nn  # noqa: PLC0415  (as above)

    def bn_relu(c):
        return nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(c)), ("relu", nn.ReLU())]))

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


def export_campplus_onnx(model, feat, path):
    """`campplus.onnx` the way the release was made: the legacy exporter, which folds conv+BN pairs."""
    import torch  # noqa: PLC0415  (torch is optional: the convert extra)
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(feat),), str(path), dynamo=False, input_names=["feat"],
                          output_names=["embedding"], opset_version=17)
