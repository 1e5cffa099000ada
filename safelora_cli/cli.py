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
from safelora_cli.errors import SafeLoraError, UsageError

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
BaseOpt = Annotated[str, typer.Option("--base", help="Base (unaligned) model: a directory with model.safetensors "
                                      "or a sharded index, e.g. Llama-2-7b.", show_default=False)]
AlignedOpt = Annotated[str, typer.Option("--aligned", help="Safety-aligned model the adapter was trained on, "
                                         "e.g. Llama-2-7b-chat.", show_default=False)]
AdapterOpt = Annotated[str, typer.Option("--adapter", help="PEFT LoRA adapter directory "
                                         "(adapter_config.json + adapter_model.safetensors).", show_default=False)]
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


def _config(base: str, aligned: str, adapter: str, threshold: float | None, top_k: int | None,
            projection: Projection, rank: int | None, energy: float | None, svd: SvdMethod, device: str,
            out: Path | None = None, force: bool = False, adapter_name: str | None = None,
            key_map: list[str] | None = None) -> RunConfig:
    if threshold is not None and top_k is not None:
        raise UsageError("Choose one selection rule: --threshold or --top-k, not both.")
    rule = SelectionRule(threshold=None, top_k=top_k) if top_k is not None else SelectionRule(
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold)
    return RunConfig(base=base, aligned=aligned, adapter=adapter, selection=rule,
                     projection=ProjectionSettings(projection, rank, energy, svd),
                     device=device, out=out, force=force, adapter_name=adapter_name, key_map=tuple(key_map or ()))


@app.command()
def patch(
    base: BaseOpt,
    aligned: AlignedOpt,
    adapter: Annotated[list[str], typer.Option(
        "--adapter", help="PEFT LoRA adapter directory. Repeat it to patch several adapters of the same "
        "base/aligned pair in one pass over the weights.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory to create for the patched adapter; with several "
                                      "--adapter, each goes to OUT/<adapter directory name>.", show_default=False)],
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
) -> None:
    """Write a patched copy of an adapter, with a similarity report.

    The output directory holds the adapter files unchanged except adapter_model.safetensors,
    where lora_B of each selected layer is replaced by C·lora_B, plus safelora_report.json.
    PEFT loads it like the original. With --adapter-name the output mirrors the input directory
    (every adapter subfolder copied) and only the chosen adapter is patched.

    Example:

        safelora patch --base ./llama-2-7b --aligned ./llama-2-7b-chat --adapter ./my-lora --out ./my-lora-safe
    """
    from safelora_cli import pipeline
    from safelora_cli.report import build_report, to_json, write_text

    with _user_errors():
        outs = _output_dirs(adapter, out)
        configs = [_config(base, aligned, a, threshold, top_k, projection, rank, energy, svd, device, o, force,
                           adapter_name, key_map)
                   for a, o in zip(adapter, outs, strict=True)]
        analyses = _run(pipeline.patch_many, configs, quiet)
        reports = [build_report(a, command="patch") for a in analyses]
        if json_out:
            # One adapter: the report object; several: a list of them, in --adapter order.
            write_text(to_json(reports[0] if len(reports) == 1 else reports))  # type: ignore[arg-type]
        if not quiet:
            for report, written in zip(reports, outs, strict=True):
                console.print_table(report, sort.value, to_stderr=True)
                console.info(f"Patched adapter written to {written}")


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
    with console.layer_progress(enabled=not quiet) as advance:
        return func(arg, on_layer=advance)


@app.command()
def inspect(
    base: BaseOpt,
    aligned: AlignedOpt,
    adapter: AdapterOpt,
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
) -> None:
    """Print per-layer similarities and which layers a rule would select. Writes nothing.

    Example:

        safelora inspect --base ./llama-2-7b --aligned ./llama-2-7b-chat --adapter ./my-lora --format json
    """
    from safelora_cli import pipeline
    from safelora_cli.report import build_report, to_csv, to_json, to_markdown, write_text

    with _user_errors():
        config = _config(base, aligned, adapter, threshold, top_k, projection, rank, energy, svd, device,
                         adapter_name=adapter_name, key_map=key_map)
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


def main() -> None:
    app()
