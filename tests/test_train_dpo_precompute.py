"""dpo.precompute_ref: the reference's log-probs of every pair are computed once, before the first step
(counted), kept in the run folder, read back on resume (no reference pass at all), and the run equals
the one that computes the reference inside every step."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from test_train_rl_cli import write_synthetic

from editx_jax.train import dpo, loop
from editx_jax.train.runs import dpo as dpo_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(data, out, steps, *extra, resume=False):
    sys.path.insert(0, str(ROOT))
    import train  # noqa: PLC0415  (the repo-root CLI script, on the path only from here)
    sets = [f"data.train={data['pairs_train']}", f"data.eval={data['pairs_eval']}", f"train.output_dir={out}",
            f"train.steps={steps}", "train.batch_size=8", "train.progress=false", "train.log_every=1",
            "checkpoint.every=2", "mesh.fsdp=-1", "optimizer.schedule=constant", "optimizer.warmup_ratio=0.0",
            *extra]
    return train.main(["--algo", "dpo", "--config", str(ROOT / "configs/dpo_tiny.yaml"),
                       *(["--resume"] if resume else []), *[f"--set={s}" for s in sets]])


def _losses(out):
    return [r["loss"] for r in loop.read_metrics(out) if r["split"] == "train"]


@pytest.mark.slow  # four short CLI runs on 8 fake devices
def test_reference_runs_once_and_a_resume_reads_it_back(tmp_path, monkeypatch):
    data = write_synthetic(tmp_path / "data", n_train=20, n_eval=8)  # 20 train pairs: a partial last batch
    calls = {"passes": 0, "traces": 0}
    make, trace = dpo.make_reference_step, dpo.reference_logps

    def counting_make(*a, **k):
        step = make(*a, **k)

        def run(*args):
            calls["passes"] += 1
            return step(*args)
        return run

    def counting_trace(*a, **k):  # every trace of a reference forward, in any jitted step
        calls["traces"] += 1
        return trace(*a, **k)

    monkeypatch.setattr(dpo, "make_reference_step", counting_make)
    monkeypatch.setattr(dpo, "reference_logps", counting_trace)
    pre = "dpo.precompute_ref=true"

    assert _main(data, tmp_path / "a", 4, pre) == 0
    # one pass per batch of 8 pairs over the whole pair set (3 train + 1 eval), then never again
    assert calls == {"passes": 4, "traces": 1}
    table = np.load(tmp_path / "a" / dpo_run.REF_FILE)
    assert table["train"].shape == (20, 2) and table["held"].shape == (8, 2)
    assert not (tmp_path / "a" / (dpo_run.REF_FILE + ".tmp")).exists()

    assert _main(data, tmp_path / "b", 2, pre) == 0
    calls.update(passes=0, traces=0)
    assert _main(data, tmp_path / "b", 4, pre, resume=True) == 0
    assert calls == {"passes": 0, "traces": 0}  # read back, not recomputed
    a, b = loop.restore_run_params(tmp_path / "a"), loop.restore_run_params(tmp_path / "b")
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")

    # the same run with the reference inside every step: the same losses
    assert _main(data, tmp_path / "c", 4) == 0
    np.testing.assert_allclose(_losses(tmp_path / "c"), _losses(tmp_path / "a"), rtol=1e-5)
    assert not (tmp_path / "c" / dpo_run.REF_FILE).exists()

    # other pairs under a resumed run folder: one clear error, nothing overwritten
    other = write_synthetic(tmp_path / "other", n_train=24, n_eval=8)
    before = (tmp_path / "a" / dpo_run.REF_FILE).read_bytes()
    assert _main(other, tmp_path / "a", 6, pre, resume=True) == 1
    assert (tmp_path / "a" / dpo_run.REF_FILE).read_bytes() == before

