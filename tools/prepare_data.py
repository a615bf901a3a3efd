"""Training data preparation.

    # 1. audio + transcripts + edit labels -> upstream JSONL (token ids from our audio tokenizer)
    python tools/prepare_data.py tokenize manifest.jsonl out.jsonl --tokenizer ckpt/tokenizer
    # 2. upstream JSONL -> ArrayRecord shards of token ids + loss masks (what train.py reads at scale)
    python tools/prepare_data.py shards out.jsonl shards/train --config configs/sft_step_audio_editx.yaml
    # or the same examples as a TFDS dataset (tfds.data_source("editx_sft", data_dir=...))
    python tools/prepare_data.py tfds out.jsonl tfds_data --validation eval.jsonl --config ...

A manifest line holds the upstream fields with audio paths instead of token ids: `source_audio`,
`source_text`, `target_audio`, `target_text`, `task_type`, `edit_type`, `edit_info`, `emotion`.
`tokenize` batches clips through the tokenizer, shows a progress bar and appends to the output, so an
interrupted run continues where it stopped (lines already written are skipped by their index).
Clips that fail are reported and skipped (the line number and the reason).

`shards` encodes each record exactly as training does (chat layout, loss mask, truncation) and writes
`<prefix>-00000-of-0000N.array_record` files; `editx_jax.data.dataset.ArrayRecordExamples` reads
them back as a Grain source (random access, so shuffling and process sharding are free).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from editx_jax.config import load_config
from editx_jax.data import dataset, jsonl
from editx_jax.data.tfds_builder import build_tfds
from editx_jax.tokenizer.audio_tokenizer import AudioTokenizer


def tokenize_manifest(manifest, out, tokenizer, batch: int = 8, progress: bool = True) -> dict:
    """Manifest (audio paths) -> upstream JSONL (audio token ids), appending and resumable."""
    manifest, out = pathlib.Path(manifest), pathlib.Path(out)
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line).get("_index"))
    todo = [i for i in range(len(rows)) if i not in done]
    failed = []
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="tokenize", disable=not progress)
    with out.open("a") as f:
        for s in range(0, len(todo), batch):
            chunk = todo[s:s + batch]
            paths = []
            for i in chunk:
                paths += [rows[i]["source_audio"], rows[i].get("target_audio") or rows[i]["source_audio"]]
            results = tokenizer.tokenize(paths, errors="keep")
            for j, i in enumerate(chunk):
                src, tgt = results[2 * j], results[2 * j + 1]
                if isinstance(src, Exception) or isinstance(tgt, Exception):
                    failed.append((i + 1, str(src if isinstance(src, Exception) else tgt)))
                    continue
                rec = {k: v for k, v in rows[i].items() if k != "target_audio"}
                rec.update(source_vq02vq06=[int(x) for x in src.ids], target_vq02vq06=[int(x) for x in tgt.ids],
                           _index=i)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    return {"records": len(rows), "written": len(todo) - len(failed), "failed": failed}


def write_shards(jsonl_path, prefix, cfg, num_shards: int = 1, tokenizer=None) -> dict:
    """Upstream JSONL -> ArrayRecord shards of encoded examples (round-robin over shards)."""
    tok = tokenizer or jsonl.load_text_tokenizer(cfg.data.text_tokenizer)
    examples, report = jsonl.read_examples(jsonl_path, tok, cfg.data, cfg.llm.vocab_size)
    if not examples:  # an empty shard would only fail later, in training, far from its cause
        raise ValueError(f"{jsonl_path}: no examples to write (the file is empty or every record was "
                         f"skipped: {report.summary().splitlines()[0]})")
    prefix = pathlib.Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    try:
        for k, ex in enumerate(examples):
            writers[k % num_shards].write(dataset.encode_example(ex))
    finally:
        for w in writers:
            w.close()
    return {"paths": paths, "examples": len(examples), "report": report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokenize", help="manifest with audio paths -> upstream JSONL")
    t.add_argument("manifest")
    t.add_argument("out")
    t.add_argument("--tokenizer", required=True, help="audio tokenizer checkpoint folder (tools/convert.py)")
    t.add_argument("--batch", type=int, default=8, help="records per tokenizer batch")
    s = sub.add_parser("shards", help="upstream JSONL -> ArrayRecord shards")
    s.add_argument("jsonl")
    s.add_argument("prefix")
    s.add_argument("--config", default="configs/sft_step_audio_editx.yaml")
    s.add_argument("--set", dest="overrides", action="append", default=[])
    s.add_argument("--num-shards", type=int, default=1)
    d = sub.add_parser("tfds", help="upstream JSONL -> an ArrayRecord TFDS dataset (tfds.data_source)")
    d.add_argument("train")
    d.add_argument("data_dir")
    d.add_argument("--validation")
    d.add_argument("--config", default="configs/sft_step_audio_editx.yaml")
    d.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    try:
        if args.command == "tokenize":
            info = tokenize_manifest(args.manifest, args.out, AudioTokenizer.from_pretrained(args.tokenizer),
                                     args.batch)
            print(f"{info['written']} records written to {args.out}; {len(info['failed'])} failed")
            for line, why in info["failed"]:
                print(f"  {args.manifest}:{line}: {why}")
        elif args.command == "tfds":
            print(build_tfds(load_config(args.config, args.overrides), args.data_dir, args.train, args.validation))
        else:
            info = write_shards(args.jsonl, args.prefix, load_config(args.config, args.overrides), args.num_shards)
            print(info["report"].summary())
            print(f"{info['examples']} examples in {len(info['paths'])} shard(s): {info['paths'][0]} ...")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
