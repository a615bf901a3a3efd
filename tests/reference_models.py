"""Small released-format tokenizer files written by tests: a fake `Step-Audio-Tokenizer/` folder with
a FunASR Paraformer folder (torch pickle in the official names, config.yaml, am.mvn), the k-means
codebook, and a `speech_tokenizer_v1.onnx` exported from the PyPI `s3tokenizer` model (random init,
small config) with the legacy exporter, so the graph has the release's node naming."""

from __future__ import annotations

import pathlib
import sys
import types

import numpy as np
import pytest


def import_pypi_s3tokenizer():
    """(torch, s3tokenizer.model), skipping the test when they are not installed."""
    torch = pytest.importorskip("torch")
    try:
        import torchaudio  # noqa: F401
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
    import warnings
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
    import torch
    import yaml

    from editx_jax.convert import paraformer as cp
    from editx_jax.tokenizer.paraformer import random_params

    from editx_jax.tokenizer.pipeline import AudioTokenizerConfig
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
