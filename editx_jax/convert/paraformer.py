"""The vq02 tokenizer files: FunASR Paraformer checkpoint folder -> our params (architecture.md §2.1, §4 item 5).

Inside `Step-Audio-Tokenizer/`:
  dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online/
      model.pt      torch pickle of the whole ASR model; only the 652 `encoder.` tensors are used, the
                    decoder / CIF predictor tensors are skipped (counted in `ParaformerCheckpoint.ignored`)
      config.yaml   encoder_conf / frontend_conf -> ParaformerEncoderConfig
      am.mvn        Kaldi nnet text: <AddShift> and <Rescale> rows, the CMVN after LFR
  linguistic_tokenizer.npy   the 1024 k-means centroids [1024, 512] float32
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping

import numpy as np
import yaml

from editx_jax.audio.features import FrontendError, parse_am_mvn
from editx_jax.config import ConfigError
from editx_jax.convert.keymap import ConversionError, Rule, convert, export
from editx_jax.convert.sources import TorchSource
from editx_jax.tokenizer.paraformer import ParaformerEncoderConfig, abstract_params

PARAFORMER_SUBDIR = "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"
CODEBOOK_FILE = "linguistic_tokenizer.npy"
PREFIX = "encoder."


def _layer_rules(source_prefix: str, target_prefix: str, stack: str | None) -> list[Rule]:
    parts = [
        ("self_attn.linear_q_k_v.weight", "self_attn/linear_q_k_v/kernel", "linear"),
        ("self_attn.linear_q_k_v.bias", "self_attn/linear_q_k_v/bias", "identity"),
        ("self_attn.linear_out.weight", "self_attn/linear_out/kernel", "linear"),
        ("self_attn.linear_out.bias", "self_attn/linear_out/bias", "identity"),
        # depthwise Conv1d [D, 1, k] -> Flax [k, 1, D] with feature_group_count = D
        ("self_attn.fsmn_block.weight", "self_attn/fsmn_block/kernel", "conv1d"),
        ("feed_forward.w_1.weight", "feed_forward/w_1/kernel", "linear"),
        ("feed_forward.w_1.bias", "feed_forward/w_1/bias", "identity"),
        ("feed_forward.w_2.weight", "feed_forward/w_2/kernel", "linear"),
        ("feed_forward.w_2.bias", "feed_forward/w_2/bias", "identity"),
        ("norm1.weight", "norm1/scale", "identity"),
        ("norm1.bias", "norm1/bias", "identity"),
        ("norm2.weight", "norm2/scale", "identity"),
        ("norm2.bias", "norm2/bias", "identity"),
    ]
    return [Rule(source_prefix + s, target_prefix + t, layout, stack=stack) for s, t, layout in parts]


RULES: list[Rule] = [
    *_layer_rules(PREFIX + "encoders0.0.", "encoders0/", None),
    *_layer_rules(PREFIX + "encoders.{layer}.", "encoders/", "layer"),
    Rule(PREFIX + "after_norm.weight", "after_norm/scale"),
    Rule(PREFIX + "after_norm.bias", "after_norm/bias"),
]


@dataclasses.dataclass
class ParaformerCheckpoint:
    """A converted FunASR folder."""

    config: ParaformerEncoderConfig
    params: dict
    cmvn: np.ndarray  # [2, input_size]: row 0 the shift, row 1 the scale; x = (x + shift) * scale
    ignored: list[str]  # checkpoint tensors outside `encoder.` (decoder, predictor, ...), skipped on purpose
    codebook: np.ndarray | None = None  # [1024, output_size] when read from the Step-Audio-Tokenizer root


# ------------------------------------------------------------------ config.yaml


def config_from_funasr(conf: Mapping, **overrides) -> ParaformerEncoderConfig:
    """Our config from a FunASR `config.yaml` mapping (its `encoder_conf`, `frontend_conf`, `input_size`).

    `chunk_size` and the look-back are arguments of the official driver, not of config.yaml; a top-level
    `chunk_size` / `encoder_chunk_look_back` (as the fixtures record them) is read when present.
    """
    encoder = conf.get("encoder", "SANMEncoderChunkOpt")
    if encoder != "SANMEncoderChunkOpt":
        raise ConfigError(f"config.yaml: encoder {encoder!r} is not the streaming SANMEncoderChunkOpt")
    enc = conf.get("encoder_conf")
    if not isinstance(enc, Mapping):
        raise ConfigError("config.yaml: missing the encoder_conf mapping")
    for key, want in (("input_layer", "pe_online"), ("selfattention_layer_type", "sanm")):
        if key in enc and enc[key] != want:
            raise ConfigError(f"config.yaml: encoder_conf.{key} is {enc[key]!r}; only {want!r} is supported")
    front = conf.get("frontend_conf") or {}
    input_size = conf.get("input_size")
    if input_size is None:
        input_size = int(front.get("n_mels", 80)) * int(front.get("lfr_m", 7))
    fields = dict(input_size=int(input_size))
    names = {"output_size": "output_size", "attention_heads": "attention_heads",
             "linear_units": "linear_units", "num_blocks": "num_blocks", "kernel_size": "kernel_size",
             "sanm_shfit": "sanm_shift", "normalize_before": "normalize_before"}
    for theirs, ours in names.items():
        if theirs in enc:
            fields[ours] = enc[theirs]
    if "chunk_size" in conf:
        fields["chunk_size"] = tuple(conf["chunk_size"])
    if "encoder_chunk_look_back" in conf:
        fields["look_back"] = int(conf["encoder_chunk_look_back"])
    fields.update(overrides)
    return ParaformerEncoderConfig(**fields)


def read_config_yaml(path: pathlib.Path, **overrides) -> ParaformerEncoderConfig:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path.parent}: no config.yaml (expected a FunASR Paraformer folder)")
    try:
        # FunASR configs are plain YAML (no python tags), so safe_load reads them.
        conf = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(conf, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_funasr(conf, **overrides)


# ------------------------------------------------------------------ am.mvn


def read_am_mvn(path: pathlib.Path, dim: int | None = None) -> np.ndarray:
    """[2, D] (shift; scale) from `am.mvn`, parsed by the front end's reader."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"{path.parent}: no am.mvn (the CMVN file of the Paraformer front end)")
    try:
        cmvn = parse_am_mvn(path.read_text(encoding="utf-8", errors="replace"))
    except FrontendError as e:
        raise ConversionError(str(e)) from None
    if dim is not None and cmvn.shape[1] != dim:
        raise ConversionError(f"am.mvn: vectors have {cmvn.shape[1]} values; the encoder input is {dim}")
    if not np.isfinite(cmvn).all():
        raise ConversionError("am.mvn: non-finite values")
    return cmvn


