"""Every path a run will write, checked once, before anything is read in earnest.

The rule: after expanding `~` and resolving links, a written path never equals, contains or lies
inside an input (base, aligned, every adapter, the Hub cache), nor another written path. An
existing output directory is replaced only with `force`, and only when it is empty or a
previous `safelora patch` wrote it (it holds that run's report); its identity is recorded so
that the final rename can refuse a directory that changed in the meantime (see `placement`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from safelora_cli.errors import InputError, OutputError, UsageError

REPORT_NAME = "safelora_report.json"
NAME_MAX = 255  # bytes per path component on the file systems models live on


@dataclass(frozen=True)
class Target:
    """One path to write. `existed` is the (device, inode) of the directory found there, if any."""

    path: Path  # resolved: where the bytes go
    label: str  # how messages name it: "--out", "--report-md", "--plot", "--out/<name>"
    existed: tuple[int, int] | None = None
    shown: Path | None = None  # as the user gave it, for messages
    directory: bool = False  # an adapter directory (replaced whole), not a side file

    def __str__(self) -> str:
        return f"{self.label} {self.shown or self.path}"


@dataclass(frozen=True)
class OutputPlan:
    adapter_dirs: list[Target]  # one per adapter (patch), empty for inspect
    report_md: Target | None
    plots: list[Target]

    def all(self) -> list[Target]:
        return [*self.adapter_dirs, *([self.report_md] if self.report_md else []), *self.plots]


def adapter_dir_names(adapters: list[str]) -> list[str]:
    """Subdirectory names under --out for several adapters: each adapter's directory or repo name."""
    names = [Path(a.rstrip("/")).name or a for a in adapters]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UsageError(f"Several adapters end in the same name ({', '.join(clashes)}); their outputs, named "
                         "after them, would collide.", hint="Run them separately, each with its own outputs.")
    return names


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_name(path: Path, label: str) -> None:
    """A name the file system would refuse, caught before any work rather than after the analysis.
    (Staging names stand a long name in with a short one, see `placement.staging_stem`.)"""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise OutputError(f"{label} {path}: a name in it is {len(os.fsencode(part))} bytes, longer than the file "
                              f"system allows ({NAME_MAX} bytes per component).", hint="Choose a shorter name.")


def _nearest_existing(path: Path) -> Path:
    parent = path
    while not os.path.lexists(parent):
        parent = parent.parent
    return parent


def _check_parent(target: Path, label: str) -> None:
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise OutputError(f"{label} {target}: {parent} is a file, not a directory.", hint="Choose another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Permission denied: cannot create {target} in {parent}.")


def file_metadata(weights: Path) -> dict[str, object]:
    """A safetensors file's `__metadata__`, {} when it has none or is not readable as one (read
    without the safetensors library, which this light module does not import)."""
    try:
        with open(weights, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size)) if 0 < size < 100_000_000 else {}
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _provenance_in(weights: Path) -> bool:
    """Whether a safetensors file carries the provenance record `safelora patch` writes."""
    return "safelora" in file_metadata(weights)


