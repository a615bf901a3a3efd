"""The released `Step-Audio-Tokenizer/` folder -> the audio tokenizer's params and config
(architecture.md §2.1-§2.3): the FunASR Paraformer folder (model.pt, config.yaml, am.mvn), the
vq02 k-means codebook (linguistic_tokenizer.npy) and the vq06 S3 tokenizer (speech_tokenizer_v1.onnx).

`convert_tokenizer` writes a checkpoint folder that `AudioTokenizer.from_pretrained` reads;
`tokenizer_from_released` converts in memory. The sizes are read from the files (the S3 tokenizer's
from its ONNX graph), never guessed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import time
from typing import Mapping

import numpy as np
import yaml
from tqdm import tqdm

from editx_jax import checkpoint
from editx_jax.config import ConfigError
from editx_jax.config.audio import AudioTokenizerConfig, FbankConfig, S3TokenizerConfig, WhisperMelConfig
from editx_jax.convert import paraformer as cp
from editx_jax.convert import s3tokenizer as cs
from editx_jax.convert.keymap import ConversionError, DictSource, convert
from editx_jax.tokenizer import paraformer as pf
from editx_jax.tokenizer import s3tokenizer as s3
from editx_jax.tokenizer.audio_tokenizer import COMPONENT, AudioTokenizer
from editx_jax.tree import flatten

ONNX_FILE = "speech_tokenizer_v1.onnx"


def fbank_config_from_reference(ref: dict) -> FbankConfig:
    """From funasr `WavFrontend(Online)` arguments (fixture manifests, config.yaml `frontend_conf`)."""
    known = {"fs", "window", "n_mels", "frame_length", "frame_shift", "lfr_m", "lfr_n", "dither",
             "snip_edges", "upsacle_samples", "cmvn_file", "chunk_size", "chunk_stride_samples",
             "filter_length_min", "filter_length_max"}
    unknown = sorted(set(ref) - known)
    if unknown:
        raise ConfigError(f"fbank: unknown front-end option(s) {unknown}")
    if not ref.get("snip_edges", True):
        raise ConfigError("fbank.snip_edges: only snip_edges=True is implemented")
    chunk = ref.get("chunk_stride_samples")
    if chunk is None and "chunk_size" in ref:
        chunk = int(ref["chunk_size"][1]) * 960
    args = dict(sample_rate=ref.get("fs"), window=ref.get("window"), n_mels=ref.get("n_mels"),
                frame_length_ms=ref.get("frame_length"), frame_shift_ms=ref.get("frame_shift"),
                lfr_m=ref.get("lfr_m"), lfr_n=ref.get("lfr_n"), dither=ref.get("dither"),
                upscale_samples=ref.get("upsacle_samples"), chunk_samples=chunk)
    return FbankConfig(**{k: v for k, v in args.items() if v is not None})


def whisper_mel_config_from_reference(ref: dict) -> WhisperMelConfig:
    """From whisper.log_mel_spectrogram arguments (fixture manifests)."""
    unknown = sorted(set(ref) - {f.name for f in dataclasses.fields(WhisperMelConfig)})
    if unknown:
        raise ConfigError(f"whisper_mel: unknown option(s) {unknown}")
    return WhisperMelConfig(**ref)


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="tensor")


def _ticking(bar):
    if bar is None:
        return None

    def wrap(names):
        for name in names:
            yield name
            bar.update(1)
    return wrap


def infer_s3_config(onnx_path, **overrides) -> S3TokenizerConfig:
    """The S3 tokenizer sizes of an exported `speech_tokenizer_v1.onnx`, read from its graph: widths
    from conv1 and the position table, layers from the block node names, heads from the head-count
    constant that divides the width (`/blocks.0/attn/Constant_1`), the codebook from the MatMul
    outside the blocks, conv1's stride from its attributes."""
    import onnx  # noqa: PLC0415  (optional: the `convert` extra)
    from onnx import numpy_helper  # noqa: PLC0415  (optional: the `convert` extra)

    path = pathlib.Path(onnx_path)
    if not path.is_file():
        raise ConversionError(f"ONNX file not found: {path}")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:
        raise ConversionError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    inits = {t.name: t for t in graph.initializer}
    shapes = {n: tuple(t.dims) for n, t in inits.items()}
    conv1 = next((n for n in graph.node if n.op_type == "Conv" and re.search(r"(?:^|/)conv1/Conv$", n.name)), None)
    if conv1 is None or len(conv1.input) < 2 or conv1.input[1] not in shapes:
        raise ConversionError(f"{path}: no conv1/Conv node with a weight initializer (not an S3 tokenizer?)")
    state, n_mels, _ = shapes[conv1.input[1]]
    stride = next((list(a.ints)[0] for a in conv1.attribute if a.name == "strides"), 1)
    pos = [s for n, s in shapes.items() if n.endswith("positional_embedding") and len(s) == 2]
    layers = {int(m[1]) for n in graph.node if (m := re.search(r"(?:^|/)blocks\.(\d+)/", n.name))}
    heads = None
    for node in graph.node:
        if node.op_type == "Constant" and re.search(r"(?:^|/)blocks\.0/attn/Constant_1$", node.name):
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1 and value.dtype.kind in "iu" and int(value) > 0 and state % int(value) == 0:
                heads = int(value)
    codebooks = [s[1] for n in graph.node if n.op_type == "MatMul" and not re.search(r"blocks\.\d+/", n.name)
                 for i in n.input if (s := shapes.get(i)) and len(s) == 2 and s[0] == state]
    fields = dict(n_mels=int(n_mels), n_audio_state=int(state), n_audio_layer=len(layers),
                  conv1_stride=int(stride))
    if pos:
        fields["n_audio_ctx"] = int(pos[0][0])
    if heads:
        fields["n_audio_head"] = heads
    if len(set(codebooks)) == 1:
        fields["codebook_size"] = int(codebooks[0])
    fields.update(overrides)
    if "n_audio_head" not in fields:
        raise ConversionError(f"{path}: cannot find the head count (/blocks.0/attn/Constant_1); pass it")
    if not layers:
        raise ConversionError(f"{path}: no /blocks.N/ nodes (not an S3 tokenizer?)")
    return S3TokenizerConfig(**fields)


