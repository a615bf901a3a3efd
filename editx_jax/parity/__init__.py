"""The parity gate: our modules on golden fixture folders against the reference outputs.

`gate.py` holds the gate (fixture loading, comparison, the runner registry, the CLI's `main`);
`runners/` one runner per fixture component; `python -m editx_jax.parity` runs it. The gate lives in
`gate.py` rather than `__main__.py` so that importing the package (tests, `check_fixture`) and
running it as a module never execute the same file twice.
"""

from editx_jax.parity.gate import (NOT_IMPLEMENTED, REPO_FIXTURES, RUNNER_MATMUL_PRECISION, RUNNERS, Fixture,
                                   GateError, Result, check_fixture, compare, find_fixtures, main,
                                   resolve_runner)

__all__ = ["NOT_IMPLEMENTED", "REPO_FIXTURES", "RUNNER_MATMUL_PRECISION", "RUNNERS", "Fixture", "GateError",
           "Result", "check_fixture", "compare", "find_fixtures", "main", "resolve_runner"]
