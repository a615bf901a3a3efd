"""The two released folders -> one editx-jax model folder that `EditX.from_pretrained` loads.

    Step-Audio-EditX/            config.json, model*.safetensors, tokenizer.model,
                                 CosyVoice-300M-25Hz/ (flow.pt, hift.pt, campplus.onnx, cosyvoice.yaml)
    Step-Audio-Tokenizer/        FunASR Paraformer folder, linguistic_tokenizer.npy, speech_tokenizer_v1.onnx

The folder is built beside DST under a temporary name and renamed into place at the end, so an
interrupted conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time

from editx_jax.config import Config
from editx_jax.models.quantize import check_quantize

DECODER_SUBFOLDER = "CosyVoice-300M-25Hz"


def convert_editx(src, dst, tokenizer, progress: bool = True, dtype=None, quantize=None,
                  float_embeddings: bool = False) -> dict:
    from editx_jax.convert.decoder import convert_decoder
    from editx_jax.convert.llm import convert_llm
    from editx_jax.pipeline import write_settings
    from editx_jax.tokenizer.pipeline import convert_tokenizer

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    check_quantize(quantize)  # before anything is read or written
    if tokenizer is None:
        raise FileNotFoundError("give the released Step-Audio-Tokenizer/ folder with --tokenizer")
    for need in (src / "config.json", src / "tokenizer.model", src / DECODER_SUBFOLDER, pathlib.Path(tokenizer)):
        if not need.exists():
            raise FileNotFoundError(f"not found: {need} (expected the released Step-Audio-EditX/ layout)")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
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
    shutil.copyfile(src / "tokenizer.model", work / "tokenizer.model")
    write_settings(work, Config())
    if dst.exists():
        dst.rmdir()
    os.replace(work, dst)
    summary["seconds"] = round(time.time() - start, 1)
    summary["dst"] = str(dst.absolute())
    return summary
