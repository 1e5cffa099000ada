"""The `safelora` command line: flags → a frozen `RunConfig` → one pipeline call.

Kept free of torch at import time so that `--help` and `--version` answer at once; the
pipeline is imported inside the commands.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from safelora_cli import __version__, console
from safelora_cli.config import DEFAULT_THRESHOLD, Projection, ProjectionSettings, RunConfig, SelectionRule, SvdMethod
from safelora_cli.errors import GateFailed, SafeLoraError, UsageError
from safelora_cli.gates import Gates, parse_selected_limit

app = typer.Typer(
    name="safelora",
    help="Safe LoRA for PEFT adapters: project the layers of a fine-tuned LoRA that drifted from the "
    "aligned model back onto the alignment subspace. No data, no training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class OutputFormat(str, Enum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"
    MARKDOWN = "markdown"


class SortKey(str, Enum):
    LAYER = "layer"
    COSINE = "cosine"
    MODULE = "module"


# Options shared by both commands, declared once.
BaseOpt = Annotated[str, typer.Option("--base", help="Base (unaligned) model, e.g. Llama-2-7b: a local directory "
                                      "(safetensors or .bin, single or sharded) or a Hub id org/name[@revision].",
                                      show_default=False)]
AlignedOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--aligned", help="Safety-aligned model the adapter was trained on, e.g. Llama-2-7b-chat: a directory or a Hub "
    "id. Default: the adapter config's base_model_name_or_path (and revision).", show_default=False)]
AdapterOpt = Annotated[str, typer.Option("--adapter", help="PEFT LoRA adapter: a directory (adapter_config.json + "
                                         "adapter_model.safetensors or .bin) or a Hub id org/name[@revision].",
                                         show_default=False)]
BaseRevisionOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--base-revision", help="Hub branch, tag or commit of --base (default: the main branch).", show_default=False)]
AlignedRevisionOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--aligned-revision", help="Hub branch, tag or commit of --aligned.", show_default=False)]
AdapterRevisionOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--adapter-revision", help="Hub branch, tag or commit of --adapter.", show_default=False)]
TokenOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--token", help="Hugging Face token for private or gated repositories. Default: HF_TOKEN, or the token saved by "
    "`hf auth login`.", show_default=False)]
ThresholdOpt = Annotated[Optional[float], typer.Option(  # noqa: UP045 - typer needs Optional on 3.10
    "--threshold", help=f"Select layers whose cosine is ≤ this (the paper's rule). Default {DEFAULT_THRESHOLD} "
    "when --top-k is not given.", show_default=False)]
TopKOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--top-k", help="Select exactly K layers with the lowest cosines (ties: earlier layer first).",
    show_default=False)]
ProjectionOpt = Annotated[Projection, typer.Option(
    "--projection", help="approx: the paper's C = V·Vᵀ/‖V‖_F. exact: orthogonal projection onto V's top "
    "singular directions (needs --rank or --energy).")]
RankOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--rank", help="With --projection exact: keep V's top K singular directions.", show_default=False)]
EnergyOpt = Annotated[Optional[float], typer.Option(  # noqa: UP045
    "--energy", help="With --projection exact: keep the fewest directions holding this fraction of Σσ².",
    show_default=False)]
SvdOpt = Annotated[SvdMethod, typer.Option("--svd", help="SVD for --projection exact: auto picks randomized "
                                           "for a small --rank, full otherwise.")]
AdapterNameOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--adapter-name", metavar="NAME", help="Which of several adapters saved in one directory (PEFT saves a non-default "
    "adapter in a subfolder named after it).", show_default=False)]
KeyMapOpt = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
    "--key-map", metavar="REGEX=REPLACEMENT", help="Rewrite adapter module names before looking up their "
    "weights, e.g. '^backbone\\.=model.'. Repeatable; applied in order.", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (GPU when present), cpu, cuda or cuda:N.")]
SortOpt = Annotated[SortKey, typer.Option("--sort", help="Row order of the layer table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")]
MaxSelectedOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--max-selected", metavar="N|N%", help="Gate: exit 3 when the rule selects more than N layers, or more than "
    "N% of them (a sign the fine-tune drifted far from the aligned model). Outputs are still written.",
    show_default=False)]
FailBelowOpt = Annotated[Optional[float], typer.Option(  # noqa: UP045
    "--fail-below", metavar="TAU", help="Gate: exit 3 when any defined cosine is below TAU. Outputs are still "
    "written.", show_default=False)]
ReportMdOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--report-md", metavar="FILE", help="Also write the report as Markdown to FILE.", show_default=False)]
PlotOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--plot", metavar="FILE.png", help="Also draw cosine per layer and module to a PNG (needs the plot extra: "
    "pip install 'safelora-cli[plot]').", show_default=False)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safelora-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Safe LoRA for PEFT adapters."""


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """The one place user errors become 'Error: …' lines and exit codes; bugs keep tracebacks."""
    try:
        yield
    except SafeLoraError as exc:
        console.error(exc.message, exc.hint)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.error("Interrupted; nothing was written.")
        raise typer.Exit(130) from None


