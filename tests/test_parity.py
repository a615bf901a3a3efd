"""The parity gate: every fixture in tests/fixtures PASSes, and nothing that keeps a fixture from being
compared can pass as a SKIP or kill the gate."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from editx_jax import parity
from conftest import AUDIO, FIXTURES, ROOT, fixture_dirs


@pytest.mark.parametrize("path", fixture_dirs(), ids=lambda p: p.name)
def test_fixture(path):
    result = parity.check_fixture(path)
    print(result.line())
    assert result.status == "PASS", result.line()


def test_every_shipped_component_has_a_runner():
    shipped = {json.loads((d / "manifest.json").read_text())["component"] for d in fixture_dirs()}
    assert len(fixture_dirs()) >= 21 and shipped <= set(parity.RUNNERS)
    assert not shipped & set(parity.NOT_IMPLEMENTED)
    for component in parity.RUNNERS:  # a renamed runner breaks here before a fixture runs
        assert callable(parity.resolve_runner(component)), component


def test_default_fixture_folder_is_the_repositorys():
    # a clone on its own has everything the suite reads: fixtures and audio inside the repository
    assert parity.REPO_FIXTURES == FIXTURES and FIXTURES.is_dir()
    assert AUDIO.is_relative_to(ROOT) and len(list(AUDIO.glob("*.wav"))) == 9


def test_conftest_adds_the_device_count_to_flags_already_set():
    # flags the caller set are kept and the 8 host devices added, so the sharding tests run instead of skipping
    code = "import conftest, jax, os; print(os.environ['XLA_FLAGS'], jax.device_count())"
    env = {**os.environ, "XLA_FLAGS": "--xla_dump_hlo_as_text", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT / "tests", check=True).stdout.split()
    assert out == ["--xla_dump_hlo_as_text", "--xla_force_host_platform_device_count=8", "8"]


# A toy component with a runner in this module, so each way of breaking it can be tried in seconds.
def double(fx):
    return {"y": fx.inputs()["x"] * 2}


def crash(fx):
    raise RuntimeError("boom")


def nothing(fx):
    return {}


def constant(fx):
    return {"y": fx.inputs()["x"]}  # the test writes the expected values into x


def _toy(tmp_path, name="toy", outputs=None, component="toy", x=(1.0, 2.0, 3.0)):
    """A fixture folder whose expected y is 2 * x (or `outputs`, arrays to write as they are)."""
    folder = tmp_path / name
    folder.mkdir()
    x = np.asarray(x, np.float32)
    (folder / "manifest.json").write_text(json.dumps({"component": component, "atol": 1e-6, "rtol": 0.0}))
    np.savez(folder / "inputs.npz", x=x)
    np.savez(folder / "outputs.npz", **({"y": 2 * x} if outputs is None else outputs))
    return folder


def _gate(monkeypatch, capsys, folder, runner):
    monkeypatch.setitem(parity.RUNNERS, "toy", runner)
    status = parity.main([str(folder)])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return status, out[0]


def test_toy_fixture_passes(tmp_path, monkeypatch, capsys):
    # the control for the failures below: the same folder and runner table, nothing broken
    status, line = _gate(monkeypatch, capsys, _toy(tmp_path), f"{__name__}:double")
    assert status == 0 and line.startswith("PASS toy toy max_abs=0")


@pytest.mark.parametrize("runner, detail", [
    ("editx_jax.parity.runners.removed_module:run",
     "runner module editx_jax.parity.runners.removed_module cannot be imported"),
    (f"{__name__}:renamed", f"runner {__name__}:renamed: {__name__} has no function 'renamed'"),
    (f"{__name__}:crash", "error: RuntimeError: boom"),
    (f"{__name__}:nothing", "y: not produced"),
], ids=["removed-module", "renamed-function", "raising-runner", "missing-array"])
def test_broken_runner_fails(tmp_path, monkeypatch, capsys, runner, detail):
    status, line = _gate(monkeypatch, capsys, _toy(tmp_path), runner)
    assert status == 1 and line.startswith("FAIL toy toy ") and detail in line, line


def test_outputs_without_arrays_fail(tmp_path, monkeypatch, capsys):
    status, line = _gate(monkeypatch, capsys, _toy(tmp_path, outputs={}), f"{__name__}:double")
    assert status == 1 and line.startswith("FAIL toy toy ") and "outputs.npz holds no arrays" in line, line


def test_unregistered_component_fails_and_only_the_listed_ones_skip(tmp_path, monkeypatch, capsys):
    folder = _toy(tmp_path, component="mystery_module")
    assert parity.main([str(folder)]) == 1
    assert capsys.readouterr().out.startswith("FAIL toy mystery_module ")
    monkeypatch.setitem(parity.NOT_IMPLEMENTED, "mystery_module", "not in this version")
    assert parity.main([str(folder)]) == 0
    assert capsys.readouterr().out.strip() == "SKIP toy mystery_module not implemented: not in this version"


@pytest.mark.parametrize("want, got, status", [
    ([np.inf, 1.0], [-np.inf, 1.0], "FAIL"),
    ([np.nan, 1.0], [0.0, 1.0], "FAIL"),
    ([0.0, 1.0], [np.nan, 1.0], "FAIL"),
    ([1.0, 1.0], [np.inf, 1.0], "FAIL"),
    ([np.nan, -np.inf, 1.0], [np.nan, -np.inf, 1.0], "PASS"),
], ids=["+inf-vs--inf", "nan-vs-number", "number-vs-nan", "number-vs-inf", "same-nonfinite"])
def test_nonfinite_values(tmp_path, monkeypatch, capsys, want, got, status):
    folder = _toy(tmp_path, outputs={"y": np.asarray(want, np.float32)}, x=got)
    code, line = _gate(monkeypatch, capsys, folder, f"{__name__}:constant")
    assert line.startswith(f"{status} toy toy "), line
    assert code == (status == "FAIL")


def test_a_failing_fixture_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    _toy(tmp_path, name="a_broken", outputs={})
    _toy(tmp_path, name="b_fine")
    monkeypatch.setitem(parity.RUNNERS, "toy", f"{__name__}:double")
    assert parity.main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["FAIL", "a_broken"], ["PASS", "b_fine"]]


def test_counts_come_from_the_manifest():
    # step counts are named in the manifest's call_args; a manifest without them cannot be run
    fx = parity.Fixture.load(FIXTURES / "flow_inference")
    assert fx.call_arg("n_timesteps") == 10
    assert parity.Fixture.load(FIXTURES / "step1_llm_decode").call_arg("max_new_tokens") == 12
    fx.manifest = {k: v for k, v in fx.manifest.items() if k != "call_args"}
    with pytest.raises(parity.GateError, match="no call_args.n_timesteps"):
        fx.call_arg("n_timesteps")


def test_cli_reports_and_exit_status(tmp_path):
    # A copy of a fixture with its expected logits perturbed must FAIL with exit status 1.
    src = FIXTURES / "step1_llm"
    bad = tmp_path / "step1_llm_bad"
    bad.mkdir()
    for name in ("manifest.json", "inputs.npz", "weights.safetensors"):
        (bad / name).write_bytes((src / name).read_bytes())
    with np.load(src / "outputs.npz") as z:
        np.savez(bad / "outputs.npz", logits=z["logits"] + 1e-2)
    proc = subprocess.run([sys.executable, "-m", "editx_jax.parity", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 1
    assert proc.stdout.startswith("FAIL step1_llm_bad step1_llm max_abs=0.01")


def test_cli_rejects_a_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "editx_jax.parity", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 2 and "not a fixture folder" in proc.stderr and "Traceback" not in proc.stderr


def test_no_argument_without_the_repository_fixtures(tmp_path, monkeypatch, capsys):
    # an installed package (not a checkout) has no tests/fixtures: one line, exit 2
    monkeypatch.setattr(parity.gate, "REPO_FIXTURES", tmp_path / "tests" / "fixtures")
    assert parity.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass a fixture folder" in err[0]


def test_no_argument_runs_the_repository_fixtures(tmp_path, monkeypatch, capsys):
    _toy(tmp_path)
    monkeypatch.setattr(parity.gate, "REPO_FIXTURES", tmp_path)
    monkeypatch.setitem(parity.RUNNERS, "toy", f"{__name__}:double")
    assert parity.main([]) == 0
    assert capsys.readouterr().out.startswith("PASS toy toy ")
