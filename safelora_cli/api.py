"""The Python API: `safelora_cli.patch(...)`, `safelora_cli.inspect(...)` and `safelora_cli.subspace(...)`.

Keyword arguments are named like the CLI flags. Both return a `Result` whose `.reports` are the
JSON documents `--json` prints and whose gate verdicts are data (`.passed`, `.failed_gates`);
they raise `SafeLoraError` subclasses for anything a caller can fix, never exit, and print
nothing: progress and warnings go to the callbacks given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli.config import Inputs, Method, Outputs, Projection, ProjectionSettings, SelectionRule, SvdMethod
from safelora_cli.errors import UsageError
from safelora_cli.gates import Gates, parse_selected_limit
from safelora_cli.result import Result

if TYPE_CHECKING:
    from safelora_cli.subspace_build import SubspaceResult

StrPath = str | PathLike[str]
OnProgress = Callable[[int, int], None]  # (weights done, weights in all)
OnWarning = Callable[[str], None]


def _check_types(values: dict[str, object]) -> None:
    """Arguments of the wrong type are the caller's mistake: a UsageError, not a TypeError deep inside.
    A bool is refused where a number is expected (True would silently mean 1)."""
    kinds: dict[str, tuple[type, ...]] = {
        "threshold": (int, float), "fail_below": (int, float), "energy": (int, float),
        "top_k": (int,), "rank": (int,), "force": (bool,), "device": (str,), "adapter_name": (str,),
        "token": (str,), "base_revision": (str,), "aligned_revision": (str,), "adapter_revision": (str,),
        "max_selected": (int, str), "base": (str, PathLike), "aligned": (str, PathLike), "out": (str, PathLike),
        "report_md": (str, PathLike), "plot": (str, PathLike), "subspace": (str, PathLike),
        "subspace_revision": (str,), "dtype": (str,),
    }
    for name, value in values.items():
        if value is None or name not in kinds:
            continue
        numeric = kinds[name][0] in (int, float)
        if not isinstance(value, kinds[name]) or (numeric and isinstance(value, bool) and name != "force"):
            raise UsageError(f"{name} must be {' or '.join(k.__name__ for k in kinds[name])}, got "
                             f"{type(value).__name__} {value!r}.")
    adapters = values.get("adapter")
    listed = [adapters] if isinstance(adapters, str | PathLike) else adapters
    optional = values.get("modules") is not None and adapters is None  # subspace: --modules instead
    if not optional and (not isinstance(listed, list | tuple) or not listed or
                         not all(isinstance(a, str | PathLike) for a in listed)):
        raise UsageError(f"adapter must be a path, a Hub id or a list of them, got {adapters!r}.")
    for name in ("key_map", "modules"):
        _check_strings(name, values.get(name))
    for name in ("on_progress", "on_warning"):
        if values.get(name) is not None and not callable(values[name]):
            raise UsageError(f"{name} must be callable, got {values[name]!r}.")


def _check_strings(name: str, rules: object) -> None:
    """None, a string, or a list of strings."""
    if rules is not None and not isinstance(rules, str) and (
            not isinstance(rules, list | tuple) or not all(isinstance(r, str) for r in rules)):
        what = "a REGEX=REPLACEMENT string" if name == "key_map" else "a module name"
        raise UsageError(f"{name} must be {what} or a list of them, got {rules!r}.")


def _inputs(a: dict[str, Any]) -> Inputs:
    adapter = a["adapter"]
    adapters = [] if adapter is None else [adapter] if isinstance(adapter, str | PathLike) else list(adapter)
    rules = [a["key_map"]] if isinstance(a["key_map"], str) else list(a["key_map"] or ())
    return Inputs(base=_text(a["base"]), adapters=tuple(str(x) for x in adapters), aligned=_text(a["aligned"]),
                  base_revision=a["base_revision"], aligned_revision=a["aligned_revision"],
                  adapter_revision=a["adapter_revision"], adapter_name=a["adapter_name"], key_map=tuple(rules),
                  token=a["token"], subspace=_text(a.get("subspace")), subspace_revision=a.get("subspace_revision"))


def _method(threshold: float | None, top_k: int | None, projection: Projection | str, rank: int | None,
            energy: float | None, svd: SvdMethod | str, device: str) -> Method:
    # ProjectionSettings turns the strings into the enums, with a clear error for others.
    settings = ProjectionSettings(projection, rank, energy, svd)  # type: ignore[arg-type]
    return Method(selection=SelectionRule.of(threshold, top_k), projection=settings, device=device)


def _gates(max_selected: int | str | None, fail_below: float | None) -> Gates:
    limit = None if max_selected is None else parse_selected_limit(str(max_selected))
    return Gates(max_selected=limit, fail_below=fail_below)


def patch(*, adapter: StrPath | Sequence[StrPath], out: StrPath, base: StrPath | None = None,
          aligned: StrPath | None = None, subspace: StrPath | None = None, subspace_revision: str | None = None,
          threshold: float | None = None, top_k: int | None = None, projection: Projection | str = "approx",
          rank: int | None = None, energy: float | None = None, svd: SvdMethod | str = "auto",
          device: str = "auto", key_map: Sequence[str] | str | None = None, adapter_name: str | None = None,
          base_revision: str | None = None, aligned_revision: str | None = None,
          adapter_revision: str | None = None, token: str | None = None, force: bool = False,
          report_md: StrPath | None = None, plot: StrPath | None = None, max_selected: int | str | None = None,
          fail_below: float | None = None, on_progress: OnProgress | None = None,
          on_warning: OnWarning | None = None) -> Result:
    """Write a patched copy of each adapter, with its report. See docs/api.md.

    Args:
        adapter: a PEFT LoRA adapter (directory or Hub id), or a list of them sharing base and aligned;
            with several, each is written to `out/<its directory name>`.
        out: the directory to create for the patched adapter.
        base: the base (unaligned) model: a local directory or a Hub id `org/name[@revision]`.
        aligned: the safety-aligned model; default: the adapter config's `base_model_name_or_path`.
        subspace, subspace_revision: a file written by `subspace()` (directory or Hub id), read in place of
            base and aligned.
        threshold, top_k: the selection rule (cosine ≤ threshold, default 0.5; or the top_k lowest).
        projection, rank, energy, svd: "approx" (the paper's C) or "exact" with a rank or energy.
        device: "auto", "cpu", "cuda" or "cuda:N".
        key_map: `REGEX=REPLACEMENT` rules applied to adapter module names before lookup.
        adapter_name: which of several adapters saved in one directory.
        base_revision, aligned_revision, adapter_revision, token: Hub access.
        force: replace an existing `out` (only an empty directory, or an earlier patched adapter nothing was added to).
        report_md, plot: also write the report as Markdown, and a PNG of cosines (needs matplotlib).
        max_selected, fail_below: gates (a count or "N%", and a cosine); verdicts are in the result.
        on_progress: called with (weights done, weights in all) as the pass goes.
        on_warning: called with each warning (also collected in `Result.warnings`).

    Raises:
        SafeLoraError: (InputError, OutputError, UsageError, …) with a message and a hint.
    """
    return _run("patch", locals())


def inspect(*, adapter: StrPath | Sequence[StrPath], base: StrPath | None = None, aligned: StrPath | None = None,
            subspace: StrPath | None = None, subspace_revision: str | None = None,
            threshold: float | None = None, top_k: int | None = None, projection: Projection | str = "approx",
            rank: int | None = None, energy: float | None = None, svd: SvdMethod | str = "auto",
            device: str = "auto", key_map: Sequence[str] | str | None = None, adapter_name: str | None = None,
            base_revision: str | None = None, aligned_revision: str | None = None,
            adapter_revision: str | None = None, token: str | None = None, report_md: StrPath | None = None,
            plot: StrPath | None = None, max_selected: int | str | None = None, fail_below: float | None = None,
            on_progress: OnProgress | None = None, on_warning: OnWarning | None = None) -> Result:
    """Per-layer similarities and the layers a rule would select; writes only `report_md` and `plot`.

    Arguments as for `patch`, without `out` and `force`.
    """
    return _run("inspect", {**locals(), "out": None, "force": False})


def subspace(*, base: StrPath, out: StrPath, adapter: StrPath | Sequence[StrPath] | None = None,
             modules: Sequence[str] | str | None = None, aligned: StrPath | None = None, rank: int | None = None,
             energy: float | None = None, dtype: str = "float32", device: str = "auto",
             key_map: Sequence[str] | str | None = None, adapter_name: str | None = None,
             base_revision: str | None = None, aligned_revision: str | None = None,
             adapter_revision: str | None = None, token: str | None = None, force: bool = False,
             on_progress: OnProgress | None = None) -> SubspaceResult:
    """Write a safety-subspace file: what `patch(subspace=...)` needs in place of base and aligned.

    Args:
        base, aligned: the two models, as for `patch`.
        out: the directory to create.
        adapter, modules: the weights to cover: those an adapter (or several) adapts, or every
            `<module>.weight` of these module names (e.g. ["q_proj", "v_proj"]); give one of the two.
        rank, energy: low-rank mode, C ≈ Q·Qᵀ with Q of V's top `rank` directions, or the fewest keeping
            `energy` of C's energy (Σσ⁴); neither: exact mode, V itself.
        dtype: what exact mode stores V in: "float32" (default), "bfloat16" or "float16".
        force: replace `out` if it is empty or an earlier subspace file.
        Others as for `patch`.

    Raises:
        SafeLoraError: as for `patch`.
    """
    from safelora_cli.subspace_build import SubspaceRequest, build

    args = locals()
    _check_types(args)
    names = [modules] if isinstance(modules, str) else list(modules or ())
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    inputs = _inputs({**args, "adapter": adapter})
    request = SubspaceRequest(inputs, Path(out), tuple(names), rank, energy, dtype, force, device)
    return build(request, on_layer=on_progress)


def _run(command: str, args: dict[str, Any]) -> Result:
    """Check the arguments' types, make the settings (each validates itself), run the pipeline."""
    from safelora_cli import pipeline

    _check_types(args)
    if command == "patch" and args["out"] is None:
        raise UsageError("patch needs out, the directory to write the patched adapter to.")
    a = args
    inputs = _inputs(a)
    method = _method(a["threshold"], a["top_k"], a["projection"], a["rank"], a["energy"], a["svd"], a["device"])
    outputs = Outputs(out=_path(a["out"]), force=a["force"], report_md=_path(a["report_md"]), plot=_path(a["plot"]))
    return pipeline.run(command, inputs, method, outputs, _gates(a["max_selected"], a["fail_below"]),
                        on_layer=a["on_progress"], warn=a["on_warning"])


def _path(value: StrPath | None) -> Path | None:
    return None if value is None else Path(value)


def _text(value: StrPath | None) -> str | None:
    return None if value is None else str(value)
