"""The two released folders -> one editx-jax model folder that `EditX.from_pretrained` loads.

    Step-Audio-EditX/            config.json, model*.safetensors, tokenizer.model, tokenizer_config.json,
                                 CosyVoice-300M-25Hz/ (flow.pt, hift.pt, campplus.onnx, cosyvoice.yaml)
    Step-Audio-Tokenizer/        FunASR Paraformer folder, linguistic_tokenizer.npy, speech_tokenizer_v1.onnx

The folder is built beside DST under a temporary name and renamed into place at the end, so an
interrupted conversion never leaves a folder that looks complete.

`tokenizer_config.json` is copied as it is: its settings (HF defaults for absent keys) decide what each
`encode` of the official prompt assembly adds, e.g. the inner BOS (editx_jax/text/tokenizer.py). It is
checked against `tokenizer.model` before anything is written.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time

from editx_jax.checkpoint import write_settings
from editx_jax.config import Config
from editx_jax.convert.decoder import convert_decoder
from editx_jax.convert.llm import convert_llm
from editx_jax.convert.tokenizer import convert_tokenizer
from editx_jax.models.quantize import check_quantize
from editx_jax.text.tokenizer import CONFIG_FILENAME, MODEL_FILENAME, TextTokenizer, TokenizerError, read_hf_config

DECODER_SUBFOLDER = "CosyVoice-300M-25Hz"


def convert_editx(src, dst, tokenizer, progress: bool = True, dtype=None, quantize=None,
                  float_embeddings: bool = False) -> dict:
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    check_quantize(quantize)  # before anything is read or written
    if tokenizer is None:
        raise FileNotFoundError("give the released Step-Audio-Tokenizer/ folder with --tokenizer")
    for need in (src / "config.json", src / MODEL_FILENAME, src / CONFIG_FILENAME, src / DECODER_SUBFOLDER,
                 pathlib.Path(tokenizer)):
        if not need.exists():
            raise FileNotFoundError(f"not found: {need} (expected the released Step-Audio-EditX/ layout)")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
    try:
        TextTokenizer(src / MODEL_FILENAME, read_hf_config(src / CONFIG_FILENAME))
    except TokenizerError as e:
        raise ValueError(str(e)) from None
    start = time.time()
    work = dst.with_name(f".{dst.name}.partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    summary = {
        "llm": convert_llm(src, work / "llm", dtype=dtype or "bfloat16", progress=progress, quantize=quantize,
                           float_embeddings=float_embeddings),
        "decoder": convert_decoder(src / DECODER_SUBFOLDER, work / "decoder", progress=progress),
        "audio_tokenizer": convert_tokenizer(tokenizer, work / "audio_tokenizer", progress=progress),
    }
    for name in (MODEL_FILENAME, CONFIG_FILENAME):
        shutil.copyfile(src / name, work / name)
    write_settings(work, Config())
    if dst.exists():
        dst.rmdir()
    os.replace(work, dst)
    summary["seconds"] = round(time.time() - start, 1)
    summary["dst"] = str(dst.absolute())
    return summary
