"""Orbax train checkpoints: restore onto another device count, refuse another config, resume after SIGKILL."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _sft_corpus import TINY_LLM, make_records, write_jsonl

import train
from editx_jax import sharding
from editx_jax.config import (
    Config,
    DataConfig,
    LLMConfig,
    MeshConfig,
    OptimizerConfig,
    load_config,
)
from editx_jax.data import dataset, jsonl
from editx_jax.train import loop, runs
from editx_jax.train import state as st

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_groups=2, num_layers=2)


def _iterator():
    tok = jsonl.WordHashTokenizer()
    dcfg = DataConfig(audio_id_base=324, audio_codes=188, max_length=256, prefetch=0)
    examples = [jsonl.encode_record(r, tok, dcfg, 512) for r in make_records(16, 0)]
    return iter(dataset.train_dataset(examples, dcfg, rows=4))


def test_restore_onto_fewer_devices_and_refuse_another_config(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    cfg = Config(checkpoint=Config().checkpoint.__class__(keep=1, async_save=True))
    tx = st.make_optimizer(OptimizerConfig(), 10)
    mesh8 = sharding.make_mesh(MeshConfig(2, 2, 2))
    state = st.init_llm_state(CFG, tx, st.llm_state_shardings(CFG, tx, mesh8), jax.random.key(3))
    it = _iterator()
    next(it)
    mgr = loop.checkpoint_manager(tmp_path / "ckpt", cfg)
    loop.save_checkpoint(mgr, 5, state, it)
    mgr.wait_until_finished()
    want_next = next(it)

    mesh4 = sharding.make_mesh(MeshConfig(1, 2, 2), jax.devices()[:4])
    it4 = _iterator()
    restored = loop.restore_checkpoint(mgr, 5, st.abstract_llm_state(CFG, tx, st.llm_state_shardings(CFG, tx, mesh4)), it4)
    q = restored["params"]["layers"]["attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 4 and tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(next(it4)["tokens"], want_next["tokens"])  # data position restored too

    other = LLMConfig(**{**CFG.__dict__, "hidden_size": 96, "num_heads": 6, "num_groups": 2})
    with pytest.raises(loop.RunError, match="does not match"):
        loop.restore_checkpoint(mgr, 5, st.abstract_llm_state(other, tx, st.llm_state_shardings(other, tx, mesh4)))
    mgr.close()


def _run_cfg(tmp_path, out, extra=()):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(64, 0))
    return ["--config", str(ROOT / "configs/sft_tiny.yaml"), *[f"--set={s}" for s in TINY_LLM],
            f"--set=data.train={train}", f"--set=train.output_dir={out}", "--set=train.steps=8",
            "--set=train.batch_size=4", "--set=train.log_every=1", "--set=checkpoint.every=2",
            "--set=data.max_length=256", "--set=train.progress=false", "--set=mesh.fsdp=2",
            "--set=optimizer.warmup_ratio=0.0", *extra]


def test_existing_run_and_other_config_are_refused(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "4").mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps({"llm": LLMConfig().__dict__}))  # the 3.5B sizes
    args = _run_cfg(tmp_path, out)
    cfg = load_config(args[1], [a.split("=", 1)[1] for a in args[2:]])
    with pytest.raises(loop.RunError, match="--resume"):
        runs.sft.setup(cfg)
    with pytest.raises(loop.RunError, match="another llm config"):
        runs.sft.setup(cfg, resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"]  # nothing written


def _train_main(tmp_path, out, extra, capsys):
    args = _run_cfg(tmp_path, out, ["--set=mesh.fsdp=-1", "--set=train.batch_size=8", *extra])  # this process's 8
    code = train.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_bad_batches_and_unrestorable_resumes_are_one_line(tmp_path, capsys):
    # a global batch that does not divide over the devices: refused before any data or model is read
    out = tmp_path / "odd"
    code, err = _train_main(tmp_path, out, ["--set=train.batch_size=6", "--set=mesh.fsdp=-1"], capsys)
    assert code == 1 and len(err) == 1 and "must divide over data x fsdp = 8 devices" in err[0], err
    assert not out.exists()  # nothing written

    # --resume of another algorithm's run folder
    out = tmp_path / "dpo_run"
    (out / "checkpoints" / "4").mkdir(parents=True)
    cfg = load_config(str(ROOT / "configs/sft_tiny.yaml"), [*TINY_LLM])
    (out / "run_config.json").write_text(json.dumps({"llm": cfg.llm.__dict__, "algo": "dpo"}))
    code, err = _train_main(tmp_path, out, ["--resume"], capsys)
    assert code == 1 and len(err) == 1 and "holds a dpo run, not sft" in err[0], err

    # --resume of a folder whose checkpoint holds another state (no run_config.json to tell): refused
    # at the restore, before any step is compiled, and the folder is left as it was
    out = tmp_path / "other_state"
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    other = {"value": {"params": jax.device_put(np.ones((3, 5), np.float32), sharding.replicated(mesh))}}
    mgr = loop.checkpoint_manager(out / "checkpoints", Config(checkpoint=Config().checkpoint.__class__(async_save=False)))
    loop.save_checkpoint(mgr, 2, other)
    mgr.close()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code, err = _train_main(tmp_path, out, ["--resume"], capsys)
    assert code == 1 and len(err) == 1 and "does not match this model/optimizer" in err[0], err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def _losses(out):
    got = {}
    for row in loop.read_metrics(out):
        if row["split"] == "train":
            got[row["step"]] = row["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
    return got


ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": str(ROOT)}  # this checkout's package, whatever the editable install points at
TRAIN = [sys.executable, str(ROOT / "train.py")]
PAUSED_TRAIN = [sys.executable, str(ROOT / "tests" / "_paused_train.py")]  # train.py with a pause hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run: its losses and final params."""
    tmp = tmp_path_factory.mktemp("ref")
    subprocess.run(TRAIN + _run_cfg(tmp, tmp / "ref"), env=ENV, check=True, capture_output=True, cwd=ROOT, timeout=300)
    want = _losses(tmp / "ref")
    assert sorted(want) == list(range(1, 9))
    return want, loop.restore_run_params(tmp / "ref")


