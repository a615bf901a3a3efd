"""Shared test setup: 8 fake CPU devices for the sharding tests, and the in-repo fixture paths."""

import json
import os
import pathlib

# Must be set before jax is imported anywhere: sharding tests need several devices on a CPU host.
# Flags the caller already set are kept; the device count is added to them unless they name one.
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("EDITX_JAX_CACHE", "off")  # no persistent compilation cache: tests stay hermetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # golden fixtures (tests/fixtures/README.md)
AUDIO = ROOT / "tests" / "audio"  # real speech clips the tests read


def pytest_report_header(config):
    # The sharding tests skip below 8 devices; say which flags this run has, so a skip is never a surprise.
    return f"XLA_FLAGS={os.environ['XLA_FLAGS']!r} JAX_PLATFORMS={os.environ['JAX_PLATFORMS']!r}"


def fixture_dirs(component: str | None = None) -> list[pathlib.Path]:
    """Fixture folders in tests/fixtures, optionally only those of one component."""
    dirs = sorted(d for d in FIXTURES.iterdir() if (d / "manifest.json").is_file())
    if component is None:
        return dirs
    return [d for d in dirs if json.loads((d / "manifest.json").read_text())["component"] == component]

