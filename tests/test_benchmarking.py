"""The machine measurements the benchmark tools share (small sizes: this only checks they work)."""

import jax.numpy as jnp

from editx_jax import benchmarking


def test_measurements_are_positive_and_sane():
    assert benchmarking.copy_bandwidth(1 << 20, repeats=2) > 1e6  # > 1 MB/s
    assert benchmarking.matmul_flops(64, repeats=2) > 1e6
    kind, peak = benchmarking.peak_memory_bytes()
    assert kind in ("device peak", "host peak RSS") and peak > 1 << 20
    out, seconds = benchmarking.timed(lambda a, b: a @ b, jnp.ones((8, 4)), b=jnp.ones((4, 2)))
    assert out.shape == (8, 2) and float(out[0, 0]) == 4.0 and seconds >= 0
    assert benchmarking.best_seconds(lambda: jnp.ones(3) + 1, repeats=3) >= 0
    assert benchmarking.tree_bytes({"a": jnp.ones((2, 3)), "b": [jnp.ones(4, jnp.bfloat16)]}) == 24 + 8
