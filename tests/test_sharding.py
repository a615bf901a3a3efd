"""Sharded forward and decode on a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT

from editx_jax import sharding
from editx_jax.config import GenerationConfig, LLMConfig, MeshConfig
from editx_jax.generate import decode
from editx_jax.generate.decode import generate
from editx_jax.models import llm

CFG = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_groups=2, num_layers=2)
GEN = GenerationConfig(greedy=True, max_new_tokens=6, max_length=256, repetition_window=0, min_prompt_bucket=16)


@pytest.fixture(scope="module")
def setup():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax import)")
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = llm.init_params(CFG, jax.random.key(0))
    shardings = sharding.logical_to_sharding(llm.param_logical_axes(CFG), mesh)
    return mesh, params, sharding.shard_tree(params, shardings)


def test_mesh_axes():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 2, 2)


def test_large_weights_are_split(setup):
    _, _, sharded = setup
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(sharded)}
    for path, array in flat.items():
        if "norm" in path:
            assert sharding.split_factor(array) == 1, path
        elif "embedding" in path:  # rows whole, embed dim over fsdp
            assert sharding.split_factor(array) == 2, path
        else:  # embed dim over fsdp and heads / mlp / vocab over tensor: 4 ways
            assert sharding.split_factor(array) == 4, path
    spec = flat["['layers']['attn']['q_proj']['kernel']"].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)


def test_sharded_forward_and_decode_equal_single_device(setup):
    mesh, params, sharded = setup
    tokens = np.random.RandomState(0).randint(4, 512, (4, 12))
    want = np.asarray(llm.forward(params, CFG, tokens))
    prompts = [list(t[:n]) for t, n in zip(tokens, (12, 5, 9, 3))]
    want_tokens = generate(params, CFG, GEN, prompts).tokens
    with sharding.use_mesh(mesh):
        got = llm.forward(sharded, CFG, jax.device_put(tokens, sharding.batch_sharding(mesh)))
        got_tokens = generate(sharded, CFG, GEN, prompts, mesh=mesh).tokens
    assert got.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert got_tokens == want_tokens


TINY = LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=8, num_groups=8, num_layers=2)
TINY_GEN = GenerationConfig(greedy=True, max_new_tokens=5, max_length=64, repetition_window=0, min_prompt_bucket=16)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 1, 4), (8, 1, 1)])
def test_sharded_generate_equals_one_device(shape):
    """Prefill and decode jitted with the rules table's shardings: the same greedy ids as one device,
    the params and the returned cache laid out as the rules say."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh(MeshConfig(*shape))
    params = llm.init_params(TINY, jax.random.key(1))
    placed = sharding.shard_tree(params, sharding.logical_to_sharding(llm.param_logical_axes(TINY), mesh))
    rng = np.random.RandomState(2)
    prompts = [list(map(int, rng.randint(4, 256, n))) for n in (7, 3, 12, 5, 9, 4, 11, 6)]
    want = generate(params, TINY, TINY_GEN, prompts).tokens
    assert generate(placed, TINY, TINY_GEN, prompts, mesh=mesh).tokens == want
    data, _, tensor = shape
    q = placed["layers"]["attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None) and sharding.split_factor(q) == tensor
    # The cache the jitted prefill returns: rows over data, kv heads over tensor.
    cache = llm.init_cache(TINY, 8, 32)
    cache = sharding.shard_tree(cache, sharding.cache_shardings(mesh, TINY.num_layers))
    tokens = jax.device_put(np.asarray([p[:3] for p in prompts], np.int32), sharding.batch_sharding(mesh))
    split = llm.split_layers(dict(placed))
    assert tuple(split["layers"][0]["attn"]["q_proj"]["kernel"].sharding.spec) == ("fsdp", "tensor", None)
    _, cache = decode.prefill(split, TINY, tokens, tokens * 0, cache, mesh=mesh)
    assert tuple(cache["k"][0].sharding.spec)[:1] == (("data", "fsdp", "tensor"),)  # rows [B * G]
    assert sharding.split_factor(cache["k"][0]) == data * tensor


def test_plan_memory_inference_pads_a_batch_to_the_mesh(tmp_path):
    """tools/plan_memory.py --inference plans what generate compiles: one row on a mesh of 2 fsdp
    devices is padded to 2 rows (generate's idle rows), not refused from inside jax."""
    out = subprocess.run([sys.executable, "tools/plan_memory.py", "--config", "configs/tiny.yaml", "--inference",
                          "--devices", "2", "--mesh", "1,2,1", "--batch", "1", "--clip-seconds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = [line for line in out.stdout.splitlines() if line.strip().startswith("2 ")]
    assert row and "(1 rows asked, padded with idle rows)" in row[0], out.stdout
