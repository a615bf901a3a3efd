"""Machine measurements shared by the benchmark tools (tools/bench_*.py): how fast this machine copies
memory and multiplies matrices right now, how much memory the run peaked at, and a timer that waits
for jax's asynchronous results.

Each speed is the best of a few repeats after one warm-up call (which compiles), so it is the
machine's capability under the current load, the yardstick a model's measured speed is compared to
(a roofline or a share of GEMM FLOP/s).

The model timings of the tools are medians of runs made while the rest of the machine was quiet
(`guarded_runs`), and go to a JSON file with the keys of the official side-by-side scripts
(shared/bench-official/, read by its make_table.py), so both sides can be tabled the same way.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import tempfile
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


def read_bandwidth(n_bytes: int = 1 << 28, repeats: int = 7) -> float:
    """Bytes/s of reading an `n_bytes` float32 matrix once (best of `repeats`): a matrix-vector
    product over [n_bytes / 4096, 1024], whose output is 1/1024 of its input. The limit of work that
    only reads, as decode does its weights. On the 2-core CPU of docs/performance.md it is the
    fastest read XLA has (33-35 GB/s, against 27 for a sum); a copy moves more bytes per second
    (about 50 GB/s, its read and its write counted) than either reads alone."""
    matrix = jnp.ones((n_bytes // 4096, 1024), jnp.float32)
    vector = jnp.ones((1024,), jnp.float32)
    product = jax.jit(lambda m, v: m @ v)
    product(matrix, vector).block_until_ready()
    return n_bytes / best_seconds(lambda: product(matrix, vector), repeats)


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
    device not listed (a CPU: measure it instead with `matmul_flops` / `read_bandwidth`)."""
    kind = (device or jax.devices()[0]).device_kind
    return next(((f, b) for name, f, b in DEVICE_PEAKS if name in kind), None)


def peak_memory_bytes() -> tuple[str, int]:
    """(what was measured, bytes): the first device's peak bytes in use when the backend reports it
    (GPU, TPU), else this process's peak resident set size (CPU, where the arrays live in RAM)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device peak", int(stats["peak_bytes_in_use"])
    return "host peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new host peak-RSS window (Linux: VmHWM is reset by writing 5 to clear_refs); False
    where the kernel does not allow it, and `window_peak_rss` then reports the process's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak_rss() -> int:
    """Peak resident bytes since the last `reset_peak_rss` (VmHWM), else since the process began."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


# A timed run during which other processes used this many cores or more is discarded and repeated
# (after waiting for a quieter machine): the same rule as the official side-by-side scripts.
FOREIGN_MAX_CORES = 0.25


def _busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat, 0.0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    except OSError:
        return 0.0
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class LoadGuard:
    """Context manager: how many cores other processes kept busy meanwhile (`foreign_cores`; machine
    busy time minus this process's own CPU time, all its threads, over the wall time)."""

    def __enter__(self):
        self._busy, self._own, self._t = _busy_seconds(), sum(os.times()[:2]), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._t
        own = sum(os.times()[:2]) - self._own
        self.foreign_cores = max(0.0, _busy_seconds() - self._busy - own) / max(self.wall, 1e-9)
        return False


def wait_quiet(max_wait: float | None = None, need: int = 3) -> float:
    """Wait until others use < 0.15 cores for `need` 1 s windows in a row, at most `max_wait` s (env
    WAIT_IDLE_MAX, default 300). Returns the seconds waited."""
    max_wait = float(os.environ.get("WAIT_IDLE_MAX", "300")) if max_wait is None else max_wait
    start, quiet = time.perf_counter(), 0
    while quiet < need and time.perf_counter() - start < max_wait:
        with LoadGuard() as g:
            time.sleep(1.0)
        quiet = quiet + 1 if g.foreign_cores < 0.15 else 0
    return time.perf_counter() - start


def guarded_runs(fn: Callable[[], object], n: int, max_attempts: int | None = None) -> tuple[list, dict]:
    """Call fn() until `n` calls ran while others used < FOREIGN_MAX_CORES (waiting for quiet after
    a loaded one), at most m n + 2 calls (m: env GUARD_ATTEMPTS_MULT, default 2). Returns (the clean
    calls' results, or the loaded ones when none was clean; a dict of what the guard saw)."""
    clean, loaded, waited = [], [], 0.0
    max_attempts = max_attempts or int(os.environ.get("GUARD_ATTEMPTS_MULT", "2")) * n + 2
    for _ in range(max_attempts):
        if len(clean) >= n:
            break
        with LoadGuard() as g:
            out = fn()
        (clean if g.foreign_cores < FOREIGN_MAX_CORES else loaded).append((out, round(g.foreign_cores, 3)))
        if g.foreign_cores >= FOREIGN_MAX_CORES:
            waited += wait_quiet()
    use = clean or loaded
    return [o for o, _ in use], {"clean_runs": len(clean), "discarded_runs": len(loaded),
                                 "waited_for_idle_s": round(waited, 1), "foreign_cores": [c for _, c in use]}


def median(values) -> float:
    return float(statistics.median(values))


def results_path(json_arg: str | None, name: str) -> pathlib.Path | None:
    """Where a tool writes its JSON: `--json PATH`, else $BENCH_OUT/results_<name>[_$BENCH_TAG].json
    (the official scripts' naming), else nowhere (None)."""
    if json_arg:
        return pathlib.Path(json_arg)
    if os.environ.get("BENCH_OUT"):
        tag = os.environ.get("BENCH_TAG", "")
        return pathlib.Path(os.environ["BENCH_OUT"]) / f"results_{name}{'_' + tag if tag else ''}.json"
    return None


def write_results(path: pathlib.Path | None, results: dict) -> None:
    """Write `results` as JSON to `path` atomically (a temporary file renamed over it); None: nothing."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
