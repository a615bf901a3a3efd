"""Shared test setup: 8 fake CPU devices for the sharding tests, and the fixture paths."""

import os
import pathlib

# Must be set before jax is imported anywhere: sharding tests need several devices on a CPU host.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
AUDIO = SHARED / "audio"


def fixture_dirs(component: str | None = None) -> list[pathlib.Path]:
    """Fixture folders in ../shared/fixtures, optionally only those of one component."""
    import json
    dirs = sorted(d for d in FIXTURES.iterdir() if (d / "manifest.json").is_file())
    if component is None:
        return dirs
    return [d for d in dirs if json.loads((d / "manifest.json").read_text())["component"] == component]


@pytest.fixture(scope="session")
def fixtures_root() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"golden fixtures not found at {FIXTURES} (they sit beside the project root)")
    return FIXTURES
