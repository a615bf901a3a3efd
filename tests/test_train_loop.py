"""The one loop (train/loop.py) on a toy Run: logging, checkpoints, resume, data exhaustion, guards;
and train.py's table of wiring files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from editx_jax.config import Config
from editx_jax.train import loop


def _cfg(out, steps, **train_kw):
    cfg = Config()
    tc = cfg.train.__class__(**{**cfg.train.__dict__, "output_dir": str(out), "steps": steps, "log_every": 1,
                                "progress": False, "eval_every": 0, **train_kw})
    ck = cfg.checkpoint.__class__(**{**cfg.checkpoint.__dict__, "every": 2, "async_save": False})
    return Config(**{**cfg.__dict__, "train": tc, "checkpoint": ck})


def _toy(stop_after=None):
    def step_fn(state, step):
        if stop_after is not None and step >= stop_after:
            raise StopIteration
        return {"x": state["x"] + 1.0}, {"x": state["x"].sum()}
    return loop.Run("toy", {"x": jnp.zeros(3)}, step_fn, evaluate=lambda s: {"x": float(s["x"][0])})


def test_steps_checkpoints_resume_and_guards(tmp_path):
    out = tmp_path / "run"
    got = loop.run(_cfg(out, 3), _toy(), log=lambda *a: None)
    np.testing.assert_array_equal(np.asarray(got["state"]["x"]), [3.0, 3.0, 3.0])
    assert [r["step"] for r in got["train"]] == [1, 2, 3] and "seconds_per_step" in got["train"][0]
    assert [r["step"] for r in got["eval"]] == [0, 3]
    with pytest.raises(loop.RunError, match="--resume"):
        loop.run(_cfg(out, 5), _toy())
    with pytest.raises(loop.RunError, match="holds a toy run, not other"):
        loop.run(_cfg(out, 5), loop.Run("other", {"x": jnp.zeros(3)}, _toy().step_fn), resume=True)
    got = loop.run(_cfg(out, 5), _toy(), resume=True, log=lambda *a: None)  # restores step 3, runs 3 -> 5
    np.testing.assert_array_equal(np.asarray(got["state"]["x"]), [5.0, 5.0, 5.0])
    assert [r["step"] for r in got["train"]] == [4, 5]


def test_data_exhaustion_saves_and_stops(tmp_path):
    out = tmp_path / "run"
    got = loop.run(_cfg(out, 10), _toy(stop_after=3), log=lambda *a: None)
    assert [r["step"] for r in got["train"]] == [1, 2, 3]
    assert [r["step"] for r in got["eval"]] == [0, 3]  # the end of the data is evaluated too
    assert loop.latest_step(out / "checkpoints") == 3
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"x": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=one)}
    with pytest.raises(loop.RunError, match="no checkpoint to resume from"):
        loop.run(_cfg(tmp_path / "empty", 2), loop.Run("toy", abstract, _toy().step_fn), resume=True)


def test_every_algo_has_a_wiring_file():
    assert set(train.RUNS) == {"sft", "reward", "dpo", "grpo", "ppo"}
    assert all(f.__module__ == f"editx_jax.train.runs.{name}" for name, f in train.RUNS.items())
