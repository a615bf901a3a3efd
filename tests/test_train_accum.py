"""Micro-batching of the reward model, DPO, GRPO and PPO: train.grad_accum (a scan of micro-batches
inside the jitted step) and train.micro_batch (the no-grad passes a micro-batch at a time) give the
unsplit step's loss, metrics and updated params; sizes that do not split are one clear line."""

import pathlib
import sys

import jax
import numpy as np
import optax
import pytest
from _rl_corpus import TINY, make_pairs

from editx_jax import sharding
from editx_jax.config import DPOConfig, GRPOConfig, MeshConfig, PPOConfig, RewardConfig
from editx_jax.models import llm
from editx_jax.models import reward as rm
from editx_jax.train import batches, dpo, grpo, micro, ppo, reward
from editx_jax.train import state as st
from editx_jax.train.jit import sharded_step

# plain SGD: the update is linear in the gradient, so comparing updated params compares gradients
# (AdamW's first step is about lr x sign(g), which hides gradient errors and amplifies noise near 0)
TX = optax.sgd(0.5)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mesh():
    if jax.device_count() < 4:
        pytest.skip("needs 4 fake devices")
    return sharding.make_mesh(MeshConfig(1, 4, 1), jax.devices()[:4])


def _same(a, b, rtol=1e-5, atol=1e-6):
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _data(n=8):
    P, C, R = make_pairs(n, 5)  # sources of 3-6 units: micro-batches with different token counts
    return P, C, R


def test_micro_split_merge_keeps_pairs_and_inverts():
    x = np.arange(16 * 3).reshape(16, 3)
    parts = np.asarray(micro.split(x, 2, group=2))
    assert parts.shape == (2, 8, 3)
    assert parts[0, :4, 0].tolist() == [0, 3, 12, 15]  # pairs (0, 1) and (4, 5) in micro-batch 0
    np.testing.assert_array_equal(np.asarray(micro.merge(parts, group=2)), x)
    np.testing.assert_array_equal(np.asarray(micro.merge(micro.split(x, 4))), x)


def test_reward_step_accumulated_equals_unaccumulated():
    mesh = _mesh()
    P, C, R = _data()
    b = reward.make_batch(P, C, R, margins=np.linspace(0, 1, 8), length=24)
    rmp = rm.from_llm_params(llm.init_params(TINY, jax.random.key(0)))
    rcfg = RewardConfig(use_margin=True, center_coef=0.01)
    sh = reward.shardings(TINY, TX, mesh)
    out = []
    for accum in (1, 2):
        s, m = reward.make_train_step(TINY, rcfg, TX, mesh, sh, grad_accum=accum)(st.create_state(rmp, TX, sh), b)
        out.append((s["params"], m))
    _same(out[0], out[1])


@pytest.mark.slow  # several step compilations on 4 fake devices
def test_dpo_step_accumulated_and_micro_batched_equals_unaccumulated():
    mesh = _mesh()
    P, C, R = _data()
    b = dpo.make_batch(P, C, R, length=24)
    pol, ref = llm.init_params(TINY, jax.random.key(0)), llm.init_params(TINY, jax.random.key(1))
    sh = st.llm_state_shardings(TINY, TX, mesh)
    ref_placed = sharding.place(ref, sh["params"])
    out = []
    for accum, rows in ((1, 0), (2, 4), (4, 8)):
        step = dpo.make_train_step(TINY, DPOConfig(), TX, mesh, sh, grad_accum=accum, micro_batch=rows)
        s, m = step(st.create_state(pol, TX, sh), ref_placed, b)
        out.append((s["params"], m))
    # the reference pass a micro-batch at a time, and the precomputed log-probs the steps then read
    whole = dpo.make_reference_step(TINY, TX, mesh, sh)(ref_placed, b)
    split = dpo.make_reference_step(TINY, TX, mesh, sh, micro_batch=4)(ref_placed, b)
    _same(whole, split)
    s, m = dpo.make_train_step(TINY, DPOConfig(), TX, mesh, sh, grad_accum=2)(
        st.create_state(pol, TX, sh), ref_placed, {**b, "ref_logps": np.asarray(whole)})
    out.append((s["params"], m))
    for got in out[1:]:
        _same(out[0], got)


def _grpo_batch():
    P, C, R = _data()
    gb = batches.sequence_batch(P + P, C + R, length=24)
    gb = {k: gb[k] for k in grpo.INPUT_KEYS}
    gb["advantages"] = np.linspace(-1, 1, 16).astype(np.float32)
    return gb


@pytest.mark.slow  # several step compilations on 4 fake devices
def test_grpo_step_accumulated_uses_the_global_token_count():
    mesh = _mesh()
    gb = _grpo_batch()
    pol, ref = llm.init_params(TINY, jax.random.key(0)), llm.init_params(TINY, jax.random.key(1))
    gcfg = GRPOConfig(group_size=4)
    sh = st.llm_state_shardings(TINY, TX, mesh)
    ref_placed = sharding.place(ref, sh["params"])
    whole = grpo.make_ref_step(TINY, gcfg, TX, mesh, sh)(ref_placed, gb)
    split = grpo.make_ref_step(TINY, gcfg, TX, mesh, sh, micro_batch=4)(ref_placed, gb)
    _same(whole, split)
    gb["ref_logps"] = np.asarray(whole)
    # the micro-batches' token counts differ, so a mean of per-micro-batch token means would not match
    counts = np.asarray(micro.split(gb["action_mask"], 2)).sum(axis=(1, 2))
    assert counts[0] != counts[1]
    out = []
    for accum in (1, 2, 4):
        s, m = grpo.make_train_step(TINY, gcfg, TX, mesh, sh, grad_accum=accum)(st.create_state(pol, TX, sh), gb)
        out.append((s["params"], m))
    for got in out[1:]:
        _same(out[0], got)


