"""The floors stay written down in one shape: README's test command is what CI runs, the linters are
in the dev extra, and README's layout names exactly the floors of the import-layers contract."""

import re
import tomllib

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
README = (ROOT / "README.md").read_text()


def _readme_test_command() -> str:
    (command,) = [line for line in README.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    return command


def test_ci_runs_the_readme_test_command_with_the_linters_first():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in ci
    command = _readme_test_command()
    assert ci[-1] == command
    steps = command.split(" && ")
    assert steps.index("ruff check .") < steps.index("lint-imports") < steps.index("python -m pytest")


def test_linters_are_in_the_dev_extra():
    dev = " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert "ruff>=" in dev and "import-linter>=" in dev
    assert "PLC0415" in PYPROJECT["tool"]["ruff"]["lint"]["select"]


def test_readme_layout_names_every_floor_of_the_contract():
    (contract,) = [c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["name"] == "floors"]
    floors = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    on_disk = {p.stem for p in (ROOT / "editx_jax").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert floors == on_disk
    layout = README.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"^  (\w+)(?:/|\.py) ", layout, re.M))
    assert listed == floors
