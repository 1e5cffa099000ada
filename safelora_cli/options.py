"""Option declarations the commands share: how a user types a model or adapter, and the device."""

from __future__ import annotations

from typing import Annotated, Any

import typer

SOURCE = "PATH|ORG/NAME[@REV]"


def option(*names: str, help: str, metavar: str | None = None) -> Any:  # noqa: A002 - typer's own keyword
    """A typer option with no default shown (the help says it where it matters)."""
    return typer.Option(*names, help=help, metavar=metavar, show_default=False)


DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (GPU when present), cpu, cuda or "
                                        "cuda:N.")]
