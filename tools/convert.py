"""Convert released checkpoints into editx-jax checkpoint folders, and export them back.

    python tools/convert.py llm SRC DST [--dtype bfloat16|float32] [--quantize int8 [--float-embeddings]]
    python tools/convert.py export-llm CKPT DST [--dtype bfloat16|float32]
    python tools/convert.py decoder CosyVoice-300M-25Hz/ DST [--bigvgan CKPT]
    python tools/convert.py export-decoder CKPT DST
    python tools/convert.py tokenizer Step-Audio-Tokenizer/ DST
    python tools/convert.py editx Step-Audio-EditX/ DST --tokenizer Step-Audio-Tokenizer/ [--quantize int8]

Each subcommand is one entry of SUBCOMMANDS: name -> (function, help). The function is called as
`function(src, dst, progress=..., [dtype=...])` and returns a summary dict that is printed as JSON.
A new converter adds its entry in a few lines. Bad input prints one `error: ...` line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's editx_jax

from editx_jax.config import ConfigError  # noqa: E402
from editx_jax.convert.decoder import convert_decoder, export_decoder  # noqa: E402
from editx_jax.convert.editx import convert_editx  # noqa: E402
from editx_jax.convert.keymap import ConversionError  # noqa: E402
from editx_jax.convert.llm import convert_llm, export_llm  # noqa: E402
from editx_jax.convert.tokenizer import convert_tokenizer  # noqa: E402


def _llm(src, dst, progress=True, dtype=None, quantize=None, float_embeddings=False):
    return convert_llm(src, dst, dtype=dtype or "bfloat16", progress=progress, quantize=quantize,
                       float_embeddings=float_embeddings)


def _export_llm(src, dst, progress=True, dtype=None):
    return export_llm(src, None, dst, dtype=dtype, progress=progress)


def _decoder(src, dst, progress=True, dtype=None, bigvgan=None):
    return convert_decoder(src, dst, bigvgan=bigvgan, progress=progress, dtype=dtype)


def _export_decoder(src, dst, progress=True, dtype=None):
    if dtype not in (None, "float32"):
        raise ValueError(f"export-decoder writes float32 (the decoder's dtype), got --dtype {dtype}")
    return export_decoder(src, dst)


def _tokenizer(src, dst, progress=True, dtype=None):
    return convert_tokenizer(src, dst, progress=progress, dtype=dtype)


def _editx(src, dst, progress=True, dtype=None, tokenizer=None, quantize=None, float_embeddings=False):
    return convert_editx(src, dst, tokenizer, progress=progress, dtype=dtype, quantize=quantize,
                         float_embeddings=float_embeddings)


SUBCOMMANDS = {
    "llm": (_llm, "released Step1 LLM folder (config.json + model*.safetensors) -> checkpoint folder "
                  "(default dtype bfloat16)"),
    "export-llm": (_export_llm, "LLM checkpoint folder -> model-00001.safetensors + index + config.json "
                                "with the PyTorch names (default: keep the stored dtype)"),
    "decoder": (_decoder, "released CosyVoice-300M-25Hz/ folder (flow.pt, hift.pt, campplus.onnx, "
                          "cosyvoice.yaml) -> one decoder checkpoint folder (float32)"),
    "export-decoder": (_export_decoder, "decoder checkpoint folder -> flow.pt and hift.pt (or "
                                        "bigvgan_generator.pt) with the PyTorch names; campplus.onnx is not written"),
    "tokenizer": (_tokenizer, "released Step-Audio-Tokenizer/ folder (FunASR Paraformer, linguistic_tokenizer.npy, "
                              "speech_tokenizer_v1.onnx) -> one audio tokenizer checkpoint folder (float32)"),
    "editx": (_editx, "released Step-Audio-EditX/ (with CosyVoice-300M-25Hz/) and --tokenizer Step-Audio-Tokenizer/ "
                      "-> one model folder for infer.py / EditX.from_pretrained (LLM in bfloat16 by default)"),
}

# Options only some subcommands take: name -> [(flag, argparse kwargs)]. Passed as keyword arguments.
QUANTIZE_OPTIONS = [
    ("--quantize", {"metavar": "KIND", "default": None,
                    "help": "int8: int8 LLM weights with per-output-channel scales (about half the bfloat16 bytes)"}),
    ("--float-embeddings", {"action": "store_true",
                            "help": "with --quantize: keep the embedding table and lm_head in --dtype"}),
]
EXTRA_OPTIONS = {
    "llm": QUANTIZE_OPTIONS,
    "editx": [("--tokenizer", {"metavar": "DIR", "default": None,
                               "help": "the released Step-Audio-Tokenizer/ folder"}), *QUANTIZE_OPTIONS],
    "decoder": [("--bigvgan", {"metavar": "CKPT", "default": None,
                               "help": "a BigVGAN state dict to use as the vocoder instead of hift.pt"})],
}

DTYPE_CHOICES = ("bfloat16", "float32", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("src", metavar="SRC")
        p.add_argument("dst", metavar="DST")
        p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="dtype of the written params")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        for flag, kwargs in EXTRA_OPTIONS.get(name, []):
            p.add_argument(flag, **kwargs)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    function, _ = SUBCOMMANDS[args.command]
    try:
        extra = {flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"))
                 for flag, _ in EXTRA_OPTIONS.get(args.command, [])}
        summary = function(args.src, args.dst, progress=not args.quiet, dtype=args.dtype, **extra)
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (no partial output was left in place)", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
