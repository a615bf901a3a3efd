"""The released decoder folder `CosyVoice-300M-25Hz/` -> one editx-jax decoder checkpoint folder
(architecture.md §3.1, §4).

    cosyvoice.yaml   sizes (hyperpyyaml: `!new:` class tags, maybe `!ref <key>`), read by `read_yaml`
    flow.pt          -> flow params   (editx_jax/convert/flow.py key map)
    hift.pt          -> vocoder params (editx_jax/convert/hift.py, weight norm folded)
    campplus.onnx    -> CAM++ params  (editx_jax/convert/campplus.py, sizes read from the graph)
    --bigvgan CKPT   optional: a BigVGAN state dict used as the vocoder instead of hift.pt (sizes from a
                     `config.json` beside it, else the class defaults with the width read from conv_pre)

The yaml is read with PyYAML's safe loader taught to ignore every `!tag` (the tagged mapping is kept
as a plain mapping) and to resolve `!ref <key>` against top-level keys. Only the values that size the
model are used; training-only keys of the CFM block (`cfm_params`, `n_spks`, ...) are skipped. Without
a yaml the released sizes (the defaults of FlowConfig / HiFTConfig / MelConfig) are used, and the
folder's config.json records what was used either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Callable, NamedTuple

import numpy as np
import yaml
from tqdm import tqdm

from editx_jax.config import ConfigError
from editx_jax.convert import bigvgan as convert_bigvgan
from editx_jax.convert import hift as convert_hift
from editx_jax.convert.bigvgan import bigvgan_config_from_reference
from editx_jax.convert.campplus import convert_folded, fold_state_dict, onnx_to_state_dict
from editx_jax.convert.flow import export_flow, flow_config_from_reference, flow_rules
from editx_jax.convert.hift import hift_config_from_reference
from editx_jax.convert.keymap import ConversionError, convert
from editx_jax.convert.sources import TorchSource, checkpoint_source
from editx_jax.decoder import vocoders
from editx_jax.decoder.bigvgan import BigVGANConfig
from editx_jax.decoder.flow import FlowConfig
from editx_jax.decoder.flow import abstract_params as flow_abstract
from editx_jax.decoder.mel import MelConfig
from editx_jax.decoder.token2wav import Decoder, Token2WavConfig


# ------------------------------------------------------------------------------------------ yaml


def read_yaml(path: str | os.PathLike) -> dict:
    """cosyvoice.yaml as plain dicts/lists, tags ignored, `!ref <key>` resolved (top-level keys)."""
    class Loader(yaml.SafeLoader):
        pass

    def any_tag(loader, suffix, node):
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        value = loader.construct_scalar(node)
        return {"__ref__": value} if suffix == "ref" else value

    Loader.add_multi_constructor("!", any_tag)
    try:
        data = yaml.load(pathlib.Path(path).read_text(), Loader=Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not readable YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")

    def resolve(x, depth=0):
        if depth > 20:
            raise ConfigError(f"{path}: !ref chain too deep")
        if isinstance(x, dict) and set(x) == {"__ref__"}:
            m = re.fullmatch(r"\s*<([^<>\[\]]+)>\s*", str(x["__ref__"]))
            if not m or m[1] not in data:
                raise ConfigError(f"{path}: cannot resolve !ref {x['__ref__']!r} (only top-level <key> refs)")
            return resolve(data[m[1]], depth + 1)
        if isinstance(x, dict):
            return {k: resolve(v, depth) for k, v in x.items()}
        if isinstance(x, list):
            return [resolve(v, depth) for v in x]
        return x

    return resolve(data)


_CFM_IGNORED = {"in_channels", "n_spks", "spk_emb_dim", "cfm_params", "sigma_min", "solver", "t_scheduler",
                "training_cfg_rate", "reg_loss_type"}


def flow_reference_config(flow: dict) -> dict:
    """The yaml `flow:` block reduced to what `flow_config_from_reference` reads."""
    flow = dict(flow)
    decoder = dict(flow.get("decoder") or {})
    rate = decoder.get("inference_cfg_rate", (decoder.get("cfm_params") or {}).get("inference_cfg_rate"))
    kept = {k: v for k, v in decoder.items() if k not in _CFM_IGNORED and k != "inference_cfg_rate"}
    if rate is not None:
        kept["inference_cfg_rate"] = rate
    if decoder:
        flow["decoder"] = kept
    return flow


def mel_config_from_reference(mel_conf: dict) -> MelConfig:
    """From cosyvoice.yaml's `mel_conf` (fixture manifests); fmax None means Nyquist."""
    known = {f.name for f in dataclasses.fields(MelConfig)}
    unknown = sorted(set(mel_conf) - known - {"center"})
    if unknown:
        raise ConfigError(f"mel: unknown option(s) {unknown}")
    if mel_conf.get("center", False):
        raise ConfigError("mel.center: only center=False (the CosyVoice call) is implemented")
    args = {k: v for k, v in mel_conf.items() if k in known}
    if args.get("fmax") is None:
        args["fmax"] = args.get("sampling_rate", MelConfig.sampling_rate) / 2
    return MelConfig(**args)


