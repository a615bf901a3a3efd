"""Grain pipelines: examples -> seeded shuffle -> first-fit packing -> global batches.

A batch is a dict of numpy arrays shaped [grad_accum, rows_per_micro_batch, max_length]:

    tokens      int32  model inputs (example tokens without their last one)
    targets     int32  the next token of each input
    weights     f32    1 where the target is in the loss (assistant audio, <|EOT|>)
    positions   int32  0, 1, ... restarting at each packed example; -1 on padding
    segment_ids int32  1, 2, ... per packed example; 0 on padding

Multi-host: every process runs the same pipeline over all examples and holds the same global
batch; `to_global` copies to each device only its own rows. So every process ends an epoch at the
same step and the global batch is the same whatever the process count (packing a per-process slice
would give each process its own number of packed rows: the first one out of data would enter the
final checkpoint's barrier while the others wait in a step's collective). The price is that each
process reads and packs every example, cheap next to a step.

The shift happens per example before packing, so no target ever crosses into the next example, and
with positions restarting and attention confined to a segment, a packed example gets exactly the loss
it gets alone. The iterator's state (`get_state` / `set_state`) is saved with the train state.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence

import grain
import jax
import numpy as np

from editx_jax import sharding
from editx_jax.config import DataConfig
from editx_jax.data.jsonl import Example

FEATURES = ("tokens", "targets", "weights")
BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


RECORD_MAGIC = b"EXJ1"


def encode_example(ex: Example) -> bytes:
    """An example as one ArrayRecord record: magic, length (uint32), int32 tokens, uint8 loss mask."""
    tokens = np.asarray(ex.tokens, np.int32)
    return (RECORD_MAGIC + np.uint32(tokens.size).tobytes() + tokens.tobytes()
            + np.asarray(ex.loss_mask, np.uint8).tobytes())


def decode_example(data: bytes) -> Example:
    if data[:4] != RECORD_MAGIC:
        raise ValueError("not an editx-jax example record (wrong magic)")
    n = int(np.frombuffer(data, np.uint32, 1, 4)[0])
    return Example(np.frombuffer(data, np.int32, n, 8).copy(),
                   np.frombuffer(data, np.uint8, n, 8 + 4 * n).astype(bool))


class ArrayRecordExamples:
    """Random-access examples from ArrayRecord shards written by `tools/prepare_data.py shards`."""

    def __init__(self, paths: str | Sequence[str]):
        if isinstance(paths, str):
            paths = sorted(p for pat in paths.split(",") if pat for p in (glob.glob(pat) or [pat]))
        self.source = grain.sources.ArrayRecordDataSource(list(paths))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i) -> Example:
        return decode_example(self.source[i])


def is_array_record(spec: str) -> bool:
    return any(p.endswith(".array_record") or "array_record" in p.rsplit("/", 1)[-1] for p in spec.split(",") if p)


def example_features(ex: Example) -> dict:
    return {"tokens": ex.tokens[:-1].astype(np.int32), "targets": ex.tokens[1:].astype(np.int32),
            "weights": ex.loss_mask[1:].astype(np.float32)}


def pad_example(feat: dict, length: int) -> dict:
    """One example alone in a row of `length` (no packing)."""
    n = feat["tokens"].shape[0]
    out = {k: np.zeros(length, v.dtype) for k, v in feat.items()}
    for k, v in feat.items():
        out[k][:n] = v
    out["positions"] = np.full(length, -1, np.int32)
    out["positions"][:n] = np.arange(n)
    out["segment_ids"] = np.zeros(length, np.int32)
    out["segment_ids"][:n] = 1
    return out


def _from_packed(row: dict) -> dict:
    seg = row["tokens_segment_ids"].astype(np.int32)
    pos = np.where(seg > 0, row["tokens_positions"], -1).astype(np.int32)
    out = {k: row[k] for k in FEATURES}
    out["weights"] = np.where(seg > 0, out["weights"], 0).astype(np.float32)
    return {**out, "positions": pos, "segment_ids": seg}


def pack_rows(feats: Sequence[dict], length: int, bins: int) -> list[dict]:
    """First-fit packing of a list of example features (for tests and tools; the same packer)."""
    ds = grain.MapDataset.source(list(feats)).to_iter_dataset()
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct={k: length for k in FEATURES},
                                                    num_packing_bins=bins, shuffle_bins=False)
    return [_from_packed(r) for r in ds]


def _split_micro(batch: dict, grad_accum: int) -> dict:
    return {k: v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:]) for k, v in batch.items()}


def train_dataset(examples: Sequence[Example], cfg: DataConfig, rows: int, grad_accum: int = 1) -> grain.IterDataset:
    """The training stream: global batches of `rows` sequences, the same on every process.

    The examples are shuffled with the data seed; each epoch repeats the same order (num_epochs=0
    repeats forever); the stream ends after the last whole batch of the last epoch.
    """
    if rows % grad_accum:
        raise ValueError(f"{rows} rows per step do not split into {grad_accum} micro-batches")
    if not len(examples):
        raise ValueError("no training examples (every record was skipped; see the data report)")
    ds = grain.MapDataset.source(examples)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.map(example_features).repeat(cfg.num_epochs or None)
    it = ds.to_iter_dataset()
    length = cfg.max_length
    if cfg.pack:
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={k: length for k in FEATURES}, num_packing_bins=cfg.packing_bins or rows,
            shuffle_bins=False)
        it = it.map(_from_packed)
    else:
        it = it.map(lambda f: pad_example(f, length))
    it = it.batch(rows, drop_remainder=True).map(lambda b: _split_micro(b, grad_accum))
    if cfg.prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
    return it


def eval_batches(examples: Sequence[Example], length: int, rows: int) -> list[dict]:
    """The held-out set as global batches, one example per row, in order, the last batch filled with
    empty rows."""
    feats = [example_features(e) for e in examples]
    empty = pad_example({k: np.zeros(0, np.float32 if k == "weights" else np.int32) for k in FEATURES}, length)
    out = []
    for b in range(-(-len(feats) // rows)):
        chunk = [pad_example(f, length) for f in feats[b * rows:(b + 1) * rows]]
        chunk += [empty] * (rows - len(chunk))
        out.append({k: np.stack([c[k] for c in chunk])[None] for k in BATCH_KEYS})
    return out


def to_global(batch: dict, mesh) -> dict:
    """A global host batch (the same on every process) -> global jax arrays, rows over data x fsdp;
    each process copies only the rows of its own devices."""
    sh = sharding.batch_sharding(mesh, ndim=3, axis=1)  # [grad_accum, rows, length]

    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return {k: place(batch[k]) for k in BATCH_KEYS}


def epoch_indices(n: int, size: int, step: int, seed: int) -> np.ndarray:
    """The `size` example indices of `step`: consecutive slices of a fresh permutation per epoch, so a
    resumed run needs nothing but the step to find its place (the reward / DPO / GRPO / PPO data)."""
    if n == 0:
        raise ValueError("no training examples")
    pos = np.arange(step * size, (step + 1) * size)
    epochs, offsets = pos // n, pos % n
    perms = {e: np.random.RandomState(seed + int(e)).permutation(n) for e in np.unique(epochs)}
    return np.asarray([perms[e][o] for e, o in zip(epochs, offsets)])
