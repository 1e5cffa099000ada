"""The `safelora` command line: flags → one API call → print → exit code. Nothing else.

Kept free of torch at import time so that `--help` and `--version` answer at once; the API
is imported inside the commands.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
import typer.core

from safelora_cli import __version__, console
from safelora_cli.config import DEFAULT_THRESHOLD, Projection, SvdMethod
from safelora_cli.errors import OutputError, expand_user
from safelora_cli.exits import user_errors
from safelora_cli.options import (
    AdapterNameOpt,
    AdapterOpt,
    AdapterRevisionOpt,
    AlignedOpt,
    AlignedRevisionOpt,
    BaseOpt,
    BaseRevisionOpt,
    DeviceOpt,
    KeyMapOpt,
    QuietOpt,
    SubspaceOpt,
    SubspaceRevisionOpt,
    TokenOpt,
    option,
)

if TYPE_CHECKING:
    from safelora_cli.result import Result


def _no_metavar(option: Any) -> Any:
    """--help is a flag: show no value placeholder for it, like every other flag here."""
    if option is not None:
        option.metavar = ""
    return option


class _Command(typer.core.TyperCommand):
    def get_help_option(self, ctx: Any) -> Any:
        return _no_metavar(super().get_help_option(ctx))


class _Group(typer.core.TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _no_metavar(super().get_help_option(ctx))


app = typer.Typer(
    name="safelora",
    cls=_Group,
    help="Safe LoRA for PEFT adapters: project the layers of a fine-tuned LoRA that drifted from the aligned model "
    "back onto the alignment subspace. No data, no training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
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


ThresholdOpt = Annotated[Optional[float], option(  # noqa: UP045
    "--threshold", metavar="TAU", help=f"Select layers whose cosine is ≤ TAU (the paper's rule). Default "
    f"{DEFAULT_THRESHOLD} when --top-k is not given.")]
TopKOpt = Annotated[Optional[int], option(  # noqa: UP045
    "--top-k", metavar="K", help="Select exactly K layers with the lowest cosines (ties: earlier layer first).")]
ProjectionOpt = Annotated[Projection, typer.Option(
    "--projection", help="approx: the paper's C = V·Vᵀ/‖V‖_F. exact: orthogonal projection onto V's top "
    "singular directions (needs --rank or --energy).")]
RankOpt = Annotated[Optional[int], option(  # noqa: UP045
    "--rank", metavar="K", help="With --projection exact: keep V's top K singular directions.")]
EnergyOpt = Annotated[Optional[float], option(  # noqa: UP045
    "--energy", metavar="E", help="With --projection exact: keep the fewest directions holding this fraction of Σσ².")]
SvdOpt = Annotated[SvdMethod, typer.Option(
    "--svd", help="SVD for --projection exact: auto picks randomized for a small --rank, full otherwise.")]
JsonOpt = Annotated[bool, option("--json", metavar="", help="Print the report as JSON on stdout (several adapters: "
                               "an array).")]
SortOpt = Annotated[SortKey, typer.Option("--sort", help="Row order of the layer table.")]
MaxSelectedOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--max-selected", metavar="N|N%", help="Gate: exit 3 when the rule selects more than N layers, or more than N% "
    "of them (a sign the fine-tune drifted far from the aligned model). Outputs are still written.")]
FailBelowOpt = Annotated[Optional[float], option(  # noqa: UP045
    "--fail-below", metavar="TAU", help="Gate: exit 3 when any defined cosine is below TAU. Outputs are still "
    "written.")]
ReportMdOpt = Annotated[Optional[Path], option(  # noqa: UP045
    "--report-md", metavar="FILE", help="Also write the report as Markdown to FILE.")]
PlotOpt = Annotated[Optional[Path], option(  # noqa: UP045
    "--plot", metavar="FILE.png", help="Also draw cosine per layer and module to a PNG (needs the plot extra: "
    "pip install 'safelora-cli\\[plot]').")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safelora-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                          help="Print the version and exit.")] = False,
) -> None:
    """Safe LoRA for PEFT adapters."""


def _common(quiet: bool) -> dict[str, Any]:
    """Progress and warnings for the API call; silences huggingface_hub's own bars under --quiet."""
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return {"on_warning": None if quiet else console.warning}