@pytest.mark.slow  # several step compilations on 4 fake devices
def test_ppo_sides_and_steps_accumulated_equal_unaccumulated():
    mesh = _mesh()
    P, C, R = _data()
    pb = batches.sequence_batch(P + P, C + R, length=24)
    pb = {k: pb[k] for k in ppo.INPUT_KEYS}
    pol, ref = llm.init_params(TINY, jax.random.key(0)), llm.init_params(TINY, jax.random.key(1))
    val = jax.tree_util.tree_map(lambda x: x + 0.01, rm.from_llm_params(pol))
    pcfg = PPOConfig(kl_beta=0.05)
    lsh, vsh = st.llm_state_shardings(TINY, TX, mesh), ppo.value_shardings(TINY, TX, mesh)
    rep = sharding.replicated(mesh)
    pol_p, ref_p, val_p = (sharding.place(p, s) for p, s in ((pol, lsh["params"]), (ref, lsh["params"]),
                                                              (val, vsh["params"])))
    sides = []
    for rows in (0, 4):
        ps = sharded_step(lambda a, b, c: ppo.policy_side(a, b, c, cfg=TINY, pcfg=pcfg, micro_batch=rows), mesh,
                          (lsh["params"], lsh["params"]), rep)(pol_p, ref_p, pb)
        cs = sharded_step(lambda a, c: ppo.critic_side(a, c, cfg=TINY, micro_batch=rows), mesh, (vsh["params"],),
                          rep)(val_p, pb)
        sides.append((ps, cs))
    _same(sides[0], sides[1])
    (ps, cs) = jax.device_get(sides[0])
    pb["scores"] = np.linspace(0, 1, 16).astype(np.float32)
    prepared, _ = jax.jit(lambda b: ppo.advantages(b, pcfg=pcfg))({**pb, **ps, "values": cs})
    mb = {**{k: pb[k] for k in ppo.INPUT_KEYS}, **{k: np.asarray(v) for k, v in jax.device_get(prepared).items()}}
    mb["old_logps"] = mb["old_logps"] - 0.05 * mb["action_mask"]  # ratios != 1: clipping and approx_kl count
    out = []
    for accum in (1, 2):
        v, mv = sharded_step(lambda s_, b: ppo.value_step(s_, b, cfg=TINY, pcfg=pcfg, tx=TX, grad_accum=accum), mesh,
                             (vsh,), (vsh, rep))(st.create_state(val, TX, vsh), mb)
        p, mp = sharded_step(lambda s_, b: ppo.policy_step(s_, b, cfg=TINY, pcfg=pcfg, tx=TX, grad_accum=accum), mesh,
                             (lsh,), (lsh, rep))(st.create_state(pol, TX, lsh), mb)
        out.append((v["params"], mv, p["params"], mp))
    assert set(out[0][1]) == {"value_loss", "value_clip_fraction", "explained_variance", "value_grad_norm"}
    _same(out[0], out[1])


def test_sizes_that_do_not_split_are_one_clear_line():
    with pytest.raises(micro.MicroBatchError, match="train.grad_accum 3: the 8 pairs of train.batch_size"):
        micro.check_run(16, 3, 16, 0, 1, "train.batch_size", group=2)
    with pytest.raises(micro.MicroBatchError, match="divide over data x fsdp = 8"):
        micro.check_run(16, 4, 16, 0, 8, "train.batch_size x grpo.group_size")
    with pytest.raises(micro.MicroBatchError, match="train.micro_batch 6"):
        micro.check_run(16, 1, 16, 6, 2, "x")
    micro.check_run(16, 2, 16, 8, 4, "x", group=2)  # fits: 4 pairs per micro-batch, 8 rows per no-grad pass


def test_cli_refuses_a_grad_accum_that_does_not_split_before_compiling(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train  # noqa: PLC0415  (the repo-root CLI script, on the path only from here)
    args = ["--set=train.progress=false", "--set=mesh.fsdp=-1", f"--set=train.output_dir={tmp_path / 'run'}",
            "--set=data.train=missing.jsonl"]
    # grpo: 2 prompts x 4 samples = 8 rows in 2 micro-batches of 4 rows: not over 8 devices
    assert train.main(["--algo", "grpo", "--config", str(ROOT / "configs/grpo_tiny.yaml"), *args, "--set=train.batch_size=2",
                       "--set=grpo.group_size=4", "--set=train.grad_accum=2"]) == 1
    assert "train.grad_accum 2" in capsys.readouterr().err
    # ppo: a minibatch of 4 rows in 4 micro-batches of 1 row: not over 8 devices
    assert train.main(["--algo", "ppo", "--config", str(ROOT / "configs/ppo_tiny.yaml"), *args, "--set=train.batch_size=8",
                       "--set=ppo.minibatches=2", "--set=train.grad_accum=4"]) == 1
    assert "train.grad_accum 4" in capsys.readouterr().err
    # dpo: micro_batch rows that do not divide the batch
    assert train.main(["--algo", "dpo", "--config", str(ROOT / "configs/dpo_tiny.yaml"), *args, "--set=train.batch_size=8",
                       "--set=train.micro_batch=12"]) == 1
    err = capsys.readouterr().err
    assert "train.micro_batch 12" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
