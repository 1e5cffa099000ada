"""Resolve what the user passed (--base, --aligned, --adapter) to a local path."""

from __future__ import annotations

from pathlib import Path

from safelora_cli.errors import InputError


def resolve_local(spec: str, label: str) -> Path:
    """A local file or directory; a clear error when it is missing or unreadable."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"The {label} path {spec} does not exist.",
            hint=f"Pass a local directory for --{label}.",
        )
    if path.is_dir():
        try:
            next(iter(path.iterdir()), None)
        except PermissionError:
            raise InputError(f"Permission denied reading the {label} directory {spec}.") from None
        if not any(path.iterdir()):
            raise InputError(f"The {label} directory {spec} is empty.")
    return path