def _finish(result: Result, written_note: str | None) -> None:
    """Exit 3, after everything was written and printed, naming the first failed gate."""
    failed = result.failed_gates
    if failed:
        several = len(result.reports) > 1
        first = f"{failed[0].adapter}: {failed[0].message}" if several else failed[0].message
        more = f" ({len(failed) - 1} more gate(s) failed.)" if len(failed) > 1 else ""
        console.error(f"Gate failed: {first}{more}", written_note)
        raise typer.Exit(3)


_PATCH_HELP = (
    "Write a patched copy of an adapter, with a similarity report.\n\n"
    "The output directory holds the adapter's files unchanged except adapter_model.safetensors, where lora_B of "
    "each selected layer is replaced by C·lora_B, plus safelora_report.json; PEFT loads it like the original. The "
    "weights are always written as safetensors, also when the input held adapter_model.bin (which is then not "
    "copied). Its README.md model card gains front matter and a \"Safe LoRA\" section. Links to outside the "
    "adapter, special files and version-control folders (.git) are not copied (the report lists them). With "
    "--adapter-name the output mirrors the input directory and only the chosen adapter is patched. --force "
    "replaces only an empty directory, or an earlier patched adapter nothing was added to.\n\n"
    "Exit codes: 0 success; 1 bad input or a write failure (nothing is written); 2 wrong usage; 3 a gate "
    "(--max-selected, --fail-below) failed after the outputs were written; 129, 130, 143 stopped by SIGHUP, "
    "Ctrl-C, SIGTERM (nothing is written).\n\n"
    "Examples:\n\n"
    "    safelora patch --base ./base --aligned ./chat --adapter ./lora --out ./safe\n\n"
    "    safelora patch --base ./base --adapter ./lora --out ./safe --top-k 10\n\n"
    "    safelora patch --base ./base --adapter ./lora --out safe --max-selected 20%\n\n"
    "    safelora patch --base meta-llama/Llama-2-7b-hf --adapter org/lora --out safe\n\n"
    "    safelora patch --subspace org/subspace --adapter ./lora --out safe\n"
)


@app.command(help=_PATCH_HELP, cls=_Command)
def patch(
    adapter: AdapterOpt,
    out: Annotated[Path, option("--out", metavar="DIR", help="Directory to create for the patched adapter; with "
                              "several --adapter, each goes to DIR/NAME, NAME being the adapter's directory name.")],
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    subspace: SubspaceOpt = None,
    subspace_revision: SubspaceRevisionOpt = None,
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
    force: Annotated[bool, option("--force", metavar="", help="Replace --out if it is empty, or an earlier "
                                "patched adapter nothing was added to.")] = False,
    adapter_name: AdapterNameOpt = None,
    key_map: KeyMapOpt = None,
    json_out: JsonOpt = False,
    sort: SortOpt = SortKey.LAYER,
    quiet: QuietOpt = False,
    max_selected: MaxSelectedOpt = None,
    fail_below: FailBelowOpt = None,
    report_md: ReportMdOpt = None,
    plot: PlotOpt = None,
) -> None:
    with user_errors():
        from safelora_cli import api

        with console.layer_progress(enabled=not quiet) as advance:
            result = api.patch(
                base=base, adapter=adapter, out=out, aligned=aligned, subspace=subspace,
                subspace_revision=subspace_revision, threshold=threshold, top_k=top_k,
                projection=projection, rank=rank, energy=energy, svd=svd, device=device, key_map=key_map,
                adapter_name=adapter_name, base_revision=base_revision, aligned_revision=aligned_revision,
                adapter_revision=adapter_revision, token=token, force=force, report_md=report_md, plot=plot,
                max_selected=max_selected, fail_below=fail_below, on_progress=advance, **_common(quiet))
        if json_out:
            try:
                console.emit_json(result.json_document())
            except OutputError as exc:
                exc.message += f" The patched adapter and its report were written to {out} all the same."
                raise
        if not quiet:
            for report, written in zip(result.reports, result.outputs, strict=True):
                console.print_table(report, sort.value, to_stderr=True)
                console.info(f"Patched adapter written to {written}")
        _finish(result, f"The patched adapter and its report were written to {out}.")


