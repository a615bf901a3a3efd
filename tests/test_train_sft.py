"""The SFT step: sharded == single device, accumulation == one big batch, packing == alone, schedule."""

import jax
import numpy as np
import pytest

from editx_jax import sharding
from editx_jax.config import ConfigError, LLMConfig, MeshConfig, OptimizerConfig
from editx_jax.data import dataset
from editx_jax.data.jsonl import Example
from editx_jax.models import llm
from editx_jax.train import sft
from editx_jax.train import state as st

CFG = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_groups=2, num_layers=2)
OPT = OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0)


def random_batch(rng, a, b, t):
    return {"tokens": rng.randint(4, 512, (a, b, t)).astype(np.int32),
            "targets": rng.randint(4, 512, (a, b, t)).astype(np.int32),
            "weights": (rng.rand(a, b, t) > 0.3).astype(np.float32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (a, b, 1)),
            "segment_ids": np.ones((a, b, t), np.int32)}


def run_steps(mesh_cfg, devices, batch, steps=2):
    mesh = sharding.make_mesh(mesh_cfg, devices)
    tx = st.make_optimizer(OPT, 10)
    state = st.init_llm_state(CFG, tx, st.llm_state_shardings(CFG, tx, mesh), jax.random.key(0))
    step = sft.make_train_step(CFG, tx, mesh)
    losses = []
    for _ in range(steps):
        state, m = step(state, dataset.to_global(batch, mesh))
        losses.append(float(m["loss"]))
    return state, losses, m


def test_sharded_and_accumulated_step_equals_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    batch = random_batch(np.random.RandomState(0), 2, 4, 32)
    # One device, 2 micro-batches of 4 rows (accumulated) ...
    ref_state, ref_losses, _ = run_steps(MeshConfig(1, 1, 1), jax.devices()[:1], batch)
    # ... versus (data 2, fsdp 2, tensor 2), the same 8 rows as one micro-batch.
    flat = {k: v.reshape(1, 8, 32) for k, v in batch.items()}
    state, losses, m = run_steps(MeshConfig(2, 2, 2), jax.devices(), flat)
    q = state["params"]["layers"]["attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
    mu = state["opt_state"][1][0].mu["layers"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding == q.sharding and mu.dtype == np.float32  # moments sharded like their params
    assert int(state["step"]) == 2 and float(m["tokens"]) == batch["weights"].sum()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[1] < losses[0]  # it learned something from the first step
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_state["params"]),
                            jax.tree_util.tree_leaves(state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_packed_examples_get_the_same_loss_as_alone():
    rng = np.random.RandomState(1)
    examples = []
    for n in (7, 12, 5):
        mask = np.zeros(n, bool)
        mask[n // 2:] = True
        examples.append(Example(rng.randint(4, 512, n).astype(np.int32), mask))
    feats = [dataset.example_features(e) for e in examples]
    rows = dataset.pack_rows(feats, length=32, bins=1)
    assert len(rows) == 1 and rows[0]["segment_ids"].max() == 3
    row = rows[0]
    assert (row["positions"][row["segment_ids"] == 0] == -1).all()
    assert list(row["positions"][:6]) == list(range(6))  # the first example, then a restart
    assert row["positions"][6] == 0
    params = llm.init_params(CFG, jax.random.key(0))
    nll_fn = jax.jit(lambda p, b: sft.token_nll(p, CFG, b)[0])
    packed = np.asarray(nll_fn(params, {k: v[None] for k, v in row.items()}))[0]
    for i, f in enumerate(feats, start=1):
        alone = dataset.pad_example(f, 32)
        want = np.asarray(nll_fn(params, {k: v[None] for k, v in alone.items()}))[0]
        n = len(f["tokens"])
        got = packed[row["segment_ids"] == i]
        np.testing.assert_allclose(got, want[:n], atol=1e-5)
        # the loss this example contributes is identical
        np.testing.assert_allclose((got * f["weights"]).sum(), (want[:n] * f["weights"]).sum(), rtol=1e-5)


def test_upstream_preset_and_schedule():
    opt = OptimizerConfig()
    assert (opt.learning_rate, opt.warmup_ratio, opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.clip_norm) == \
        (2e-5, 0.03, 0.9, 0.999, 1e-8, 0.0, 1.0)
    sched = st.lr_schedule(opt, 100)  # HF: warmup = ceil(0.03 * 100) = 3 steps, cosine to 0
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(3)), 2e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(3 + 97 // 2)), 1e-5, rtol=2e-2)
    assert float(sched(100)) < 1e-9
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        OptimizerConfig(schedule="exp")


def test_mesh_that_does_not_divide_the_devices_is_a_clear_error():
    with pytest.raises(ConfigError, match="mesh"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1), jax.devices())


def test_loss_normalisation_switch():
    rng = np.random.RandomState(2)
    batch = random_batch(rng, 2, 4, 16)
    batch["weights"][0, :, 4:] = 0  # micro-batch 0 has far fewer loss tokens than micro-batch 1
    batch["weights"][1, 2:, 9:] = 0  # and within micro-batch 1, rank 1's rows fewer than rank 0's
    tx = st.make_optimizer(OPT, 10)
    state = st.init_state(CFG, tx, jax.random.key(0))

    def objectives(s, b):
        out = [sft.train_step(s, b, cfg=CFG, tx=tx, loss_norm=norm, ranks=r)[1]["objective"]
               for norm, r in (("global_token_mean", 1), ("micro_batch_mean", 1), ("micro_batch_mean", 2))]
        return out, jax.vmap(lambda m: sft.token_nll(s["params"], CFG, m)[0])(b)

    (glob, micro1, micro2), nll = jax.jit(objectives)(state, batch)
    w, nll = batch["weights"], np.asarray(nll)
    np.testing.assert_allclose(glob, (nll * w).sum() / w.sum(), rtol=1e-5)
    mean = lambda x, m: (x * m).sum() / m.sum()  # noqa: E731
    np.testing.assert_allclose(micro1, np.mean([mean(nll[i], w[i]) for i in range(2)]), rtol=1e-5)
    # upstream on 2 ranks: each rank's own micro-batch token mean, / micro-batches, averaged over ranks
    want = np.mean([mean(nll[i, r * 2:(r + 1) * 2], w[i, r * 2:(r + 1) * 2]) for i in range(2) for r in range(2)])
    np.testing.assert_allclose(micro2, want, rtol=1e-5)
    assert abs(float(glob) - float(micro1)) > 1e-4 and abs(float(micro1) - float(micro2)) > 1e-5
