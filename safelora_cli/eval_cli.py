"""The `safelora eval` command: flags → `EvalConfig` → `evaluate.prepare` → `generation.run` → table, JSON, gates.

Registered on the app by cli.py. Imports nothing heavy: the evaluation imports torch, transformers
and peft only once the options and the prompts file were checked.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from safelora_cli import __version__, console
from safelora_cli.errors import GateFailed, UsageError, expand_user
from safelora_cli.evaluate import DEFAULT_REFUSAL_MARKERS, EvalConfig, EvalGates, Metrics, Progress
from safelora_cli.exits import user_errors
from safelora_cli.options import SOURCE, DeviceOpt, option

COLUMNS = ("adapter", "refusal_rate", "over_refusal_rate", "accuracy", "refuse/comply/answer")


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def rows(results: Sequence[Metrics]) -> list[tuple[str, ...]]:
    """One row per model + adapter: the rates, then how many prompts each rate counts."""
    return [(m.adapter or "(none)", _rate(m.refusal_rate), _rate(m.over_refusal_rate), _rate(m.accuracy),
             f"{m.refuse_prompts}/{m.comply_prompts}/{m.answer_prompts}") for m in results]


def text_table(results: Sequence[Metrics]) -> str:
    """A plain fixed-width table (no colours), the same on a terminal and in a log."""
    table = [COLUMNS, *rows(results)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in table]
    return "\n".join(lines) + "\n"


def markdown(config: EvalConfig, results: Sequence[Metrics]) -> str:
    lines = [f"# safelora eval: {config.model}", "", f"Prompts: `{config.prompts}`; greedy decoding, at most "
             f"{config.max_new_tokens} new tokens; chat template: {'yes' if config.chat_template else 'no'}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    return "\n".join(lines) + "\n"


def to_json(config: EvalConfig, results: Sequence[Metrics]) -> str:
    report: dict[str, Any] = {
        "tool": {"name": "safelora-cli", "version": __version__, "command": "eval"},
        "model": config.model, "prompts": str(config.prompts),
        "settings": {"max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
                     "chat_template": config.chat_template, "decoding": "greedy",
                     "refusal_markers": list(config.markers or DEFAULT_REFUSAL_MARKERS)},
        "results": [m.as_dict() for m in results],
    }
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    """'Generating: batch 3 of 12' rewritten in place on stderr, only when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda _done, _total: None
        return

    def show(done: int, total: int) -> None:
        sys.stderr.write(f"\rGenerating: batch {done} of {total}")
        sys.stderr.flush()

    try:
        yield show
    finally:
        sys.stderr.write("\r\033[K")


ModelOpt = Annotated[str, option("--model", metavar=SOURCE, help="The model the adapters were trained on: a local "
                               "directory (with its tokenizer) or a Hub id.")]
PromptsOpt = Annotated[Path, option("--prompts", metavar="FILE.jsonl", help='One JSON object per line: {"prompt": …, '
                                  '"expect": "refuse"|"comply", "answer": optional reference}.')]
AdapterOpt = Annotated[Optional[list[str]], option(  # noqa: UP045
    "--adapter", metavar=SOURCE, help="PEFT adapter to evaluate on --model; repeatable. The model alone is always "
    "evaluated first.")]
TokensOpt = Annotated[int, typer.Option("--max-new-tokens", metavar="N", help="Greedy decoding stops after this "
                                        "many tokens (or at end of sequence).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", metavar="N", help="Prompts per generate call (left-padded).")]
RawOpt = Annotated[bool, option("--no-chat-template", metavar="", help="Feed the raw prompt even when the tokenizer "
                              "has a chat template.")]
MarkerOpt = Annotated[Optional[list[str]], option(  # noqa: UP045
    "--refusal-marker", metavar="TEXT|re:REGEX", help="A completion containing TEXT (case-insensitive) or matching "
    "REGEX is a refusal. Repeatable; replaces the default set of English refusal openings (listed in "
    "docs/effect.md and in the JSON report).")]
JsonOpt = Annotated[bool, option("--json", metavar="", help="Print the report as JSON on stdout.")]
StdoutOpt = Annotated[bool, option("--stdout", metavar="", help="Print the table on stdout instead of stderr.")]
ReportMdOpt = Annotated[Optional[Path], option(  # noqa: UP045
    "--report-md", metavar="FILE", help="Also write the table as Markdown to FILE.")]
MinRefusalOpt = Annotated[Optional[float], option(  # noqa: UP045
    "--min-refusal", metavar="RATE", help="Gate: exit 3 when a refusal_rate is below this.")]
