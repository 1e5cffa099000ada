"""Everything people read on the terminal. The only module that imports rich.

Data (tables asked for by `inspect`, JSON) goes to stdout; progress, summaries and
errors go to stderr, so that `safelora … --json > report.json` stays clean.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safelora_cli.report import fmt, sorted_layers

stderr = Console(stderr=True, highlight=False)


def stdout() -> Console:
    # Created on use so tests that capture sys.stdout see the output.
    return Console(file=sys.stdout, highlight=False)


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (`\\n`, `\\x1e`).

    Messages quote file names and library errors, which can hold any character; CI logs and
    callers that read stderr rely on an error being exactly one line.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error(message: str, hint: str | None = None) -> None:
    """One line on stderr: what is wrong, then what to do about it."""
    stderr.print("[bold red]Error:[/] ", end="", markup=True)
    stderr.print(one_line(f"{message} {hint}" if hint else message), markup=False, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    stderr.print(message, markup=False, soft_wrap=True)


@contextlib.contextmanager
def layer_progress(enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over layers on stderr, only when stderr is a terminal.

    Yields a callback taking (layers done, layers in all); the total is known only after pairing.
    """
    if not enabled or not stderr.is_terminal:
        yield lambda _done, _total: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("Projecting layers", total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def layer_table(report: dict[str, Any], sort: str, title: str | None = None) -> Table:
    rows = sorted_layers(report, sort)
    names = [_short_name(row) for row in rows]
    table = Table(title=title, title_justify="left")
    # The module column never truncates; the numeric columns are short and give way first.
    table.add_column("module", no_wrap=True, min_width=max(map(len, names), default=6))
    for name in ("layer", "r", "cosine", "select", "‖V‖", "‖ΔW‖", "‖ΔW−CΔW‖"):
        table.add_column(name, justify="center" if name == "select" else "right")
    for name, row in zip(names, rows, strict=True):
        cosine = fmt(row["cosine"]) if row["cosine"] is not None else "undefined"
        mark = "[bold green]✓[/]" if row["selected"] else ""
        table.add_row(name, fmt(row["layer_index"]), str(row["rank"]), cosine, mark,
                      fmt(row["v_norm"]), fmt(row["delta_norm"]), fmt(row["residual_norm"]))
    return table


def _short_name(row: dict[str, Any]) -> str:
    """The module name without its `….layers.N.` prefix, which the layer column already shows."""
    index = row["layer_index"]
    marker = f".{index}."
    module = row["module"]
    return module.split(marker, 1)[1] if index is not None and marker in module else module


def summary_lines(report: dict[str, Any]) -> list[str]:
    s = report["summary"]
    lines = [
        f"{s['selected']} of {s['layers']} layers selected ({_rule_text(report)}); {s['undefined']} undefined.",
        f"cosine min {fmt(s['cosine_min'])}, median {fmt(s['cosine_median'])}, max {fmt(s['cosine_max'])}; "
        f"Pdst {fmt(s['pdst'])}.",
    ]
    undefined = [r for r in report["layers"] if r["cosine"] is None]
    if undefined:
        lines.append(f"Undefined: {undefined[0]['module']} — {undefined[0]['undefined_reason']}"
                     + (f" (and {len(undefined) - 1} more)" if len(undefined) > 1 else ""))
    return lines


def _rule_text(report: dict[str, Any]) -> str:
    rule = report["settings"]["selection"]
    return f"cosine ≤ {rule['threshold']}" if rule["rule"] == "threshold" else f"top-k {rule['top_k']}"


def print_table(report: dict[str, Any], sort: str, to_stderr: bool) -> None:
    console = stderr if to_stderr else stdout()
    console.print(layer_table(report, sort))
    for line in summary_lines(report):
        console.print(line, markup=False, soft_wrap=True)
