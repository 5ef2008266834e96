"""What every command shares: the usage error, and checks of names, folders and devices."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["UsageError", "Parser", "check_choice", "out_dir", "device", "positive", "first_line"]


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`UsageError` (one line, exit code 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def positive(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_choice(kind: str, names: Sequence[str], valid: Sequence[str]) -> None:
    """Every name is valid, or a usage error that lists the valid ones."""
    for name in names:
        if name not in valid:
            raise UsageError(f"unknown {kind} '{name}'; valid: {', '.join(valid)}")


def check_out(path: Path) -> None:
    """An output folder that exists as a file is a usage error (checked before any work)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} exists and is not a folder")


def out_dir(path: Path) -> Path:
    """Create the output folder; an existing file or an unwritable place is a usage error."""
    check_out(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create output folder {path}: {error.strerror or error}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"output folder {path} is not writable")
    return path


def device(name: str) -> torch.device:
    """The torch device ``name``, if this machine has it."""
    try:
        found = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device '{name}'; use e.g. cpu, cuda or cuda:0") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' is not available: torch sees no CUDA GPU")
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device '{name}' does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{name}' is not available on this machine")
    if found.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device '{name}' is not supported; use cpu, cuda or mps")
    return found
