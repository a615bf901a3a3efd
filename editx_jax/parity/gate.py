"""The parity gate: run our modules on golden fixture folders and compare with the reference outputs.

    python -m editx_jax.parity               # the fixtures shipped in the repository (tests/fixtures)
    python -m editx_jax.parity DIR [DIR ...]

Each DIR is a fixture folder (`manifest.json`, `inputs.npz`, `outputs.npz`, optional
`weights.safetensors`; see tests/fixtures/README.md) or a folder of such folders. For each fixture
the runner registered for its `component` converts the weights with our converter, runs our module and
returns named arrays; every array in `outputs.npz` must be returned and match within the manifest's
atol/rtol (integer and string arrays exactly; NaN and infinities only where the reference has the
same). One line per fixture:

    PASS|FAIL|SKIP <fixture> <component> max_abs=<x> max_rel=<y>

Anything that keeps a fixture from being compared is a FAIL: no runner registered, a runner module
or function that cannot be found, a runner that raises, an `outputs.npz` without arrays, an expected
array not produced. SKIP is only for the components listed in NOT_IMPLEMENTED. Every runner runs with
float32 matmuls (RUNNER_MATMUL_PRECISION), so the verdict does not depend on a backend's default
matmul precision (CPU, GPU or TPU).
The exit status is 1 if any fixture failed, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys
import traceback
from collections.abc import Callable, Mapping

import jax
import numpy as np
from safetensors.numpy import load_file

from editx_jax.config import check_matmul_precision

# The fixtures shipped with the repository; found from the package's own folder, so only a source
# checkout (or an editable install) has them.
REPO_FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"

# component id -> "module:function".
RUNNERS: dict[str, str] = {
    "step1_llm": "editx_jax.parity.runners.llm:run_forward",
    "step1_llm_decode": "editx_jax.parity.runners.llm:run_greedy_decode",
    "audio_preprocess": "editx_jax.parity.runners.audio:run_preprocess",
    "wav_frontend": "editx_jax.parity.runners.frontend:run_wav_frontend",
    "wav_frontend_online": "editx_jax.parity.runners.frontend:run_wav_frontend_online",
    "whisper_logmel128": "editx_jax.parity.runners.frontend:run_whisper_logmel",
    "paraformer_encoder": "editx_jax.parity.runners.paraformer:run_encoder",
    "linguistic_kmeans": "editx_jax.parity.runners.paraformer:run_kmeans",
    "s3tokenizer_v1": "editx_jax.parity.runners.s3tokenizer:run_tokenizer",
    "dual_codebook_interleave": "editx_jax.parity.runners.codebook:run_interleave",
    "dual_codebook_embedding": "editx_jax.parity.runners.decoder_flow_encoder:run_dual_codebook_embedding",
    "upsample_encoder_v2": "editx_jax.parity.runners.decoder_flow_encoder:run_upsample_encoder",
    "dit_estimator": "editx_jax.parity.runners.decoder_flow:run_dit",
    "flow_inference": "editx_jax.parity.runners.decoder_flow:run_flow_inference",
    "mel_24k": "editx_jax.parity.runners.decoder_prompt:run_mel_24k",
    "campplus_fbank": "editx_jax.parity.runners.decoder_prompt:run_campplus_fbank",
    "campplus": "editx_jax.parity.runners.decoder_prompt:run_campplus",
    "hift": "editx_jax.parity.runners.decoder_vocoder:run_hift",
    "bigvgan": "editx_jax.parity.runners.decoder_vocoder:run_bigvgan",
    "token2wav": "editx_jax.parity.runners.decoder_token2wav:run_token2wav",
    "token2wav_hift": "editx_jax.parity.runners.decoder_token2wav:run_token2wav_hift",
}

# Components this version deliberately does not implement (component id -> why). Only these SKIP;
# a component that is neither here nor in RUNNERS FAILs.
NOT_IMPLEMENTED: dict[str, str] = {}

# Every fixture is float32 (weights, inputs and outputs). "highest" keeps GPUs (TF32) and TPUs (bf16
# passes) from rounding matmul operands to ~1e-3 relative, more than most fixtures' rtol.
# Applied around every runner; modules whose configs name a precision default to the same.
RUNNER_MATMUL_PRECISION = "highest"
check_matmul_precision(RUNNER_MATMUL_PRECISION, "parity.RUNNER_MATMUL_PRECISION")


class GateError(Exception):
    """A fixture that cannot be compared (no runner, no expected arrays, ...): reported as FAIL."""


@dataclasses.dataclass
class Fixture:
    """One fixture folder, loaded lazily."""

    path: pathlib.Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def component(self) -> str:
        return self.manifest["component"]

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}

    @property
    def weights_path(self) -> pathlib.Path | None:
        w = self.manifest.get("weights")
        return self.path / w if w else None

    def call_arg(self, name: str):
        """A named argument of the reference call (manifest `call_args`), such as a step count.

        Counts come from here, never from the shape of an expected output or from the `call` text.
        """
        args = self.manifest.get("call_args") or {}
        if name not in args:
            raise GateError(f"manifest.json has no call_args.{name}")
        return args[name]

    def weights(self) -> dict[str, np.ndarray]:
        if self.weights_path is None:
            return {}
        return load_file(str(self.weights_path))

    def inputs(self) -> dict[str, np.ndarray]:
        with np.load(self.path / self.manifest.get("inputs", "inputs.npz"), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def outputs(self) -> dict[str, np.ndarray]:
        with np.load(self.path / self.manifest.get("outputs", "outputs.npz"), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    @classmethod
    def load(cls, path: pathlib.Path) -> Fixture:
        return cls(path=path, manifest=json.loads((path / "manifest.json").read_text()))


@dataclasses.dataclass
class Result:
    fixture: str
    component: str
    status: str  # PASS, FAIL, SKIP
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    detail: str = ""

    def line(self) -> str:
        if self.status == "SKIP":
            return f"SKIP {self.fixture} {self.component} {self.detail}"
        text = f"{self.status} {self.fixture} {self.component} max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g}"
        return text + (f"  ({self.detail})" if self.detail else "")


def find_fixtures(paths: list[str | pathlib.Path]) -> list[pathlib.Path]:
    """Fixture folders named directly, or found one level below the given folders."""
    found = []
    for p in map(pathlib.Path, paths):
        if (p / "manifest.json").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(d for d in p.iterdir() if (d / "manifest.json").is_file()))
        else:
            raise FileNotFoundError(f"not a fixture folder: {p}")
    return found


def resolve_runner(component: str) -> Callable[[Fixture], Mapping]:
    """The registered runner function; GateError when it is not registered or cannot be found."""
    target = RUNNERS.get(component)
    if target is None:
        raise GateError(f"no runner registered for component {component!r}")
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise GateError(f"runner module {module_name} cannot be imported: {e}") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise GateError(f"runner {target}: {module_name} has no function {func_name!r}")
    return func


def _nonfinite_mismatch(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Where NaN or an infinity of one side is not the same NaN / same-signed infinity on the other."""
    either = ~np.isfinite(got) | ~np.isfinite(want)
    same = (np.isnan(got) & np.isnan(want)) | (np.isinf(want) & (got == want))
    return either & ~same


