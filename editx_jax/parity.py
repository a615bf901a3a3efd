"""The parity gate: run our modules on golden fixture folders and compare with the reference outputs.

    python -m editx_jax.parity DIR [DIR ...]

Each DIR is a fixture folder (`manifest.json`, `inputs.npz`, `outputs.npz`, optional
`weights.safetensors`; see shared/fixtures/FORMAT.md) or a folder of such folders. For each fixture
the runner registered for its `component` converts the weights with our converter, runs our module and
returns named arrays; every array in `outputs.npz` must be returned and match within the manifest's
atol/rtol (integer arrays exactly). One line per fixture:

    PASS|FAIL|SKIP <fixture> <component> max_abs=<x> max_rel=<y>

The exit status is 1 if any fixture failed (a SKIP is not a failure, and never a PASS).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import pathlib
import sys
import traceback
from typing import Callable

import numpy as np

# component id -> "module:function". A component whose module does not exist yet is reported as
# SKIP ... not implemented; once the module exists, any error in it is a FAIL.
RUNNERS: dict[str, str] = {
    "step1_llm": "editx_jax.fixture_runners.llm:run_forward",
    "step1_llm_decode": "editx_jax.fixture_runners.llm:run_greedy_decode",
    "audio_preprocess": "editx_jax.fixture_runners.audio:run_preprocess",
    "wav_frontend": "editx_jax.fixture_runners.frontend:run_wav_frontend",
    "wav_frontend_online": "editx_jax.fixture_runners.frontend:run_wav_frontend_online",
    "whisper_logmel128": "editx_jax.fixture_runners.frontend:run_whisper_logmel",
    "paraformer_encoder": "editx_jax.fixture_runners.paraformer:run_encoder",
    "linguistic_kmeans": "editx_jax.fixture_runners.paraformer:run_kmeans",
    "s3tokenizer_v1": "editx_jax.fixture_runners.s3tokenizer:run_tokenizer",
    "dual_codebook_interleave": "editx_jax.fixture_runners.codebook:run_interleave",
    "dual_codebook_embedding": "editx_jax.fixture_runners.decoder_flow_encoder:run_dual_codebook_embedding",
    "upsample_encoder_v2": "editx_jax.fixture_runners.decoder_flow_encoder:run_upsample_encoder",
    "dit_estimator": "editx_jax.fixture_runners.decoder_flow:run_dit",
    "flow_inference": "editx_jax.fixture_runners.decoder_flow:run_flow_inference",
    "mel_24k": "editx_jax.fixture_runners.decoder_prompt:run_mel_24k",
    "campplus_fbank": "editx_jax.fixture_runners.decoder_prompt:run_campplus_fbank",
    "campplus": "editx_jax.fixture_runners.decoder_prompt:run_campplus",
    "hift": "editx_jax.fixture_runners.decoder_vocoder:run_hift",
    "bigvgan": "editx_jax.fixture_runners.decoder_vocoder:run_bigvgan",
    "token2wav": "editx_jax.fixture_runners.decoder_token2wav:run_token2wav",
    "token2wav_hift": "editx_jax.fixture_runners.decoder_token2wav:run_token2wav_hift",
}


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

    def weights(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file
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
    def load(cls, path: pathlib.Path) -> "Fixture":
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


def resolve_runner(component: str) -> Callable[[Fixture], dict] | None:
    target = RUNNERS.get(component)
    if target is None:
        return None
    module_name, func_name = target.split(":")
    if importlib.util.find_spec(module_name) is None:
        return None
    return getattr(importlib.import_module(module_name), func_name)


def compare(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], atol: float, rtol: float):
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
        if want.dtype.kind in "iub" or want.dtype.kind in "US":
            bad = int(np.sum(got != want))
            if want.dtype.kind in "iub":
                diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
                max_abs = max(max_abs, float(diff.max(initial=0.0)))
            if bad:
                problems.append(f"{key}: {bad} of {want.size} values differ")
            continue
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        diff = np.abs(got64 - want64)
        if not np.all(np.isfinite(got64) == np.isfinite(want64)):
            problems.append(f"{key}: non-finite values differ")
        diff = np.where(np.isfinite(diff), diff, 0.0)
        rel = diff / np.maximum(np.abs(want64), 1e-12)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float(rel.max(initial=0.0)))
        n_bad = int(np.sum(diff > atol + rtol * np.abs(want64)))
        if n_bad:
            problems.append(f"{key}: {n_bad} of {want.size} values outside atol={atol} rtol={rtol}")
    return not problems, max_abs, max_rel, "; ".join(problems)


def check_fixture(path: pathlib.Path, verbose: bool = False) -> Result:
    fx = Fixture.load(path)
    runner = resolve_runner(fx.component)
    if runner is None:
        return Result(fx.name, fx.component, "SKIP", detail="not implemented")
    try:
        actual = runner(fx)
    except Exception as e:  # a runner that crashes is a failing fixture, reported in one line
        if verbose:
            traceback.print_exc()
        return Result(fx.name, fx.component, "FAIL", detail=f"error: {type(e).__name__}: {e}")
    ok, max_abs, max_rel, detail = compare(fx.outputs(), actual, float(fx.manifest["atol"]),
                                           float(fx.manifest["rtol"]))
    return Result(fx.name, fx.component, "PASS" if ok else "FAIL", max_abs, max_rel, detail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editx_jax.parity", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="fixture folders, or folders that contain them")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of runner errors")
    args = parser.parse_args(argv)
    try:
        paths = find_fixtures(args.dirs)
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


if __name__ == "__main__":
    sys.exit(main())
