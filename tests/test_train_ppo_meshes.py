"""PPO with the critic on its own mesh equals PPO with every role on one mesh."""

import jax
import numpy as np
import pytest
from _rl_corpus import TINY, in_band_reward, make_prompts, prompt_ids

from editx_jax import sharding
from editx_jax.config import GenerationConfig, MeshConfig, OptimizerConfig, PPOConfig
from editx_jax.models import llm
from editx_jax.train import ppo
from editx_jax.train import state as st


def run_one_iteration(policy_mesh, value_mesh):
    pcfg = PPOConfig(max_new_tokens=6, critic_warmup=0, epochs=1, minibatches=1)
    gen = GenerationConfig(max_length=64, max_new_tokens=6, min_prompt_bucket=16, top_k=0, repetition_window=0,
                           temperature=1.0)
    tx = st.make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0, schedule="constant"), 4)
    ref = llm.init_params(TINY, jax.random.key(3))
    policy = st.create_state(ref, tx, st.llm_state_shardings(TINY, tx, policy_mesh))
    value = st.create_state(ppo.init_value_params(policy_params=ref), tx,
                            ppo.value_shardings(TINY, tx, value_mesh or policy_mesh))
    trainer = ppo.PPO(TINY, pcfg, gen, tx, tx, policy_mesh, [in_band_reward], value_mesh=value_mesh)
    prompts = [prompt_ids(*p) for p in make_prompts(4, 1)]
    return trainer.iteration(ppo.PPOState(policy, ref, value), prompts, [{}] * 4, jax.random.key(5))


def test_critic_on_its_own_devices():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    devices = jax.devices()
    policy_mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices[:4])
    critic_mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices[4:])
    shared, m_shared = run_one_iteration(policy_mesh, None)
    split, m_split = run_one_iteration(policy_mesh, critic_mesh)
    critic_devices = {d for leaf in jax.tree_util.tree_leaves(split.value["params"]) for d in leaf.devices()}
    policy_devices = {d for leaf in jax.tree_util.tree_leaves(split.policy["params"]) for d in leaf.devices()}
    assert critic_devices == set(devices[4:]) and policy_devices == set(devices[:4])
    for name in ("reward_mean", "kl", "value_loss", "policy_loss", "explained_variance"):
        assert m_split[name] == pytest.approx(m_shared[name], rel=1e-4, abs=1e-6), name
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                           split.value["params"], shared.value["params"])
