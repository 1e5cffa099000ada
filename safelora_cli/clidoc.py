"""Generate docs/cli.md from the Typer app, so the reference never drifts from `--help`.

Run with `python -m safelora_cli.clidoc > docs/cli.md` (`make docs`); a test regenerates it
and fails when the committed file differs.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import typer.main

from safelora_cli.cli import app

HEADER = """# Command reference

Generated from the program itself by `make docs` (`python -m safelora_cli.clidoc`); do not edit by
hand. Every command also answers `--help`. Exit codes: 0 success, 1 bad input or runtime error,
2 wrong usage, 3 a gate failed ([exit codes](exit-codes.md)).
"""

ENVIRONMENT = """## Environment

| variable | effect |
|---|---|
| `HF_TOKEN` | Hub token (also `--token`, or the login saved by `hf auth login`) |
| `HF_ENDPOINT` | the Hub to talk to (a mirror, or a private Hub) |
| `HF_HOME`, `HF_HUB_CACHE` | where the Hugging Face cache lies (adapters, indexes, `config.json`, whole files) |
| `HF_HUB_OFFLINE` | `1`: no request at all; everything must already be cached |
| `SAFELORA_CACHE` | where tensors fetched by range are kept (default `$XDG_CACHE_HOME/safelora`, \
else `~/.cache/safelora`) |
| `SAFELORA_HUB_DOWNLOAD` | `tensors` (default): fetch only the needed tensors of a Hub model; `full`: \
download the shards holding them whole |

See [inputs](inputs.md) for what is downloaded and cached.
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def command_markdown(name: str, command: Any) -> str:
    """One command's section: its docstring, then its options as `--help` shows them."""
    ctx = command.make_context(name, [], resilient_parsing=True)
    lines = [f"## safelora {name}", "", inspect.cleandoc(command.help or ""), "",
             "| option | description |", "|---|---|"]
    for param in command.params:
        record = param.get_help_record(ctx)
        if record is not None:  # hidden options have none
            lines.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole reference: the root options, then each command in the order `--help` lists them."""
    group = typer.main.get_command(app)
    sections = [HEADER, "## safelora", "", inspect.cleandoc(group.help or ""), "",
                "Options: `--version` prints the version; `--help` on any command prints its help.", ""]
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        sections.append(command_markdown(name, command))
    sections.append(ENVIRONMENT)
    return "\n".join(sections)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
