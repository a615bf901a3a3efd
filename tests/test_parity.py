"""The parity gate over every golden fixture in ../shared/fixtures."""

import json
import subprocess
import sys

import numpy as np
import pytest

from editx_jax import parity
from conftest import FIXTURES, ROOT, fixture_dirs

# Components this tree must pass; every other fixture must PASS or be an honest SKIP.
REQUIRED = {"step1_llm", "step1_llm_decode"}


@pytest.mark.parametrize("path", fixture_dirs(), ids=lambda p: p.name)
def test_fixture(path):
    result = parity.check_fixture(path)
    print(result.line())
    assert result.status != "FAIL", result.line()
    if result.component in REQUIRED:
        assert result.status == "PASS", result.line()


def test_cli_reports_and_exit_status(tmp_path):
    # A copy of a fixture with its expected logits perturbed must FAIL with exit status 1;
    # an unknown component must SKIP, never PASS.
    src = FIXTURES / "step1_llm"
    bad = tmp_path / "step1_llm_bad"
    bad.mkdir()
    for name in ("manifest.json", "inputs.npz", "weights.safetensors"):
        (bad / name).write_bytes((src / name).read_bytes())
    with np.load(src / "outputs.npz") as z:
        np.savez(bad / "outputs.npz", logits=z["logits"] + 1e-2)
    unknown = tmp_path / "mystery"
    unknown.mkdir()
    (unknown / "manifest.json").write_text(json.dumps({"component": "mystery_module", "atol": 0, "rtol": 0}))
    proc = subprocess.run([sys.executable, "-m", "editx_jax.parity", str(bad), str(unknown)],
                          capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("FAIL step1_llm_bad step1_llm max_abs=0.01")
    assert lines[1] == "SKIP mystery mystery_module not implemented"


def test_cli_rejects_a_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "editx_jax.parity", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "not a fixture folder" in proc.stderr and "Traceback" not in proc.stderr
