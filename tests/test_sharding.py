"""Sharded forward and decode on a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices."""

import jax
import numpy as np
import pytest

from editx_jax import sharding
from editx_jax.config import GenerationConfig, LLMConfig, MeshConfig
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