def configs_from_yaml(data: dict):
    """(FlowConfig, vocoder config, MelConfig) from a parsed cosyvoice.yaml."""
    for key in ("flow", "hift"):
        if key not in data:
            raise ConfigError(f"cosyvoice.yaml: no `{key}:` entry")
    flow = flow_config_from_reference(flow_reference_config(data["flow"]))
    hift = dict(data["hift"])  # the vocoder's block is `hift:` whichever vocoder it is
    vocoder = CONVERTERS[vocoder_of_yaml(hift)].config_from_reference(hift)
    mel = mel_config_from_reference(data["mel_conf"]) if "mel_conf" in data else MelConfig()
    return flow, vocoder, mel


# ------------------------------------------------------------------------------------------ vocoders


class VocoderConverter(NamedTuple):
    """The converter side of one `decoder/vocoders.py` entry (same name)."""

    config_from_reference: Callable  # the yaml `hift:` block / a fixture manifest's block -> its config
    yaml_marker: str | None  # a key only this vocoder's yaml block has (None: the default vocoder)
    released_file: str | None  # its checkpoint in the released folder (None: given with --bigvgan)
    config_for_checkpoint: Callable  # (checkpoint path, TensorSource, the yaml's config) -> its config
    from_source: Callable  # (TensorSource, config, dtype=None, progress=None) -> params
    from_state_dict: Callable  # (state dict, config) -> params (the parity runners)
    to_state_dict: Callable  # (params, config) -> {torch name: array}
    export_file: str  # what `export_decoder` writes ...
    export_wrap: str | None  # ... and the key it wraps the state dict in (None: the plain state dict)


def _yaml_config(path, source, yaml_config):
    del path, source  # sized by cosyvoice.yaml (or its defaults)
    return yaml_config


def _bigvgan_config(path: pathlib.Path, source, yaml_config):
    """config.json beside the checkpoint, else the class defaults with the width read from conv_pre."""
    del yaml_config  # cosyvoice.yaml describes the released HiFT
    known = {f.name for f in dataclasses.fields(BigVGANConfig)}
    args = {}
    cfg_path = path.parent / "config.json"
    if cfg_path.is_file():
        raw = json.loads(cfg_path.read_text())
        args = {k: v for k, v in raw.items() if k in known and k != "conv_pre_padding"}
    if "upsample_initial_channel" not in args:
        for name in ("conv_pre.weight", "conv_pre.weight_v", "conv_pre.parametrizations.weight.original1"):
            if name in source.names():
                args["upsample_initial_channel"] = int(source.shape(name)[0])
                break
    return bigvgan_config_from_reference(args)


CONVERTERS: dict[str, VocoderConverter] = {
    "hift": VocoderConverter(hift_config_from_reference, None, "hift.pt", _yaml_config, convert_hift.from_source,
                             convert_hift.from_state_dict, convert_hift.to_state_dict, "hift.pt", None),
    "bigvgan": VocoderConverter(bigvgan_config_from_reference, "upsample_initial_channel", None, _bigvgan_config,
                                convert_bigvgan.from_source, convert_bigvgan.from_state_dict,
                                convert_bigvgan.to_state_dict, "bigvgan_generator.pt", "generator"),
}


def vocoder_of_yaml(block: dict) -> str:
    """Which vocoder a yaml `hift:` block describes: the one whose marker key it has, else the default."""
    for name, conv in CONVERTERS.items():
        if conv.yaml_marker is not None and conv.yaml_marker in block:
            return name
    return Token2WavConfig().vocoder


