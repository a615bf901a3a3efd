"""Machine measurements shared by the benchmark tools (tools/bench_*.py): how fast this machine copies
memory and multiplies matrices right now, how much memory the run peaked at, and a timer that waits
for jax's asynchronous results.

Each speed is the best of a few repeats after one warm-up call (which compiles), so it is the
machine's capability under the current load, the yardstick a model's measured speed is compared to
(a roofline or a share of GEMM FLOP/s).
"""

from __future__ import annotations

import resource
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """(fn(*args, **kwargs), seconds), the clock stopped only once every output array is ready."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def best_seconds(fn: Callable, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn() (call it once before, to compile)."""
    return min(timed(fn)[1] for _ in range(max(1, repeats)))


def copy_bandwidth(n_bytes: int = 1 << 27, repeats: int = 5) -> float:
    """Bytes/s of a device-side in-place copy of an `n_bytes` buffer (one read and one write per
    byte; the buffer is donated, so no fresh allocation is timed)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = copy(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x = copy(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best


def matmul_flops(n: int = 1024, repeats: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on the default device (best of `repeats`)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    return 2 * n ** 3 / best_seconds(lambda: mm(a, a), repeats)


# Datasheet peaks per device, found by a substring of jax's `device_kind`: (dense bf16 FLOP/s,
# HBM bytes/s). "NVIDIA H100 80GB HBM3" is the SXM part; the PCIe H100 is slower and not listed.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 80GB HBM3", 989e12, 3.35e12),
    ("H100 SXM", 989e12, 3.35e12),
    ("H200", 989e12, 4.8e12),
)


def device_peaks(device=None) -> tuple[float, float] | None:
    """(bf16 FLOP/s, HBM bytes/s) of `device` (default: the first) from DEVICE_PEAKS; None for a
    device not listed (a CPU: measure it instead with `matmul_flops` / `copy_bandwidth`)."""
    kind = (device or jax.devices()[0]).device_kind
    return next(((f, b) for name, f, b in DEVICE_PEAKS if name in kind), None)


def peak_memory_bytes() -> tuple[str, int]:
    """(what was measured, bytes): the first device's peak bytes in use when the backend reports it
    (GPU, TPU), else this process's peak resident set size (CPU, where the arrays live in RAM)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device peak", int(stats["peak_bytes_in_use"])
    return "host peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