# ------------------------------------------------------------------ weights


def encoder_source(checkpoint: pathlib.Path | Mapping) -> TorchSource:
    """The `encoder.` tensors of a FunASR `model.pt` (a path: memory-mapped, read one at a time) or of
    its state_dict in memory; the decoder / predictor / ctc entries are listed in `.ignored`."""
    if not isinstance(checkpoint, Mapping):
        path = pathlib.Path(checkpoint)
        if not path.is_file():
            raise ConversionError(f"{path.parent}: no {path.name}")
        checkpoint = path
    source = TorchSource(checkpoint, select=lambda name: name.startswith(PREFIX))
    if not source.names():
        where = "the state_dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
        raise ConversionError(f"{where}: no {PREFIX!r} tensors (found {len(source.ignored)} others)")
    return source


def convert_state_dict(tensors: Mapping[str, np.ndarray], cfg: ParaformerEncoderConfig,
                       dtype=None) -> tuple[dict, list[str]]:
    """(params, ignored names) from a FunASR state_dict (numpy arrays, torch names and layouts)."""
    source = encoder_source(tensors)
    return convert(source, RULES, abstract_params(cfg), dtype=dtype), source.ignored


def export_state_dict(params: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """Our params -> the `encoder.` tensors of a FunASR state_dict (torch names and layouts)."""
    return dict(export(params, RULES, dtype=dtype))


def load_paraformer_dir(folder, dtype=None, **config_overrides) -> ParaformerCheckpoint:
    """Convert a FunASR Paraformer folder (`model.pt`, `config.yaml`, `am.mvn`)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"not a folder: {folder}")
    cfg = read_config_yaml(folder / "config.yaml", **config_overrides)
    cmvn = read_am_mvn(folder / "am.mvn", cfg.input_size)
    source = encoder_source(folder / "model.pt")
    params = convert(source, RULES, abstract_params(cfg), dtype=dtype)
    return ParaformerCheckpoint(config=cfg, params=params, cmvn=cmvn, ignored=sorted(source.ignored))


def load_codebook(path, dim: int | None = None) -> np.ndarray:
    """The vq02 k-means centroids (`linguistic_tokenizer.npy`, [1024, 512] float32)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"no codebook file {path}")
    try:
        codebook = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ConversionError(f"{path}: not a numpy .npy array ({type(e).__name__})") from None
    if codebook.ndim != 2 or codebook.shape[0] == 0 or (dim is not None and codebook.shape[1] != dim):
        raise ConversionError(f"{path}: codebook has shape {list(codebook.shape)}; expected "
                              f"[codes, {dim if dim is not None else 'dim'}]")
    if codebook.dtype.kind != "f" or not np.isfinite(codebook).all():
        raise ConversionError(f"{path}: codebook must hold finite floats (dtype {codebook.dtype})")
    return codebook.astype(np.float32)


def load_step_audio_tokenizer(root, dtype=None, **config_overrides) -> ParaformerCheckpoint:
    """The vq02 half of `Step-Audio-Tokenizer/`: the Paraformer folder plus `linguistic_tokenizer.npy`."""
    root = pathlib.Path(root)
    ckpt = load_paraformer_dir(root / PARAFORMER_SUBDIR, dtype=dtype, **config_overrides)
    ckpt.codebook = load_codebook(root / CODEBOOK_FILE, ckpt.config.output_size)
    return ckpt
