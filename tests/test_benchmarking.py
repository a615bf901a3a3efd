"""The machine measurements the benchmark tools share (small sizes: this only checks they work)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
from conftest import ROOT

from editx_jax import benchmarking


def test_measurements_are_positive_and_sane():
    assert benchmarking.copy_bandwidth(1 << 20, repeats=2) > 1e6  # > 1 MB/s
    assert benchmarking.read_bandwidth(1 << 20, repeats=2) > 1e6
    assert benchmarking.matmul_flops(64, repeats=2) > 1e6
    kind, peak = benchmarking.peak_memory_bytes()
    assert kind in ("device peak", "host peak RSS") and peak > 1 << 20
    out, seconds = benchmarking.timed(lambda a, b: a @ b, jnp.ones((8, 4)), b=jnp.ones((4, 2)))
    assert out.shape == (8, 2) and float(out[0, 0]) == 4.0 and seconds >= 0
    assert benchmarking.best_seconds(lambda: jnp.ones(3) + 1, repeats=3) >= 0
    assert benchmarking.tree_bytes({"a": jnp.ones((2, 3)), "b": [jnp.ones(4, jnp.bfloat16)]}) == 24 + 8


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


def test_device_peaks_by_kind():
    assert benchmarking.device_peaks(_Device("NVIDIA H100 80GB HBM3")) == (989e12, 3.35e12)
    assert benchmarking.device_peaks(_Device("NVIDIA H200")) == (989e12, 4.8e12)
    assert benchmarking.device_peaks(_Device("NVIDIA H100 PCIe")) is None  # a slower part: not guessed
    assert benchmarking.device_peaks(_Device("cpu")) is None


def test_device_check_tools_import_no_optional_packages():
    """tools/device_check.sh runs on a bare jax + flax + optax image: what its steps import must not
    pull librosa, grain or tensorflow_datasets."""
    code = (
        "import runpy, sys, importlib\n"
        "for tool in ('tools/bench_llm.py', 'tools/bench_decoder.py', 'tools/bench_train.py'):\n"
        "    runpy.run_path(tool, run_name='imported')\n"
        "from editx_jax.parity import gate\n"
        "for target in gate.RUNNERS.values():\n"
        "    importlib.import_module(target.split(':')[0])\n"
        "print(sorted({'librosa', 'grain', 'tensorflow_datasets'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
def test_guarded_runs_and_the_json_writer(tmp_path, monkeypatch):
    monkeypatch.setenv("WAIT_IDLE_MAX", "0")  # never wait for a quiet machine in a test
    calls = []
    results, info = benchmarking.guarded_runs(lambda: calls.append(1) or len(calls), 2)
    assert 2 <= len(calls) <= 6 and info["clean_runs"] + info["discarded_runs"] == len(calls)
    kept = info["clean_runs"] or info["discarded_runs"]  # the clean calls, or the loaded ones if none was
    assert len(results) == kept == len(info["foreign_cores"]) and set(results) <= set(range(1, len(calls) + 1))
    monkeypatch.setenv("GUARD_ATTEMPTS_MULT", "0")  # at most 0 * n + 2 calls, as the official scripts
    calls.clear()
    benchmarking.guarded_runs(lambda: calls.append(1), 5)
    assert len(calls) == 2
    monkeypatch.delenv("BENCH_OUT", raising=False)
    assert benchmarking.results_path(None, "llm") is None
    assert benchmarking.results_path("x.json", "llm").name == "x.json"
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    monkeypatch.setenv("BENCH_TAG", "run1")
    path = benchmarking.results_path(None, "llm")
    assert path == tmp_path / "results_llm_run1.json"  # the official scripts' naming
    benchmarking.write_results(path, {"decode_b1": {"decode_tokens_per_s": 1.5}})
    assert json.loads(path.read_text()) == {"decode_b1": {"decode_tokens_per_s": 1.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["results_llm_run1.json"]  # no temporary file left