def load_released(root, progress: bool = False, dtype=None, s3_overrides: Mapping | None = None,
                  **overrides) -> tuple[AudioTokenizerConfig, dict, dict]:
    """(config, params, info) of a released `Step-Audio-Tokenizer/` folder: the FunASR Paraformer
    folder (model.pt, config.yaml, am.mvn), linguistic_tokenizer.npy and speech_tokenizer_v1.onnx.
    Every tensor is used exactly once (ConversionError names any that is not)."""
    if dtype not in (None, "float32"):
        raise ValueError(f"the tokenizer is kept in float32 (codes must match exactly), got dtype {dtype!r}")
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ConversionError(f"not a folder: {root}")
    para_dir = root / cp.PARAFORMER_SUBDIR
    if not para_dir.is_dir():
        raise ConversionError(f"{root}: no {cp.PARAFORMER_SUBDIR}/ (expected the Step-Audio-Tokenizer folder)")
    onnx_path = root / ONNX_FILE
    if not onnx_path.is_file():
        raise ConversionError(f"{root}: no {ONNX_FILE}")
    para_cfg = cp.read_config_yaml(para_dir / "config.yaml")
    cmvn = cp.read_am_mvn(para_dir / "am.mvn", para_cfg.input_size)
    codebook = cp.load_codebook(root / cp.CODEBOOK_FILE, para_cfg.output_size)
    s3_cfg = infer_s3_config(onnx_path, **dict(s3_overrides or {}))
    source = cp.encoder_source(para_dir / "model.pt")
    s3_state = cs.onnx_to_state_dict(onnx_path, s3_cfg)
    bar = _progress_bar(progress, len(source.names()) + len(s3_state), "convert tokenizer")
    try:
        para_params = convert(source, cp.RULES, pf.abstract_params(para_cfg), progress=_ticking(bar))
        s3_params = convert(DictSource(s3_state), cs.RULES, s3.abstract_params(s3_cfg), progress=_ticking(bar))
    finally:
        if bar is not None:
            bar.close()
    fbank = fbank_config_from_reference(_frontend_conf(para_dir / "config.yaml"))
    config = AudioTokenizerConfig(paraformer=para_cfg, fbank=fbank, s3=s3_cfg, vq02_codes=codebook.shape[0],
                                  **overrides)
    params = {"paraformer": para_params, "cmvn": cmvn, "vq02_codebook": codebook, "s3tokenizer": s3_params}
    info = {"paraformer_tensors": len(source.names()), "ignored": sorted(source.ignored),
            "s3_tensors": len(s3_state)}
    return config, params, info


def _frontend_conf(path: pathlib.Path) -> dict:
    """config.yaml's frontend_conf, without the options that are not front-end maths (cmvn file)
    and with dither forced to 0: the official run dithers with unseeded noise (§2.1.1); we do not."""
    conf = yaml.safe_load(path.read_text()) or {}
    front = dict(conf.get("frontend_conf") or {})
    front.pop("cmvn_file", None)
    front["dither"] = 0.0
    return front


def tokenizer_from_released(root, progress: bool = False, **overrides) -> AudioTokenizer:
    """Convert a released `Step-Audio-Tokenizer/` folder in memory (nothing is written)."""
    config, params, _ = load_released(root, progress=progress, **overrides)
    return AudioTokenizer(config, params)


def convert_tokenizer(src, dst, progress: bool = True, dtype=None) -> dict:
    """`Step-Audio-Tokenizer/` -> an editx-jax tokenizer checkpoint folder (both encoders, the CMVN,
    the k-means codebook and one config.json), loadable by `AudioTokenizer.from_pretrained(dst)`."""
    start = time.time()
    config, params, info = load_released(src, progress=progress, dtype=dtype)
    meta = {"component": COMPONENT, "dtype": "float32", "converted_from": str(pathlib.Path(src).absolute()),
            **info}
    checkpoint.save_params(dst, params, config, meta)
    nbytes = sum(np.asarray(a).nbytes for a in flatten(params).values())
    return {"tensors": info["paraformer_tensors"] + info["s3_tensors"] + 2, "ignored": len(info["ignored"]),
            "dtype": "float32", "bytes": nbytes, "seconds": round(time.time() - start, 2),
            "dst": str(pathlib.Path(dst).absolute())}
