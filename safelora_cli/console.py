"""Everything people read on the terminal. The only module that imports rich.

Data (tables asked for by `inspect`, JSON, CSV, Markdown) goes to stdout; progress, summaries,
warnings and errors go to stderr, so that `safelora … --json > report.json` stays clean.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safelora_cli.errors import OutputError
from safelora_cli.report import (
    Report,
    alignment_line,
    bound_line,
    fmt,
    pdst_line,
    percent,
    projected_line,
    sorted_layers,
    sweep_text,
    to_csv,
    to_json,
)

stderr = Console(stderr=True, highlight=False)


def stdout() -> Console:
    # Created on use so tests that capture sys.stdout see the output.
    return Console(file=sys.stdout, highlight=False)


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (`\\n`, `\\x1e`), and bytes of
    undecodable file names shown as escapes.

    Messages quote file names and library errors, which can hold any character; CI logs and
    callers that read stderr rely on an error being exactly one line.
    """
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error(message: str, hint: str | None = None) -> None:
    """One line on stderr: what is wrong, then what to do about it."""
    stderr.print("[bold red]Error:[/] ", end="", markup=True)
    stderr.print(one_line(f"{message} {hint}" if hint else message), markup=False, highlight=False, soft_wrap=True)


def warning(message: str) -> None:
    stderr.print("[yellow]Warning:[/] ", end="", markup=True)
    stderr.print(one_line(message), markup=False, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    stderr.print(one_line(message), markup=False, soft_wrap=True)


def write_stdout(text: str) -> None:
    """Data on stdout. A reader that went away (`| head`) ends the output quietly; a full disk or a
    closed stdout is one error line."""
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "standard output is closed")
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(f"Cannot write to standard output: {reason}.",
                          hint="Redirect it to a file on a disk with space, or drop --json/--format.") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def emit_json(document: Any) -> None:
    write_stdout(to_json(document))


@contextlib.contextmanager
def layer_progress(enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over weights on stderr, only when stderr is a terminal.

    Yields a callback taking (weights done, weights in all); the total is known only after pairing.
    """
    if not enabled or not stderr.is_terminal:
        yield lambda _done, _total: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("Projecting layers", total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _short_name(row: Any) -> str:
    """The module name without its `….layers.N.` prefix, which the layer column already shows."""
    index = row["layer_index"]
    marker = f".{index}."
    module = row["module"]
    return module.split(marker, 1)[1] if index is not None and marker in module else module


def layer_table(report: Report, sort: str, title: str | None = None) -> Table:
    rows = sorted_layers(report, sort)
    names = [_short_name(row) for row in rows]
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="right")
    # The module column never truncates; the numeric columns are short and give way first.
    table.add_column("module", no_wrap=True, min_width=max(map(len, names), default=6))
    for name in ("cosine", "selected", "alignment cos", "update kept"):
        table.add_column(name, justify="center" if name == "selected" else "right")
    for name, row in zip(names, rows, strict=True):
        cosine = fmt(row["cosine"]) if row["cosine"] is not None else "undefined"
        mark = "[bold green]✓[/]" if row["selected"] else ""
        table.add_row(fmt(row["layer_index"]), name, cosine, mark, fmt(row["alignment_cosine"]),
                      percent(row["update_retained"]))
    return table


def summary_lines(report: Report) -> list[str]:
    s = report["summary"]
    lines = [
        f"{s['selected']} of {s['layers']} layers selected ({_rule_text(report)}); {s['undefined']} undefined.",
        projected_line(report),
        f"cosine min {fmt(s['cosine_min'])}, median {fmt(s['cosine_median'])}, max {fmt(s['cosine_max'])}.",
        sweep_text(report),
        alignment_line(report),
        pdst_line(report),
    ]
    bound = bound_line(report)
    if bound is not None:
        lines.append(bound)
    undefined = [r for r in report["layers"] if r["cosine"] is None]
    if undefined:
        lines.append(f"Undefined: {undefined[0]['module']} — {undefined[0]['undefined_reason']}"
                     + (f" (and {len(undefined) - 1} more)" if len(undefined) > 1 else ""))
    return lines


def _rule_text(report: Report) -> str:
    rule = report["settings"]["selection"]
    return f"cosine ≤ {rule['threshold']}" if rule["rule"] == "threshold" else f"top-k {rule['top_k']}"


def print_table(report: Report, sort: str, to_stderr: bool) -> None:
    """The layer table and the summary: for people on stderr (patch), or as inspect's data on stdout,
    where it goes through `write_stdout` like any other data (a full disk or a closed stdout is an error)."""
    if to_stderr:
        stderr.print(layer_table(report, sort))
        for line in summary_lines(report):
            stderr.print(line, markup=False, soft_wrap=True)
        return
    if sys.stdout is None:
        write_stdout("")  # raises the one-line error for a closed stdout
    terminal = stdout()  # for the width and whether to colour
    buffer = io.StringIO()
    console = Console(file=buffer, width=terminal.width, force_terminal=terminal.is_terminal, highlight=False)
    console.print(layer_table(report, sort))
    for line in summary_lines(report):
        console.print(line, markup=False, soft_wrap=True)
    write_stdout(buffer.getvalue())


def print_report(report: Report, fmt_name: str, sort: str) -> None:
    """`inspect`'s stdout: a table for people, or CSV / Markdown for programs."""
    if fmt_name == "table":
        print_table(report, sort, to_stderr=False)
    elif fmt_name == "csv":
        write_stdout(to_csv(report, sort))
    else:
        from safelora_cli.markdown import to_markdown

        write_stdout(to_markdown(report, sort))