def _config(base: str, aligned: str | None, adapter: str, threshold: float | None, top_k: int | None,
            projection: Projection, rank: int | None, energy: float | None, svd: SvdMethod, device: str,
            out: Path | None = None, force: bool = False, adapter_name: str | None = None,
            key_map: list[str] | None = None, gates: Gates | None = None,
            revisions: tuple[str | None, str | None, str | None] = (None, None, None),
            token: str | None = None) -> RunConfig:
    if threshold is not None and top_k is not None:
        raise UsageError("Choose one selection rule: --threshold or --top-k, not both.")
    rule = SelectionRule(threshold=None, top_k=top_k) if top_k is not None else SelectionRule(
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold)
    return RunConfig(base=base, aligned=aligned, adapter=adapter, selection=rule,
                     projection=ProjectionSettings(projection, rank, energy, svd),
                     device=device, out=out, force=force, adapter_name=adapter_name, key_map=tuple(key_map or ()),
                     gates=gates or Gates(), base_revision=revisions[0], aligned_revision=revisions[1],
                     adapter_revision=revisions[2], token=token)


def _gates(max_selected: str | None, fail_below: float | None) -> Gates:
    limit = parse_selected_limit(max_selected) if max_selected is not None else None
    return Gates(max_selected=limit, fail_below=fail_below)


def _check_side_files(report_md: Path | None, plot: Path | None, configs: list[RunConfig]) -> None:
    """Refuse unusable --report-md/--plot targets (and a missing matplotlib) before any work."""
    from safelora_cli.writer import check_file_target

    inputs = tuple(i for i in (configs[0].base, configs[0].aligned, *(c.adapter for c in configs)) if i is not None)
    if report_md is not None:
        check_file_target(report_md, "--report-md", inputs)
    if plot is not None:
        from safelora_cli.plot import require_matplotlib

        require_matplotlib()
        check_file_target(plot, "--plot", inputs)


def _write_side_files(reports: list[dict], report_md: Path | None, plot: Path | None,  # type: ignore[type-arg]
                      names: list[str] | None = None) -> None:
    """One Markdown file holding each report's section; one plot per report (named after its output
    directory when there are several)."""
    from safelora_cli.report import to_markdown
    from safelora_cli.writer import write_file

    if report_md is not None:
        write_file(report_md, "\n".join(to_markdown(r) for r in reports).encode("utf-8"))
    if plot is not None:
        from safelora_cli.plot import render_png

        for report, name in zip(reports, names or [""] * len(reports), strict=True):
            target = plot.with_name(f"{plot.stem}-{name}{plot.suffix}") if len(reports) > 1 else plot
            write_file(target, render_png(report))


def _raise_failed_gates(reports: list[dict], written: str | None) -> None:  # type: ignore[type-arg]
    """Exit 3 after everything was written and printed, naming the first failed gate."""
    from safelora_cli.report import failed_gates

    # With several adapters, say whose gate failed.
    failed = [{**g, "message": g["message"] if len(reports) == 1 else f"{r['inputs']['adapter']['source']}: "
               f"{g['message']}"} for r in reports for g in failed_gates(r)]
    if failed:
        more = f" ({len(failed) - 1} more gate(s) failed.)" if len(failed) > 1 else ""
        raise GateFailed(f"Gate failed: {failed[0]['message']}{more}", hint=written)


