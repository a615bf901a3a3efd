"""What the preference runs (reward model, DPO) share: the mesh and its row check, the pairs of
data.train / data.eval as arrays, one padded length for both, and the held-out batches. A new
preference algorithm's wiring file uses these as runs/reward.py and runs/dpo.py do."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from editx_jax import sharding
from editx_jax.config import Config, ConfigError
from editx_jax.data import jsonl, pairs
from editx_jax.data.dataset import epoch_indices
from editx_jax.train.loop import RunError


def make_mesh(cfg: Config, devices, rows: int, what: str):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise RunError(f"{what}: {rows} rows per step must divide over data x fsdp = {shards} devices")
    return mesh


def _read(cfg: Config, path: str, tok, log):
    got, report = pairs.read_pairs(path, tok, cfg.data, cfg.dpo, cfg.llm.vocab_size, strict=cfg.data.strict)
    log(f"pairs from {path}: {report.summary()}")
    if not got:
        raise RunError(f"{path}: no usable preference pairs")
    return pairs.as_arrays(got)


@dataclasses.dataclass
class PairData:
    """(prompts, chosen, rejected, margins) of data.train and data.eval, and the padded row length."""
    train: tuple
    held: tuple | None
    length: int

    def train_indices(self, step: int, cfg: Config) -> np.ndarray:
        return epoch_indices(len(self.train[0]), cfg.train.batch_size, step, cfg.train.seed)

    def held_indices(self, cfg: Config, log: Callable) -> list[np.ndarray]:
        """Whole held-out batches only (each must divide over the batch shards); a remainder is left out."""
        bs = cfg.train.batch_size
        n = 0 if self.held is None else len(self.held[0]) // bs * bs
        out = [np.arange(i, i + bs) for i in range(0, n, bs)]
        if self.held is not None and not out:
            log(f"warning: data.eval has fewer than train.batch_size = {bs} pairs; no held-out metrics")
        return out[:cfg.train.eval_batches] if cfg.train.eval_batches else out


def read_pair_data(cfg: Config, tokenizer, log) -> PairData:
    if not cfg.data.train:
        raise ConfigError("data.train: no training file given")
    tok = tokenizer or jsonl.load_text_tokenizer(cfg.data.text_tokenizer)
    train = _read(cfg, cfg.data.train, tok, log)
    held = _read(cfg, cfg.data.eval, tok, log) if cfg.data.eval else None
    longest = max(len(p) + max(len(c), len(r)) for P, C, R, _ in [train, *([held] if held else [])]
                  for p, c, r in zip(P, C, R))
    return PairData(train, held, -(-longest // 8) * 8)


def take(data: tuple, idx) -> tuple:
    """The pairs at `idx`: (prompts, chosen, rejected) lists and the margins array."""
    P, C, R, M = data
    return [P[i] for i in idx], [C[i] for i in idx], [R[i] for i in idx], M[idx]
