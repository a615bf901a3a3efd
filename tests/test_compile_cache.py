"""The persistent compilation cache: on by default, in $EDITX_JAX_CACHE, off on request; a second
process loads what the first compiled."""

import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = """
import jax, jax.numpy as jnp
from editx_jax.compile_cache import enable_compile_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
print("dir", enable_compile_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache this tiny function too
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((32, 32))).block_until_ready()
print("hits", len(hits))
"""


def _run(cache_setting, home):
    env = {**os.environ, "EDITX_JAX_CACHE": cache_setting, "HOME": str(home), "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


def test_second_process_loads_the_first_ones_executable(tmp_path):
    cache = tmp_path / "xla"
    first = _run(str(cache), tmp_path)
    assert first == {"dir": str(cache), "hits": "0"} and any(cache.iterdir())
    assert int(_run(str(cache), tmp_path)["hits"]) >= 1


def test_default_directory_and_off(tmp_path):
    assert _run("", tmp_path)["dir"] == str(tmp_path / ".cache" / "editx-jax" / "xla")
    off_home = tmp_path / "off"
    off_home.mkdir()
    assert _run("off", off_home) == {"dir": "None", "hits": "0"}
    assert not any(off_home.iterdir())