def _resume_and_compare(tmp_path, run, reference, extra=()):
    """Resume the killed run to its end: the same losses and bitwise the same final params."""
    subprocess.run(TRAIN + _run_cfg(tmp_path, run, [*extra, "--resume"]), env=ENV, check=True, capture_output=True,
                   cwd=ROOT, timeout=300)
    want, want_params = reference
    got = _losses(run)
    assert sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(1, 9)] == [want[s] for s in range(1, 9)]  # bitwise, step for step
    got_params = loop.restore_run_params(run)
    assert jax.tree_util.tree_structure(got_params) == jax.tree_util.tree_structure(want_params)
    for a, b in zip(jax.tree_util.tree_leaves(got_params), jax.tree_util.tree_leaves(want_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not any((run / "checkpoints" / loop.TRASH).glob("*"))


def _run_until_paused(tmp_path, run, where, extra=()):
    """Start the run with a pause at `where` (tests/_paused_train.py) and SIGKILL it there."""
    marker = tmp_path / f"paused-{run.name}"
    proc = subprocess.Popen(PAUSED_TRAIN + _run_cfg(tmp_path, run, extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**ENV, "EDITX_PAUSE_AT": where, "EDITX_PAUSE_FILE": str(marker)})
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"the run never reached the pause at {where}"


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_losses_and_params(tmp_path, reference):
    run = tmp_path / "run"
    proc = subprocess.Popen(TRAIN + _run_cfg(tmp_path, run), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and max(_losses(run), default=0) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run))
    assert 5 <= killed_at < 8, "the run finished before it could be killed"
    ckpts = loop.checkpoint_steps(run / "checkpoints")
    assert ckpts and max(ckpts) <= killed_at
    _resume_and_compare(tmp_path, run, reference)


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, reference):
    run = tmp_path / "run"
    _run_until_paused(tmp_path, run, "save:6")
    names = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(n.startswith("6.orbax-checkpoint-tmp") for n in names), names  # killed inside the save of 6
    assert loop.checkpoint_steps(run / "checkpoints") == [2, 4]  # 6 is never offered
    _resume_and_compare(tmp_path, run, reference)
    assert not any("tmp" in p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.slow
def test_sigkill_during_pruning_never_leaves_a_half_deleted_step(tmp_path, reference):
    """keep=1: each save prunes the previous step. Killed while a pruned folder is half deleted: no
    folder under a step's name is incomplete, every listed step restores, start-up empties the trash."""
    run, keep1 = tmp_path / "run", ["--set=checkpoint.keep=1"]
    _run_until_paused(tmp_path, run, "prune", keep1)
    ckpts = run / "checkpoints"
    assert any(p.is_file() for p in (ckpts / loop.TRASH).rglob("*"))  # the half-deleted folder, out of the way
    steps = loop.checkpoint_steps(ckpts)
    assert steps and sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == steps
    cfg = Config(checkpoint=Config().checkpoint.__class__(keep=1))
    tx = st.make_optimizer(OptimizerConfig(), 8)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    target = st.abstract_llm_state(CFG, tx, st.llm_state_shardings(CFG, tx, mesh))
    mgr = loop.checkpoint_manager(ckpts, cfg)  # start-up: the leftover is recognised and removed
    assert not any((ckpts / loop.TRASH).glob("*"))
    for step in steps:
        assert int(loop.restore_checkpoint(mgr, step, target)["step"]) == step
    mgr.close()
    _resume_and_compare(tmp_path, run, reference, keep1)


def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path):
    """Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames when complete: a save killed midway
    leaves such a folder, which is never taken for a checkpoint."""
    cfg = Config(checkpoint=Config().checkpoint.__class__(keep=2, async_save=False))
    tx = st.make_optimizer(OptimizerConfig(), 10)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    state = st.init_llm_state(CFG, tx, st.llm_state_shardings(CFG, tx, mesh), jax.random.key(1))
    mgr = loop.checkpoint_manager(tmp_path / "ckpt", cfg)
    loop.save_checkpoint(mgr, 4, state, _iterator())
    mgr.close()
    partial = tmp_path / "ckpt" / "6.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    (tmp_path / "ckpt" / "8" / "state").mkdir(parents=True)  # a step folder without Orbax's commit metadata
    mgr = loop.checkpoint_manager(tmp_path / "ckpt", cfg)
    assert not partial.exists()  # a killed save's leftover is removed at start-up
    assert loop.checkpoint_steps(tmp_path / "ckpt") == [4] and loop.latest_step(tmp_path / "ckpt") == 4
    restored = loop.restore_checkpoint(mgr, 4, st.abstract_llm_state(CFG, tx, st.llm_state_shardings(CFG, tx, mesh)))
    assert int(restored["step"]) == 0
    np.testing.assert_array_equal(np.asarray(restored["params"]["final_norm"]["scale"]),
                                  np.asarray(state["params"]["final_norm"]["scale"]))
    mgr.close()