_INSPECT_HELP = (
    "Print per-layer similarities and which layers a rule would select. Changes nothing.\n\n"
    "Only the files named by --report-md and --plot are written. Exit codes: 0 success; 1 bad input; 2 wrong "
    "usage; 3 a gate (--max-selected, --fail-below) failed; 129, 130, 143 stopped by a signal.\n\n"
    "Examples:\n\n"
    "    safelora inspect --base ./base --aligned ./chat --adapter ./lora\n\n"
    "    safelora inspect --base ./base --adapter ./lora --json > report.json\n\n"
    "    safelora inspect --base ./base --adapter ./lora --fail-below 0.2\n\n"
    "    HF_HUB_OFFLINE=1 safelora inspect --base org/base --adapter org/lora\n"
)


@app.command(help=_INSPECT_HELP, cls=_Command)
def inspect(
    adapter: AdapterOpt,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    subspace: SubspaceOpt = None,
    subspace_revision: SubspaceRevisionOpt = None,
    base_revision: BaseRevisionOpt = None,
    aligned_revision: AlignedRevisionOpt = None,
    adapter_revision: AdapterRevisionOpt = None,
    token: TokenOpt = None,
    output_format: Annotated[OutputFormat, typer.Option(
        "--format", "-f", help="table, json, csv or markdown; written to stdout.")] = OutputFormat.TABLE,
    json_out: JsonOpt = False,
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
    with user_errors():
        from safelora_cli import api
        from safelora_cli.errors import UsageError

        if json_out and output_format not in (OutputFormat.TABLE, OutputFormat.JSON):
            raise UsageError(f"--json and --format {output_format.value} ask for two formats; give one.")
        fmt = OutputFormat.JSON if json_out else output_format
        with console.layer_progress(enabled=not quiet) as advance:
            result = api.inspect(
                base=base, adapter=adapter, aligned=aligned, subspace=subspace,
                subspace_revision=subspace_revision, threshold=threshold, top_k=top_k,
                projection=projection, rank=rank, energy=energy, svd=svd, device=device, key_map=key_map,
                adapter_name=adapter_name, base_revision=base_revision, aligned_revision=aligned_revision,
                adapter_revision=adapter_revision, token=token, report_md=report_md, plot=plot,
                max_selected=max_selected, fail_below=fail_below, on_progress=advance, **_common(quiet))
        if fmt is OutputFormat.JSON:
            console.emit_json(result.json_document())
        else:
            for report in result.reports:
                console.print_report(report, fmt.value, sort.value)
        _finish(result, None)


@app.command(cls=_Command, help="Write a tiny Llama-style base / aligned / adapter trio to try the other "
             "commands on.\n\nExample:\n\n    safelora demo ./demo\n")
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write base/, aligned/ and adapter/.",
                                              metavar="DIR")] = Path("demo"),
) -> None:
    with user_errors():
        from safelora_cli.demo import write_demo

        write_demo(expand_user(directory))
    console.info(f"Wrote {directory}/base, {directory}/aligned and {directory}/adapter. Try:")
    console.info(f"  safelora patch --base {directory}/base --aligned {directory}/aligned "
                 f"--adapter {directory}/adapter --out {directory}/patched")


from safelora_cli.eval_cli import eval_command  # noqa: E402
from safelora_cli.subspace_cli import subspace_command  # noqa: E402

app.command("eval", cls=_Command)(eval_command)
app.command("subspace", cls=_Command)(subspace_command)


def main() -> None:
    app()