@app.command()
def patch(
    base: BaseOpt,
    adapter: Annotated[list[str], typer.Option(
        "--adapter", help="PEFT LoRA adapter: a directory or a Hub id org/name[@revision]. Repeat it to patch "
        "several adapters of the same base/aligned pair in one pass over the weights.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory to create for the patched adapter; with several "
                                      "--adapter, each goes to OUT/<adapter directory name>.", show_default=False)],
    aligned: AlignedOpt = None,
    base_revision: BaseRevisionOpt = None,
    aligned_revision: AlignedRevisionOpt = None,
    adapter_revision: AdapterRevisionOpt = None,
    token: TokenOpt = None,
    threshold: ThresholdOpt = None,
    top_k: TopKOpt = None,
    projection: ProjectionOpt = Projection.APPROX,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    svd: SvdOpt = SvdMethod.AUTO,
    device: DeviceOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    adapter_name: AdapterNameOpt = None,
    key_map: KeyMapOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    sort: SortOpt = SortKey.LAYER,
    quiet: QuietOpt = False,
    max_selected: MaxSelectedOpt = None,
    fail_below: FailBelowOpt = None,
    report_md: ReportMdOpt = None,
    plot: PlotOpt = None,
) -> None:
    """Write a patched copy of an adapter, with a similarity report.

    The output directory holds the adapter files unchanged except adapter_model.safetensors,
    where lora_B of each selected layer is replaced by C·lora_B, plus safelora_report.json.
    PEFT loads it like the original. The weights are always written as safetensors, also when the
    input held adapter_model.bin (which is then not copied). Its README.md model card gains a "Safe LoRA" section. With
    --adapter-name the output mirrors the input directory (every adapter subfolder copied) and only
    the chosen adapter is patched.

    Exit codes: 0 success, 1 bad input or a write failure (nothing is written), 2 wrong usage,
    3 a gate (--max-selected, --fail-below) failed after the outputs were written.

    Examples:

        safelora patch --base ./llama-2-7b --aligned ./llama-2-7b-chat --adapter ./my-lora --out ./my-lora-safe

        safelora patch --base ./base --aligned ./chat --adapter ./my-lora --out ./safe --max-selected 20% --json

        safelora patch --base meta-llama/Llama-2-7b-hf --aligned meta-llama/Llama-2-7b-chat-hf@main \
            --adapter my-org/my-lora --out ./my-lora-safe
    """
    from safelora_cli import pipeline
    from safelora_cli.report import build_report, to_json, write_text

    with _user_errors():
        outs = _output_dirs(adapter, out)
        configs = [_config(base, aligned, a, threshold, top_k, projection, rank, energy, svd, device, o, force,
                           adapter_name, key_map, _gates(max_selected, fail_below),
                           (base_revision, aligned_revision, adapter_revision), token)
                   for a, o in zip(adapter, outs, strict=True)]
        _check_side_files(report_md, plot, configs)
        analyses = _run(pipeline.patch_many, configs, quiet)
        reports = [build_report(a, command="patch") for a in analyses]
        if json_out:
            # One adapter: the report object; several: a list of them, in --adapter order.
            write_text(to_json(reports[0] if len(reports) == 1 else reports))  # type: ignore[arg-type]
        _write_side_files(reports, report_md, plot, [o.name for o in outs])
        if not quiet:
            for report, written in zip(reports, outs, strict=True):
                console.print_table(report, sort.value, to_stderr=True)
                console.info(f"Patched adapter written to {written}")
        _raise_failed_gates(reports, f"The patched adapter and its report were written to {out}.")


