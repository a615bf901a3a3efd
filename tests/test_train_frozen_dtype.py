"""ppo.frozen_dtype: the frozen reference (and a reward model scored as the reward) stored as
bfloat16 gives the float32 reference's log-probs (the same at llm.dtype bfloat16, where every weight
is cast to bfloat16 before use; close at float32 compute), takes half the memory, and the memory
planner (tools/plan_rl.py) counts it at that size."""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _rl_corpus import TINY

from editx_jax import sharding
from editx_jax.config import Config, ConfigError, MeshConfig, PPOConfig
from editx_jax.models import llm
from editx_jax.train import state as st
from editx_jax.train.logprobs import token_logps

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plan_rl():
    """tools/plan_rl.py (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location("plan_rl", ROOT / "tools" / "plan_rl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(rows=4, seq=24):
    tokens = jax.random.randint(jax.random.key(1), (rows, seq), 0, TINY.vocab_size)
    return {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
            "positions": jnp.broadcast_to(jnp.arange(seq), (rows, seq)), "segment_ids": jnp.ones((rows, seq), jnp.int32)}


def _ref_logps(compute_dtype, frozen_dtype):
    cfg = dataclasses.replace(TINY, dtype=compute_dtype)
    mesh = sharding.make_mesh(MeshConfig(1, -1, 1))
    shardings = sharding.logical_to_sharding(llm.param_logical_axes(st.master_config(cfg)), mesh)
    params = llm.init_params(st.master_config(cfg), jax.random.key(0))
    ref = st.frozen(params, shardings, frozen_dtype)
    for leaf, s in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(shardings), strict=True):
        assert leaf.dtype == jnp.dtype(frozen_dtype) and leaf.sharding == s
    with sharding.use_mesh(mesh):
        return np.asarray(jax.jit(lambda p, b: token_logps(p, st.master_config(cfg), b))(ref, _batch())), ref


def test_a_bfloat16_reference_gives_the_float32_log_probs():
    want, ref32 = _ref_logps("bfloat16", "float32")
    got, ref16 = _ref_logps("bfloat16", "bfloat16")
    np.testing.assert_array_equal(got, want)  # bfloat16 compute: the forward rounds the weights the same way
    want, _ = _ref_logps("float32", "float32")
    got, _ = _ref_logps("float32", "bfloat16")
    # float32 compute: only the weights' rounding (8 bits of mantissa) differs
    np.testing.assert_allclose(got, want, atol=2e-2)
    assert not np.array_equal(got, want)
    size = lambda t: sum(x.nbytes for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    assert size(ref16) * 2 == size(ref32)


def test_a_restore_target_is_retyped_and_a_bad_dtype_is_a_config_error():
    mesh = sharding.make_mesh(MeshConfig(1, -1, 1))
    shardings = sharding.logical_to_sharding(llm.param_logical_axes(st.master_config(TINY)), mesh)
    target = st.frozen(llm.abstract_params(st.master_config(TINY)), shardings, "bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(target)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ConfigError, match="ppo.frozen_dtype"):
        PPOConfig(frozen_dtype="int8")


def test_the_memory_plan_counts_the_bfloat16_reference():
    plan_rl = _plan_rl()
    mesh = sharding.make_mesh(MeshConfig(1, 4, 1), jax.devices()[:4])
    roles = {}
    for dtype in ("float32", "bfloat16"):
        cfg = Config(llm=TINY, ppo=PPOConfig(frozen_dtype=dtype))
        _, roles[dtype] = plan_rl._phases(cfg, "ppo", mesh, 8, 32, 2, 1, 4)
        assert plan_rl._bytes(plan_rl._reward_model(cfg, mesh)) * 2 ** (dtype == "bfloat16") == \
            plan_rl._bytes(plan_rl._reward_model(Config(llm=TINY), mesh))
    assert roles["bfloat16"]["reference"] * 2 == roles["float32"]["reference"]
    assert roles["bfloat16"]["policy state"] == roles["float32"]["policy state"]  # float32 master + AdamW
