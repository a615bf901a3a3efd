"""User-input checks shared by the command lines (infer.py, train.py, tools/).

Each check raises `UsageError` (one line naming the argument) and runs right after argument
parsing, before any model loads, so a typo costs a second and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import pathlib


class UsageError(ValueError):
    """A command-line argument that cannot work; the message names it."""


def error_line(e: BaseException) -> str:
    """An exception as one line for an `error: ...` message: its type and the first line of its text."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, `--temperature abc`, a missing argument) are one
    `error: ...` line with exit status 2, not the usage block; --help still shows everything.
    Subparsers made by `add_subparsers` inherit the class."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create(target: pathlib.Path, what: str) -> None:
    """`target` (missing, or an existing folder) can be created / written into."""
    base = _nearest_existing(target)
    if not base.is_dir():
        raise UsageError(f"{what} {target}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {target}: folder {base} is not writable")


def check_output_file(path, what: str = "--out") -> pathlib.Path:
    """A file the command will write: not a folder, and its folder exists or can be made, writable."""
    path = pathlib.Path(path)
    if path.is_dir() or str(path).endswith(("/", os.sep)):
        raise UsageError(f"{what} {path} is a folder; give the file to write")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path} is not writable")
    _check_can_create(path.parent, what)
    return path


def check_output_dir(path, what: str) -> pathlib.Path:
    """A folder the command will write into: not a file, existing or creatable, writable."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder")
    _check_can_create(path, what)
    return path


def check_seed(seed: int, what: str = "--seed") -> int:
    """Seeds are unsigned 32-bit integers (what jax.random.key takes on every backend)."""
    if not 0 <= seed < 2**32:
        raise UsageError(f"{what} must be an integer in [0, 2^32), got {seed}")
    return seed