def _output_dirs(adapters: list[str], out: Path) -> list[Path]:
    """One adapter → OUT itself; several → OUT/<name of each adapter's directory or repo>."""
    if len(adapters) == 1:
        return [out]
    names = [Path(a.rstrip("/")).name for a in adapters]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UsageError(f"Several --adapter values end in the same name ({', '.join(clashes)}); their outputs "
                         f"would collide in {out}.", hint="Patch them in separate runs with their own --out.")
    return [out / name for name in names]


def _run(func, arg, quiet: bool):  # type: ignore[no-untyped-def]
    if quiet:  # huggingface_hub draws its own download bars
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with console.layer_progress(enabled=not quiet) as advance:
        return func(arg, on_layer=advance)


@app.command()
def inspect(
    base: BaseOpt,
    adapter: AdapterOpt,
    aligned: AlignedOpt = None,
    base_revision: BaseRevisionOpt = None,
    aligned_revision: AlignedRevisionOpt = None,
    adapter_revision: AdapterRevisionOpt = None,
    token: TokenOpt = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", "-f", help="table, json, csv or markdown; "
                                                        "written to stdout.")] = OutputFormat.TABLE,
    threshold: ThresholdOpt = None,
    top_k: TopKOpt = None,
    projection: ProjectionOpt = Projection.APPROX,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    svd: SvdOpt = SvdMethod.AUTO,
    device: DeviceOpt = "auto",
    sort: SortOpt = SortKey.LAYER,
    quiet: QuietOpt = False,
    adapter_name: AdapterNameOpt = None,
    key_map: KeyMapOpt = None,
    max_selected: MaxSelectedOpt = None,
    fail_below: FailBelowOpt = None,
    report_md: ReportMdOpt = None,
    plot: PlotOpt = None,
) -> None:
    """Print per-layer similarities and which layers a rule would select. Changes nothing.

    Only the files named by --report-md and --plot are written. Exit codes: 0 success, 1 bad input,
    2 wrong usage, 3 a gate (--max-selected, --fail-below) failed.

    Examples:

        safelora inspect --base ./llama-2-7b --aligned ./llama-2-7b-chat --adapter ./my-lora --format json

        safelora inspect --base ./base --aligned ./chat --adapter ./my-lora --fail-below 0.2 --plot cosines.png

        HF_HUB_OFFLINE=1 safelora inspect --base meta-llama/Llama-2-7b-hf --adapter my-org/my-lora
    """
    from safelora_cli import pipeline
    from safelora_cli.report import build_report, to_csv, to_json, to_markdown, write_text

    with _user_errors():
        config = _config(base, aligned, adapter, threshold, top_k, projection, rank, energy, svd, device,
                         adapter_name=adapter_name, key_map=key_map, gates=_gates(max_selected, fail_below),
                         revisions=(base_revision, aligned_revision, adapter_revision), token=token)
        _check_side_files(report_md, plot, [config])
        analysis = _run(pipeline.analyze, config, quiet)
        report = build_report(analysis, command="inspect")
        if output_format is OutputFormat.TABLE:
            console.print_table(report, sort.value, to_stderr=False)
        elif output_format is OutputFormat.JSON:
            write_text(to_json(report))
        elif output_format is OutputFormat.CSV:
            write_text(to_csv(report, sort.value))
        else:
            write_text(to_markdown(report, sort.value))
        _write_side_files([report], report_md, plot)
        _raise_failed_gates([report], None)


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write base/, aligned/ and adapter/.")] = Path("demo"),
) -> None:
    """Write a tiny Llama-style base / aligned / adapter trio to try the other commands on.

    Example:

        safelora demo ./demo
    """
    from safelora_cli.demo import write_trio

    with _user_errors():
        if directory.exists() and any(directory.iterdir()):
            raise UsageError(f"{directory} exists and is not empty.", hint="Choose a new directory.")
        write_trio(directory)
    console.info(f"Wrote {directory}/base, {directory}/aligned and {directory}/adapter. Try:")
    console.info(f"  safelora patch --base {directory}/base --aligned {directory}/aligned "
                 f"--adapter {directory}/adapter --out {directory}/patched")


from safelora_cli.eval_cli import eval_command  # noqa: E402

app.command("eval")(eval_command)


def main() -> None:
    app()