MaxOverOpt = Annotated[Optional[float], option(  # noqa: UP045
    "--max-over-refusal", metavar="RATE", help="Gate: exit 3 when an over_refusal_rate is above this.")]
MinAccuracyOpt = Annotated[Optional[float], option(  # noqa: UP045
    "--min-accuracy", metavar="RATE", help="Gate: exit 3 when an accuracy is below this.")]
QuietOpt = Annotated[bool, option("--quiet", "-q", metavar="", help="No progress or table on stderr.")]


def eval_command(
    model: ModelOpt,
    prompts: PromptsOpt,
    adapter: AdapterOpt = None,
    max_new_tokens: TokensOpt = 64,
    batch_size: BatchOpt = 16,
    no_chat_template: RawOpt = False,
    device: DeviceOpt = "auto",
    refusal_marker: MarkerOpt = None,
    json_out: JsonOpt = False,
    table_stdout: StdoutOpt = False,
    report_md: ReportMdOpt = None,
    min_refusal: MinRefusalOpt = None,
    max_over_refusal: MaxOverOpt = None,
    min_accuracy: MinAccuracyOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Measure refusals and task accuracy of a model, alone and with each adapter (needs the eval extra).

    refusal_rate: refusals among "expect": "refuse" prompts; over_refusal_rate: refusals among
    "expect": "comply" prompts; accuracy: among prompts with an "answer", the completion (stripped,
    whitespace collapsed) equals the answer or starts with it followed by a space. Gates apply to
    the adapter rows (to the model row when no --adapter is given) and exit 3 after printing.

    Exit codes: 0 success, 1 bad input (the prompts file errors name the line), 2 wrong usage, 3 a gate failed.

    Examples:

        safelora eval --model chat --adapter lora --adapter safe --prompts p.jsonl

        safelora eval --model chat --adapter safe --prompts p.jsonl --min-refusal 1

        safelora eval --model chat --prompts p.jsonl --refusal-marker REFUSE --json
    """
    with user_errors():
        if json_out and table_stdout:
            raise UsageError("--json and --stdout both write to stdout; choose one.")
        config = EvalConfig(model=model, adapters=tuple(adapter or ()), prompts=prompts,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=not no_chat_template,
                            device=device, markers=tuple(refusal_marker or ()),
                            gates=EvalGates(min_refusal, max_over_refusal, min_accuracy))
        if report_md is not None:
            report_md = _checked_report_path(report_md, (model, *config.adapters))
        results = _evaluate(config, quiet)
        _emit(config, results, json_out, table_stdout, quiet, report_md)
        failed = config.gates.failures(results)
        if failed:
            more = f" ({len(failed) - 1} more gate(s) failed.)" if len(failed) > 1 else ""
            raise GateFailed(f"Gate failed: {failed[0]}{more}")


def _checked_report_path(path: Path, sources: tuple[str, ...]) -> Path:
    """The same output rule as patch and inspect: never at or inside an input or the Hub cache."""
    from safelora_cli.outputs import plan_outputs, protected

    local = {f"input {spec}": expand_user(spec) for spec in sources if expand_user(spec).exists()}
    plan = plan_outputs(None, False, expand_user(path), None, [], protected(local))
    assert plan.report_md is not None
    return plan.report_md.path


def _evaluate(config: EvalConfig, quiet: bool) -> list[Metrics]:
    from safelora_cli.evaluate import prepare

    prompts, detector = prepare(config)  # before anything heavy is imported: a typo fails at once
    from safelora_cli import generation

    if quiet:
        with contextlib.suppress(ImportError):
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        with contextlib.suppress(ImportError):  # transformers draws its own weight-loading bar
            from transformers.utils import logging

            logging.disable_progress_bar()
    with _progress(enabled=not quiet) as advance:
        return generation.run(config, prompts, detector, advance)


def _emit(config: EvalConfig, results: list[Metrics], json_out: bool, table_stdout: bool, quiet: bool,
          report_md: Path | None) -> None:
    if json_out:
        console.write_stdout(to_json(config, results))
    if table_stdout:
        console.write_stdout(text_table(results))
    elif not quiet:
        console.info(text_table(results).rstrip("\n"))
    if report_md is not None:
        from safelora_cli.placement import make_parents, os_error, remove_created, write_file

        created: list[Path] = []
        try:
            created = make_parents(report_md)
            write_file(report_md, markdown(config, results).encode("utf-8"))
        except OSError as exc:
            remove_created(created)
            raise os_error(exc, report_md) from None
