"""Rollouts and rewards on the (data 2, fsdp 2, tensor 2) fake-device mesh: the sampler gives the same
tokens as on one device (sampling with one key per row, what GRPO and PPO use, and greedy) and runs
with the rules table's shardings; a reward model stays sharded and scores as on one device; a reward
model of other sizes is one clear error line."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from _rl_corpus import TINY, edit, make_prompts, prompt_ids

import train
from editx_jax import sharding
from editx_jax.config import Config, GenerationConfig, MeshConfig, OptimizerConfig, RewardConfig
from editx_jax.generate import decode
from editx_jax.models import llm
from editx_jax.models import reward as rm
from editx_jax.train import init_from, loop, reward, rollout
from editx_jax.train import state as st

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------- rewards and rollouts on the mesh


def _reward_run(folder, cfg_llm, key=0):
    """A reward run folder as `train.py --algo reward` leaves it: run_config.json and one checkpoint."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = st.make_optimizer(OptimizerConfig(), 10)
    params = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(key + 1), x.shape),
                                    rm.init_params(cfg_llm, jax.random.key(key)))  # a non-zero head
    state = st.create_state(params, tx, reward.shardings(cfg_llm, tx, mesh))
    mgr = loop.checkpoint_manager(pathlib.Path(folder) / "checkpoints", Config())
    loop.save_checkpoint(mgr, 1, state)
    mgr.wait_until_finished()
    mgr.close()
    (pathlib.Path(folder) / "run_config.json").write_text(json.dumps({"algo": "reward",
                                                                       "llm": dataclasses.asdict(cfg_llm)}))
    return params


def _expected(tree_axes, mesh):
    return sharding.logical_to_sharding(tree_axes, mesh)


def test_reward_model_stays_sharded_and_scores_as_on_one_device(tmp_path):
    """The reward model is read straight into the rules table's shardings on the mesh (no host copy),
    scored in a sharded jit, and gives the rewards of one device."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    _reward_run(tmp_path / "rm", TINY)
    cfg = Config(llm=TINY, mesh=MeshConfig(2, 2, 2))
    prompts = [prompt_ids(*p) for p in make_prompts(6, 11)]
    comps = [edit(p[3:-1], p[1])[:k] + [3] for p, k in zip(prompts, (1, 2, 3, 4, 5, 6))]
    comps[2] = []  # an empty completion scores 0 (never sent to the model)
    got = {}
    for name, mcfg in (("one", MeshConfig(1, 1, 1)), ("eight", MeshConfig(2, 2, 2))):
        devices = jax.devices()[:1] if name == "one" else jax.devices()
        mesh = sharding.make_mesh(mcfg, devices)
        params = init_from.load_reward_params(tmp_path / "rm", cfg, mesh)
        want = _expected(rm.param_logical_axes(st.master_config(TINY)), mesh)
        for leaf, sh in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
            assert isinstance(leaf, jax.Array) and leaf.dtype == np.float32
            assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.sharding, sh)
        fn = rollout.reward_model_fn(params, TINY, RewardConfig(), TINY, mesh=mesh)
        assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(fn.placed_params),
                                           jax.tree_util.tree_leaves(params)))  # used in place, not copied
        got[name] = np.asarray(fn(prompts, comps, [{}] * len(prompts)))
        if name == "eight":  # the embedding's hidden dim over fsdp, the MLP over tensor: really split
            assert sharding.split_factor(params["trunk"]["embed"]["embedding"]) == 2
            assert max(sharding.split_factor(x) for x in jax.tree_util.tree_leaves(params)) == 4
    assert got["one"][2] == 0.0
    assert np.ptp(np.delete(got["one"], 2)) > 1e-3  # the rows score differently: a non-degenerate check
    np.testing.assert_allclose(got["eight"], got["one"], rtol=1e-5, atol=1e-6)


def test_sampler_runs_with_rule_table_shardings(monkeypatch):
    """The rollout sampler, on the params' own mesh: prefill / decode take the params in their rule-table
    shardings and give back the decode state with rows over data x fsdp and the cache by the rules."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2), jax.devices())
    tx = st.make_optimizer(OptimizerConfig(), 10)
    params = sharding.place(llm.init_params(TINY, jax.random.key(5)), st.llm_state_shardings(TINY, tx, mesh)["params"])
    seen = {}
    real_decode = decode.decode

    def spy(params, cfg, gen, state, **kw):
        seen["mesh"], seen["params"] = kw["mesh"], params
        seen["state"] = out = real_decode(params, cfg, gen, state, **kw)
        return out

    monkeypatch.setattr(decode, "decode", spy)
    prompts = [prompt_ids(*p) for p in make_prompts(4, 9)]
    gen = GenerationConfig(max_length=64, max_new_tokens=6, min_prompt_bucket=16)
    rollout.sample_completions(params, TINY, gen, prompts, jax.random.key(0), repeats=2)  # no mesh given
    assert seen["mesh"] is mesh  # the params' mesh
    want = _expected(llm.inference_logical_axes(TINY), mesh)  # the layers split for generation
    for leaf, sh in zip(jax.tree_util.tree_leaves(seen["params"]), jax.tree_util.tree_leaves(want)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    state = seen["state"]
    rows2, rows1 = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    assert state.out.sharding.is_equivalent_to(rows2, 2) and state.count.sharding.is_equivalent_to(rows1, 1)
    assert state.logits.sharding.is_equivalent_to(rows2, 2)
    for leaf, sh in zip(jax.tree_util.tree_leaves(state.cache),
                        jax.tree_util.tree_leaves(sharding.cache_shardings(mesh, TINY.num_layers))):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    assert sharding.split_factor(state.out) == 4


def test_reward_model_of_other_sizes_is_one_clear_line(tmp_path, capsys):
    """--reward-model whose hidden size (or vocabulary) is not the policy's: one line naming the key,
    exit 1, before any compilation, nothing written."""

    bad = dataclasses.replace(TINY, hidden_size=48)
    _reward_run(tmp_path / "rm", bad)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt_ids(*p)}) + "\n" for p in make_prompts(8, 1)))
    out = tmp_path / "out"
    compiles = []

    def listen(name, secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        code = train.main(["--algo", "grpo", "--config", str(ROOT / "configs/grpo_tiny.yaml"),
                           "--reward-model", str(tmp_path / "rm"),
                           f"--set=data.train={prompts}", "--set=data.eval=''", f"--set=train.output_dir={out}",
                           "--set=train.batch_size=2", "--set=grpo.group_size=4"])
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    err = capsys.readouterr().err.strip()
    assert code == 1 and not compiles
    assert len(err.splitlines()) == 1 and "hidden_size (48 vs 32)" in err and "--reward-model" in err, err
    assert not out.exists()
    with pytest.raises(loop.RunError, match=r"vocab_size \(64 vs 128\)"):
        init_from.check_reward_model(tmp_path / "rm", Config(llm=dataclasses.replace(TINY, vocab_size=128,
                                                                                      hidden_size=48)))
