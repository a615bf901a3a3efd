"""Audio files -> dual-codebook tokens, one JSON line per file (the first stage of the data pipeline).

    python tools/tokenize_audio.py a.wav b.flac --model CKPT [--out tokens.jsonl] [--batch 8]
    python tools/tokenize_audio.py clips/*.wav --random-tiny          # no weights: a demo / smoke run

--model is a tokenizer checkpoint folder (`tools/convert.py tokenizer SRC DST`) or a released
`Step-Audio-Tokenizer/` folder (converted in memory on every run). Each line:
    {"file", "seconds", "vq02": [...], "vq06": [...], "ids": [LLM ids], "tokens": "<audio_N>..."}
A file that cannot be tokenized (unreadable, truncated, shorter than `audio.MIN_AUDIO_SECONDS`, ...)
prints one `error: FILE: reason` line on stderr and the run goes on; the exit status is 1 if any
file failed (the count is printed at the end), 0 otherwise. `--out` is checked before the model
loads and written through a temporary sibling renamed into place; it is not created when no file
gave tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from editx_jax.audio.io import AudioError  # noqa: E402
from editx_jax.checkpoint import is_checkpoint  # noqa: E402
from editx_jax.cli import UsageError, check_output_file  # noqa: E402
from editx_jax.config import ConfigError  # noqa: E402
from editx_jax.convert.keymap import ConversionError  # noqa: E402
from editx_jax.convert.tokenizer import tokenizer_from_released  # noqa: E402
from editx_jax.tokenizer.audio_tokenizer import AudioTokenizer, AudioTokenizerConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenize_audio.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, mp3, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="tokenizer checkpoint folder or Step-Audio-Tokenizer/")
    source.add_argument("--random-tiny", action="store_true", help="tiny random weights (codes are meaningless)")
    parser.add_argument("--out", metavar="FILE", help="write JSON lines here instead of stdout")
    parser.add_argument("--batch", type=int, default=8, help="files tokenized together (default 8)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def load_tokenizer(args):
    if args.random_tiny:
        return AudioTokenizer.random(AudioTokenizerConfig.tiny())
    model = pathlib.Path(args.model)
    if is_checkpoint(model):
        return AudioTokenizer.from_pretrained(model)
    if not model.is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    return tokenizer_from_released(model, progress=not args.quiet)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1:
        print("error: --batch must be at least 1", file=sys.stderr)
        return 2
    if args.out:
        try:
            check_output_file(args.out)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        tokenizer = load_tokenizer(args)
    except (ConversionError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1

    tmp = pathlib.Path(args.out).with_name(f".{pathlib.Path(args.out).name}.tmp") if args.out else None
    out = open(tmp, "w") if tmp else sys.stdout
    failed = written = 0
    bar = None
    if not args.quiet and len(args.files) > 1:
        bar = tqdm(total=len(args.files), unit="file", desc="tokenize", file=sys.stderr)
    try:
        for start in range(0, len(args.files), args.batch):
            files = args.files[start:start + args.batch]
            try:
                results = tokenizer.tokenize(files, errors="keep")
            except (AudioError, ValueError):  # should not happen (bad files come back as errors): retry one by one
                results = []
                for f in files:
                    try:
                        results += tokenizer.tokenize([f], errors="keep")
                    except (AudioError, ValueError) as e:
                        results.append(e)
            for f, r in zip(files, results):
                if isinstance(r, Exception):
                    failed += 1
                    message = _one_line(r)
                    if f not in message:
                        message = f"{f}: {message}"
                    (bar.write if bar else lambda m: print(m, file=sys.stderr))(f"error: {message}")
                else:
                    out.write(json.dumps(r.to_json(file=f)) + "\n")
                    written += 1
            out.flush()
            if bar:
                bar.update(len(files))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if bar:
            bar.close()
        if tmp:
            out.close()
            if written:  # whole lines only (flushed per batch), also after an interrupt
                os.replace(tmp, args.out)
            else:
                tmp.unlink()
    if failed:
        print(f"{failed} of {len(args.files)} file(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
