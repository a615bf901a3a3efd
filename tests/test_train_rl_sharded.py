"""The rollout sampler on the (data 2, fsdp 2, tensor 2) fake-device mesh gives the same tokens as on one
device: sampling with one key per row (what GRPO and PPO use) and greedy."""

import dataclasses

import jax
import numpy as np
import pytest
from _rl_corpus import TINY, make_prompts, prompt_ids

from editx_jax import sharding
from editx_jax.config import GenerationConfig, MeshConfig, OptimizerConfig
from editx_jax.models import llm
from editx_jax.train import rollout
from editx_jax.train import state as st


def test_rollout_sharded_equals_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    one = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    eight = sharding.make_mesh(MeshConfig(2, 2, 2), jax.devices())
    # a trained-looking policy: random weights scaled up so sampling is not near-uniform noise
    params = jax.tree_util.tree_map(lambda x: x * 3.0, llm.init_params(TINY, jax.random.key(5)))
    tx = st.make_optimizer(OptimizerConfig(), 10)
    prompts = [prompt_ids(*p) for p in make_prompts(4, 9)]  # 4 prompts x 2 samples = 8 rows (GRPO groups)
    gen = GenerationConfig(max_length=64, max_new_tokens=12, min_prompt_bucket=16, temperature=1.0, top_k=8,
                           repetition_window=4)
    got = {}
    for name, mesh in (("one", one), ("eight", eight)):
        placed = sharding.place(params, st.llm_state_shardings(TINY, tx, mesh)["params"])
        if name == "eight":
            assert len(jax.tree_util.tree_leaves(placed)[1].sharding.device_set) > 1
        for mode, g in (("sample", gen), ("greedy", dataclasses.replace(gen, greedy=True))):
            rows, comps = rollout.sample_completions(placed, TINY, g, prompts, jax.random.key(3), repeats=2,
                                                     mesh=mesh)
            got[name, mode] = comps
    for mode in ("sample", "greedy"):
        assert got["one", mode] == got["eight", mode], mode
    # the sampled rows differ within a group (independent keys), and the run is not degenerate
    assert got["one", "sample"][0] != got["one", "sample"][1]
    assert np.mean([len(c) for c in got["one", "sample"]]) > 2