# ------------------------------------------------------------------------------------------ conversion


def _tqdm(progress: bool, desc: str):
    if not progress:
        return None
    return lambda it: tqdm(it, desc=desc, unit="tensor", leave=False)


def convert_decoder(src, dst, bigvgan: str | os.PathLike | None = None, progress: bool = True,
                    dtype: str | None = None) -> dict:
    """Convert `CosyVoice-300M-25Hz/` (flow.pt, hift.pt, campplus.onnx, cosyvoice.yaml) into a decoder
    checkpoint folder `dst` loadable with `Decoder.from_pretrained`. Returns a summary dict."""
    if dtype not in (None, "float32"):
        raise ConfigError(f"decoder.dtype: the flow and vocoders run in float32 (architecture.md §5), got {dtype!r}")
    src = pathlib.Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"decoder folder not found: {src}")
    yaml_path = src / "cosyvoice.yaml"
    if yaml_path.is_file():
        flow_cfg, voc_cfg, mel_cfg = configs_from_yaml(read_yaml(yaml_path))
    else:
        flow_cfg, voc_cfg, mel_cfg = FlowConfig(), vocoders.get(Token2WavConfig().vocoder).config_class(), MelConfig()
    name = "bigvgan" if bigvgan else vocoders.for_config(voc_cfg).name
    conv = CONVERTERS[name]
    needed = ["flow.pt", "campplus.onnx"] + ([conv.released_file] if not bigvgan and conv.released_file else [])
    missing = [n for n in needed if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: missing {', '.join(missing)}")
    if not bigvgan and conv.released_file is None:
        raise ConversionError(f"cosyvoice.yaml describes a {vocoders.get(name).title} vocoder: pass its "
                              f"checkpoint with --bigvgan")

    flow_params = convert(TorchSource(src / "flow.pt"), flow_rules(), flow_abstract(flow_cfg),
                          progress=_tqdm(progress, "flow.pt"))
    path = pathlib.Path(bigvgan) if bigvgan else src / conv.released_file
    source = checkpoint_source(path)
    voc_cfg = conv.config_for_checkpoint(path, source, voc_cfg)
    voc_params = conv.from_source(source, voc_cfg, progress=_tqdm(progress, path.name))
    voc_name = str(path) if bigvgan else path.name
    if progress:
        print("converting campplus.onnx ...", flush=True)
    tensors, eps, cam_cfg = onnx_to_state_dict(str(src / "campplus.onnx"))
    cam_params = convert_folded(fold_state_dict(tensors, cam_cfg, eps), cam_cfg)
    decoder = Decoder(flow_params, flow_cfg, voc_params, voc_cfg, cam_params, cam_cfg,
                      Token2WavConfig(vocoder=name), mel_cfg)
    if progress:
        print(f"writing {dst} ...", flush=True)
    folder = decoder.save(dst, {"converted_from": str(src.absolute()), "vocoder_source": voc_name,
                                "yaml": yaml_path.is_file()})
    return {"dst": str(folder), "vocoder": name, "yaml": yaml_path.is_file(),
            "flow_depth": flow_cfg.estimator.depth, "flow_width": flow_cfg.input_size}


# ------------------------------------------------------------------ export


def export_decoder(src, dst) -> dict:
    """A decoder checkpoint folder -> `flow.pt` and the vocoder's state dict (`hift.pt`, weight norm
    as parametrizations like the release, or `bigvgan_generator.pt` as {'generator': ...}) in the
    released torch names and layouts; `convert_decoder` reads them back. Not written: campplus.onnx
    (there is no CAM++ ONNX export) and cosyvoice.yaml."""
    import torch  # noqa: PLC0415  (optional: the convert extra)

    decoder = Decoder.from_pretrained(src)
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)

    def save(tensors, name, wrap=None):
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors}
        tmp = dst / f".{name}.tmp"
        torch.save({wrap: state} if wrap else state, tmp)
        os.replace(tmp, dst / name)
        return name

    written = [save(export_flow(decoder.flow_params), "flow.pt")]
    conv = CONVERTERS[decoder.vocoder.name]
    written.append(save(conv.to_state_dict(decoder.vocoder_params, decoder.vocoder_config).items(),
                        conv.export_file, wrap=conv.export_wrap))
    return {"dst": str(dst.absolute()), "files": written, "vocoder": decoder.config.vocoder}
