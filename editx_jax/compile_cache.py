"""The persistent XLA compilation cache, on by default wherever a model is run (`EditX`, train.py),
and the process's compile time so far (`compile_seconds`), which the entry points print apart.

Compiling the released-size prefill, decode and decoder takes minutes on a CPU. With the cache,
executables are written to disk once, so the next process (the next `infer.py` call, a resumed
training run) loads them instead of compiling again. Only compilations of 1 s or more are kept
(jax's default threshold), so the many tiny ones do not fill the directory.

Directory: $EDITX_JAX_CACHE, default ~/.cache/editx-jax/xla; EDITX_JAX_CACHE=off turns it off (the
test suite does, to stay hermetic). A cache directory the user already gave jax
(`jax_compilation_cache_dir`, or JAX_COMPILATION_CACHE_DIR) is kept as it is.
"""

from __future__ import annotations

import os
import pathlib

import jax

ENV = "EDITX_JAX_CACHE"
DEFAULT_DIR = pathlib.Path.home() / ".cache" / "editx-jax" / "xla"
# jax reports each XLA compilation under this event (shorter when the persistent cache supplies it)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiled = [0.0]


def _count(event: str, seconds: float, **_) -> None:
    if event == _COMPILE_EVENT:
        _compiled[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count)


def compile_seconds() -> float:
    """Seconds this process has spent in XLA compilation (or loading from the cache) so far."""
    return _compiled[0]


def enable_compile_cache() -> str | None:
    """Point jax's persistent compilation cache at our directory unless one is set or it is off;
    returns the directory in use (None when off)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    setting = os.environ.get(ENV, "")
    if setting.lower() in ("off", "0", "none", "false"):
        return None
    path = pathlib.Path(setting or DEFAULT_DIR).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only home or similar: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)