def compare(expected: dict[str, np.ndarray], actual: Mapping, atol: float, rtol: float):
    """(ok, max_abs, max_rel, detail) over all expected arrays."""
    max_abs, max_rel, problems = 0.0, 0.0, []
    for key, want in expected.items():
        if key not in actual:
            problems.append(f"{key}: not produced")
            continue
        got = np.asarray(actual[key])
        if got.shape != want.shape:
            problems.append(f"{key}: shape {got.shape} != {want.shape}")
            continue
        if want.dtype.kind in "iubUS":
            bad = int(np.sum(got != want))
            if want.dtype.kind in "iub":
                diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
                max_abs = max(max_abs, float(diff.max(initial=0.0)))
            if bad:
                problems.append(f"{key}: {bad} of {want.size} values differ")
            continue
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        nonfinite_bad = int(np.sum(_nonfinite_mismatch(got64, want64)))
        if nonfinite_bad:
            problems.append(f"{key}: {nonfinite_bad} of {want.size} NaN/inf values differ")
        finite = np.isfinite(got64) & np.isfinite(want64)  # the others were judged just above
        got64, want64 = np.where(finite, got64, 0.0), np.where(finite, want64, 0.0)
        diff = np.abs(got64 - want64)
        rel = diff / np.maximum(np.abs(want64), 1e-12)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float(rel.max(initial=0.0)))
        n_bad = int(np.sum(diff > atol + rtol * np.abs(want64)))
        if n_bad:
            problems.append(f"{key}: {n_bad} of {want.size} values outside atol={atol} rtol={rtol}")
    return not problems, max_abs, max_rel, "; ".join(problems)


def _run_and_compare(fx: Fixture) -> Result:
    expected = fx.outputs()
    if not expected:
        raise GateError(f"{fx.manifest.get('outputs', 'outputs.npz')} holds no arrays")
    atol, rtol = float(fx.manifest["atol"]), float(fx.manifest["rtol"])
    runner = resolve_runner(fx.component)
    with jax.default_matmul_precision(RUNNER_MATMUL_PRECISION):
        actual = runner(fx)
    if not isinstance(actual, Mapping):
        raise GateError(f"runner returned {type(actual).__name__}, not a mapping of named arrays")
    ok, max_abs, max_rel, detail = compare(expected, actual, atol, rtol)
    return Result(fx.name, fx.component, "PASS" if ok else "FAIL", max_abs, max_rel, detail)


def check_fixture(path: pathlib.Path, verbose: bool = False) -> Result:
    """One fixture's verdict. Never raises for a problem with the fixture or its runner: that is a FAIL."""
    path = pathlib.Path(path)
    component = "?"
    try:
        fx = Fixture.load(path)
        component = fx.component
        if component in NOT_IMPLEMENTED:
            return Result(fx.name, component, "SKIP", detail=f"not implemented: {NOT_IMPLEMENTED[component]}")
        return _run_and_compare(fx)
    except Exception as e:  # noqa: BLE001  (whatever keeps a fixture from being compared is a FAIL line)
        if verbose:
            traceback.print_exc()
        detail = str(e) if isinstance(e, GateError) else f"error: {type(e).__name__}: {e}"
        return Result(path.name, component, "FAIL", detail=detail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editx_jax.parity", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="*", help="fixture folders, or folders that contain them "
                        "(default: the repository's tests/fixtures)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of runner errors")
    args = parser.parse_args(argv)
    if not args.dirs and not REPO_FIXTURES.is_dir():
        print(f"error: no fixture folder given and the repository's fixtures are not at {REPO_FIXTURES} "
              "(an installed package does not ship them): pass a fixture folder", file=sys.stderr)
        return 2
    try:
        paths = find_fixtures(args.dirs or [REPO_FIXTURES])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print("error: no fixture folders found", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        result = check_fixture(path, args.verbose)
        print(result.line(), flush=True)
        failed += result.status == "FAIL"
    return 1 if failed else 0
