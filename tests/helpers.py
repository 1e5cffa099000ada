"""Shared test helpers: run the CLI, hash directories, read adapters."""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors import safe_open
from typer.testing import CliRunner

from safelora_cli.cli import app


def run_cli(*args: object):  # type: ignore[no-untyped-def]
    """Invoke `safelora` in-process; stdout and stderr come back separately."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def trio_args(trio) -> list[object]:  # type: ignore[no-untyped-def]
    return ["--base", trio.base, "--aligned", trio.aligned, "--adapter", trio.adapter]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file below `root` (to prove inputs are unchanged)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_adapter(path: Path):  # type: ignore[no-untyped-def]
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
