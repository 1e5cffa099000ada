"""`safelora subspace`: flags → one API call → print → exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from safelora_cli import console
from safelora_cli.exits import user_errors
from safelora_cli.options import (
    SOURCE,
    AdapterNameOpt,
    AdapterRevisionOpt,
    AlignedOpt,
    AlignedRevisionOpt,
    BaseRevisionOpt,
    DeviceOpt,
    KeyMapOpt,
    QuietOpt,
    TokenOpt,
    option,
)

BaseOpt = Annotated[str, option("--base", metavar=SOURCE, help="Base (unaligned) model: a local directory or a "
                              "Hub id.")]
AdapterOpt = Annotated[Optional[list[str]], option(  # noqa: UP045 - typer needs Optional on 3.10
    "--adapter", metavar=SOURCE, help="Cover the weights this adapter adapts (repeatable). Give it or --modules.")]
ModulesOpt = Annotated[Optional[str], option(  # noqa: UP045
    "--modules", metavar="NAMES", help="Cover every weight of these comma-separated module names (…q_proj.weight, "
    "…), e.g. q_proj,v_proj, for any adapter of them.")]
RankOpt = Annotated[Optional[int], option(  # noqa: UP045
    "--rank", metavar="K", help="Low-rank mode: keep V's top K singular directions of each weight.")]
EnergyOpt = Annotated[Optional[float], option(  # noqa: UP045
    "--energy", metavar="E", help="Low-rank mode: keep the fewest directions holding this fraction of C's energy "
    "(Σσ⁴).")]
DtypeOpt = Annotated[str, option("--dtype", metavar="DTYPE", help="Exact mode: store V as float32 (default), "
                               "bfloat16 or float16 (half the size; see docs/subspace.md for the cosine error).")]


def subspace_command(
    base: BaseOpt,
    out: Annotated[Path, option("--out", metavar="DIR", help="Directory to create for the subspace file.")],
    aligned: AlignedOpt = None,
    adapter: AdapterOpt = None,
    modules: ModulesOpt = None,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    dtype: DtypeOpt = "float32",
    base_revision: BaseRevisionOpt = None,
    aligned_revision: AlignedRevisionOpt = None,
    adapter_revision: AdapterRevisionOpt = None,
    token: TokenOpt = None,
    device: DeviceOpt = "auto",
    force: Annotated[bool, option("--force", metavar="", help="Replace --out if it is empty, or an earlier subspace "
                                "file nothing was added to.")] = False,
    adapter_name: AdapterNameOpt = None,
    key_map: KeyMapOpt = None,
    json_out: Annotated[bool, option("--json", metavar="", help="Print the file's record (header metadata) as JSON "
                                   "on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a safety-subspace file: what `patch --subspace` needs in place of the base and aligned models.

    Exact mode (the default) stores V = W_aligned − W_base of every covered weight: a patch from it selects the
    same layers and writes the same B as the two-model run. Low-rank mode (--rank or --energy) stores a factor Q
    per weight, C ≈ Q·Qᵀ: far smaller, and each layer's report then carries a proven bound on the cosine error.
    The directory is laid out like a model, so it can be pushed to the Hub and passed as org/name.

    Exit codes: 0 success; 1 bad input or a write failure (nothing is written); 2 wrong usage; 129, 130, 143
    stopped by a signal (nothing is written).

    Examples:

        safelora subspace --base base --aligned chat --adapter lora --out sub

        safelora subspace --base base --aligned chat --modules q_proj,v_proj --out s

        safelora subspace --base b --aligned c --adapter lora --rank 64 --out s64

        safelora patch --subspace sub --adapter lora --out safe
    """
    with user_errors():
        from safelora_cli import api
        from safelora_cli.subspace_card import low_rank_summary

        with console.layer_progress(enabled=not quiet) as advance:
            result = api.subspace(
                base=base, out=out, adapter=adapter or None, modules=modules, aligned=aligned, rank=rank,
                energy=energy, dtype=dtype, device=device, key_map=key_map, adapter_name=adapter_name,
                base_revision=base_revision, aligned_revision=aligned_revision, adapter_revision=adapter_revision,
                token=token, force=force, on_progress=advance)
        if json_out:
            console.emit_json(result.document)
        if not quiet:
            document = result.document
            detail = low_rank_summary(document) if document["mode"] == "low-rank" else f"V as {document['dtype']}"
            console.info(f"Subspace file written to {result.out}: {document['mode']}, {len(document['entries'])} "
                         f"weights, {result.nbytes / 1e6:.1f} MB; {detail}.")
