"""The exception hierarchy. Every error a user can cause is a `SafeLoraError` with a hint.

The CLI turns these into one `Error: …` line (plus a `Hint: …` line) on stderr and an exit
code; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class SafeLoraError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(SafeLoraError):
    """An input path, file or tensor is missing, unreadable or malformed."""


class UnsupportedError(InputError):
    """The input is valid but uses a feature this tool refuses rather than gets wrong."""


class PairingError(InputError):
    """Adapter layers and checkpoint tensors do not correspond."""


class OutputError(SafeLoraError):
    """The output location cannot be used or written."""


class UsageError(SafeLoraError):
    """Options that contradict each other or are out of range (exit code 2, like a CLI usage error)."""

    exit_code = 2


class GateFailed(SafeLoraError):
    """A policy gate failed; the computation itself succeeded and its report was written."""

    exit_code = 3


def format_keys(keys: list[str], limit: int = 5) -> str:
    """Render a list of tensor/module names for a one-line message, eliding the tail."""
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


def expand_user(path: str | os.PathLike[str]) -> Path:
    """`~` and `~user` expanded; an unknown user is the caller's mistake, not a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise UsageError(f"Cannot expand {os.fspath(path)}: no such user's home directory.",
                         hint="Write the path out in full.") from None