def written_by_safelora(directory: Path) -> bool:
    """Whether `directory` is a patched adapter nobody has added to since: the report and weights
    `safelora patch` writes, and no file newer than that report (the report is written last)."""
    report_path = directory / REPORT_NAME
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        written = report_path.stat().st_mtime_ns
        files = [p for p in directory.rglob("*") if not p.is_dir()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    ours = isinstance(report, dict) and report.get("command") == "patch" and \
        isinstance(report.get("tool"), dict) and report["tool"].get("name") == "safelora-cli"
    weights = [p for p in files if p.name == "adapter_model.safetensors"]
    return ours and any(_provenance_in(w) for w in weights) and \
        all(os.lstat(p).st_mtime_ns <= written for p in files)


def _adapter_dir(target: Target, force: bool, replaceable: Callable[[Path], bool] = written_by_safelora) -> Target:
    path = target.path
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise OutputError(f"{target} is the current directory or holds it; it cannot be replaced.",
                          hint="Choose a new directory.")
    if not path.exists():
        _check_parent(path, str(target))
        return target
    if not path.is_dir():
        raise OutputError(f"{target} exists and is not a directory.", hint="Choose a new directory.")
    if not force:
        raise OutputError(f"{target} already exists.", hint="Pass --force to replace it, or choose another.")
    try:
        empty = not any(path.iterdir())
    except OSError as exc:
        raise OutputError(f"Cannot list {target}: {exc.strerror}.") from None
    if not empty and not replaceable(path):
        what = ("a patched adapter left as safelora patch wrote it (no "
                f"{REPORT_NAME} and weights carrying its provenance, or files added since)"
                if replaceable is written_by_safelora else "a subspace file as safelora subspace wrote it")
        raise OutputError(f"{target} exists and is not {what}; --force only replaces an empty directory or such "
                          f"{'an adapter' if replaceable is written_by_safelora else 'a file'}.",
                          hint="Choose a new directory, or remove it yourself if it is really disposable.")
    _check_parent(path, str(target))
    info = os.stat(path)
    return replace(target, existed=(info.st_dev, info.st_ino))


def _side_file(target: Target) -> Target:
    path = target.path
    if path.is_dir():
        raise OutputError(f"{target} is a directory; expected a file name.", hint="Add a file name.")
    if path.exists() and not stat.S_ISREG(os.stat(path).st_mode):
        raise OutputError(f"{target} exists and is not a regular file.", hint="Choose another file name.")
    _check_parent(path, str(target))
    return target


def _resolved(path: Path, label: str, directory: bool) -> Target:
    """Where `path` really is. A link as the output itself is refused: outputs are replaced by
    renaming, which would write beside its target rather than at it, and hide where it went."""
    if os.path.islink(path):
        raise OutputError(f"{label} {path} is a symbolic link; outputs are never written through links.",
                          hint="Choose a new path.")
    try:
        where = path.resolve()
    except (RuntimeError, OSError):
        raise OutputError(f"{label} {path} goes through a loop of symbolic links.",
                          hint="Choose another path.") from None
    return Target(where, label, shown=path, directory=directory)


def _identities(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of `path` and every existing folder above it: the same folder seen through a
    bind mount has another path but the same identity."""
    found = set()
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            info = os.stat(folder)
            found.add((info.st_dev, info.st_ino))
    return found


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _check_against(targets: list[Target], inputs: dict[str, Path]) -> None:
    """No written path at, inside or around an input, or around another written path."""
    for target in targets:
        where, above = target.path, _identities(target.path)
        for name, source in inputs.items():
            if where == source or (_identity(where) is not None and _identity(where) == _identity(source)):
                raise OutputError(f"{target} is the {name}; inputs are never modified.", hint="Choose a new path.")
            if _within(where, source) or _identity(source) in above:
                raise OutputError(f"{target} lies inside the {name} ({source}); inputs are never modified.",
                                  hint="Write it somewhere outside the inputs.")
            if target.directory and (_within(source, where) or (_identity(where) or ()) in _identities(source)):
                raise OutputError(f"{target} contains the {name} ({source}); replacing it would delete an input.",
                                  hint="Choose a directory elsewhere.")
    for i, first in enumerate(targets):
        for second in targets[i + 1:]:
            a, b = first.path, second.path
            nested = (_within(a, b) and second.directory) or (_within(b, a) and first.directory)
            if a == b or nested:
                raise OutputError(f"{first} and {second} overlap; each output needs its own place.",
                                  hint="Write them to separate paths.")


def protected(inputs: dict[str, Path]) -> dict[str, Path]:
    """What no output may touch: the inputs given (a description → a directory), resolved, and the
    Hugging Face cache and safelora's own cache of Hub tensors as a whole, since Hub inputs are read
    from them."""
    from huggingface_hub import constants

    from safelora_cli.cache_dir import cache_root

    found = {"Hugging Face cache": Path(constants.HF_HUB_CACHE).expanduser().resolve(),
             "safelora cache": cache_root().resolve()}
    found.update({name: path.resolve() for name, path in inputs.items()})
    return found


def refuse_cache_in_inputs(inputs: dict[str, Path]) -> None:
    """The tensor cache is written when a Hub model is read by range: it must not lie at, inside or
    around a local input (SAFELORA_CACHE pointed at a model directory, say), or fetching would write there.

    Raises:
        InputError: naming the input and the variable.
    """
    from safelora_cli.cache_dir import CACHE_ENV, cache_root

    cache = cache_root().resolve()
    for name, path in inputs.items():
        source = path.resolve()
        if name.endswith("cache"):
            continue
        if cache == source or _within(cache, source) or _within(source, cache):
            where = "is" if cache == source else "lies inside" if _within(cache, source) else "contains"
            raise InputError(f"The safelora tensor cache {cache} {where} the {name} ({source}); fetching Hub "
                             "tensors would write into an input.",
                             hint=f"Point {CACHE_ENV} at a directory of its own.")


def plan_outputs(out: Path | None, force: bool, report_md: Path | None, plot: Path | None,
                 adapters: list[str], inputs: dict[str, Path],
                 replaceable: Callable[[Path], bool] = written_by_safelora) -> OutputPlan:
    """Check and name every path the run writes.

    Args:
        out: the patched adapter's directory (None for inspect); with several adapters, the
            directory holding one subdirectory per adapter.
        force: whether an existing output directory may be replaced (see the module docstring).
        report_md, plot: the optional side files; with several adapters, one plot each.
        adapters: the adapter specs, for the subdirectory names.
        inputs: what must never be written: a description → a resolved directory (see `protected`).
        replaceable: which existing non-empty `out` directory --force may replace.

    Raises:
        OutputError, UsageError: naming the path and what to do instead.
    """
    dirs: list[tuple[Path, str]] = []
    if out is not None and len(adapters) > 1 and out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory.", hint="Choose a new directory.")
    if out is not None:
        names = adapter_dir_names(adapters) if len(adapters) > 1 else []
        dirs = [(out, "--out")] if not names else [(out / n, f"--out/{n}") for n in names]
    sides: list[tuple[Path, str]] = [(report_md, "--report-md")] if report_md is not None else []
    if plot is not None:
        names = adapter_dir_names(adapters) if len(adapters) > 1 else []
        sides += [(plot, "--plot")] if not names else [(plot.with_name(f"{plot.stem}-{n}{plot.suffix}"), "--plot")
                                                       for n in names]
    for path, label in (*dirs, *sides):
        _check_name(path, label)
    found = [_resolved(path, label, i < len(dirs)) for i, (path, label) in enumerate((*dirs, *sides))]
    _check_against(found, inputs)
    md = [_side_file(t) for t in found[len(dirs):] if t.label == "--report-md"]
    return OutputPlan([_adapter_dir(t, force, replaceable) for t in found[:len(dirs)]], md[0] if md else None,
                      [_side_file(t) for t in found[len(dirs):] if t.label == "--plot"])
