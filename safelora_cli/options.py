"""Option declarations the commands share: how a user types a model or adapter, and the device."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

SOURCE = "PATH|ORG/NAME[@REV]"


def option(*names: str, help: str, metavar: str | None = None) -> Any:  # noqa: A002 - typer's own keyword
    """A typer option with no default shown (the help says it where it matters)."""
    return typer.Option(*names, help=help, metavar=metavar, show_default=False)


DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (GPU when present), cpu, cuda or "
                                        "cuda:N.")]


# Options the commands share, declared once.
BaseOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--base", metavar=SOURCE, help="Base (unaligned) model, e.g. Llama-2-7b: a local directory (safetensors or .bin, "
    "single or sharded) or a Hub id. Needed unless --subspace is given.")]
SubspaceOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--subspace", metavar=SOURCE, help="A file written by `safelora subspace`, read in place of --base and "
    "--aligned (no model is downloaded).")]
SubspaceRevisionOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--subspace-revision", metavar="REV", help="Hub branch, tag or commit of --subspace.")]
AlignedOpt = Annotated[Optional[str], option(  # noqa: UP045 - typer needs Optional on 3.10
    "--aligned", metavar=SOURCE, help="Safety-aligned model the adapter was trained on, e.g. Llama-2-7b-chat. "
    "Default: the model the adapter's config names (base_model_name_or_path).")]
AdapterOpt = Annotated[list[str], option(
    "--adapter", metavar=SOURCE, help="PEFT LoRA adapter: a directory or a Hub id. Repeat it to analyse several "
    "adapters of the same base and aligned models in one pass over the weights.")]
BaseRevisionOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--base-revision", metavar="REV", help="Hub branch, tag or commit of --base (default: the main branch).")]
AlignedRevisionOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--aligned-revision", metavar="REV", help="Hub branch, tag or commit of --aligned.")]
AdapterRevisionOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--adapter-revision", metavar="REV", help="Hub branch, tag or commit of --adapter.")]
TokenOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--token", metavar="TOKEN", help="Hugging Face token for private or gated repositories. Default: HF_TOKEN, or "
    "the token saved by `hf auth login`.")]
AdapterNameOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--adapter-name", metavar="NAME", help="Which of several adapters saved in one directory (PEFT saves a "
    "non-default adapter in a subfolder named after it).")]
KeyMapOpt = Annotated[Optional[list[str]], option(  # noqa: UP045
    "--key-map", metavar="REGEX=REPLACEMENT", help="Rewrite adapter module names before looking up their weights, "
    "e.g. `'^backbone\\.=model.'`. Repeatable; applied in order.")]
QuietOpt = Annotated[bool, option("--quiet", "-q", metavar="", help="Print nothing but errors on stderr.")]
