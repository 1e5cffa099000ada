"""Write a patched adapter: build it in a staging directory beside the target, verify it by
reading it back, then put it in place (see `placement`). Inputs are only ever read.

Of the adapter directory's other files only regular files are copied, and links that stay
inside the adapter (a Hub snapshot's links into its own blob store count as inside). Other
links and special files (FIFOs, devices, sockets) are never opened: they are skipped, and the
report lists them, so nothing outside the adapter can leak into an output meant for publishing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from safelora_cli.adapter import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, Adapter
from safelora_cli.card import model_card
from safelora_cli.errors import InputError
from safelora_cli.outputs import REPORT_NAME, Target
from safelora_cli.placement import write_directory
from safelora_cli.report import Report, text_of_path, to_json
from safelora_cli.safetensors_io import StoredTensor, open_safetensors, read_stored, read_tensor, write_safetensors

PROVENANCE_KEY = "safelora"
MODEL_CARD = "README.md"


@dataclass(frozen=True)
class FileCopy:
    source: Path  # what to read (a link already resolved)
    relative: Path  # where it goes in the output


@dataclass(frozen=True)
class CopyPlan:
    files: list[FileCopy]
    directories: list[Path]  # relative, parents first
    skipped: list[dict[str, str]]  # {"path": relative, "reason": ...}


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


# Folders of version control and download tools: their history holds the unpatched weights, and
# their config can hold credentials (a remote URL with a token), so they never go into an output.
SKIPPED_FOLDERS = frozenset({".git", ".hg", ".svn", ".cache", ".huggingface"})


def _link_target(entry: Path, roots: tuple[Path, ...], weights: set[Path], config: Path) -> tuple[Path | None, str]:
    """Where a link in the adapter leads, if it may be copied; else why not."""
    try:
        target = entry.resolve(strict=True)
    except (OSError, RuntimeError):
        return None, "a symbolic link that leads nowhere (dangling, or a loop)"
    if target in weights:
        return None, "a symbolic link to the unpatched weights"
    if target.is_dir():
        return None, "a symbolic link to a directory"
    if not stat.S_ISREG(os.stat(target).st_mode):
        return None, "a symbolic link to something that is not a regular file"
    if _inside(target, roots) or entry.absolute() == config:  # the config was read as the adapter's own
        return target, ""
    return None, "a symbolic link to outside the adapter"


def _skip(relative: Path, reason: str) -> dict[str, str]:
    return {"path": text_of_path(relative), "reason": reason}


def plan_copy(adapter: Adapter, link_roots: tuple[Path, ...] = ()) -> CopyPlan:
    """What of the adapter directory goes into the output, and what is skipped and why.

    The weights files are left out (they are rewritten; an input `.bin` is not copied, since an
    unpatched pickle beside the patched weights is what some loaders would pick).

    Raises:
        InputError: a folder of the adapter cannot be listed.
    """
    root = (adapter.root or adapter.path).absolute()
    roots = (root.resolve(), *(r.resolve() for r in link_roots))
    chosen = adapter.path.absolute()
    weights = {p for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) for p in (chosen / name, (chosen / name).resolve())}
    files: list[FileCopy] = []
    directories: list[Path] = []
    skipped: list[dict[str, str]] = []
    pending = [root]
    while pending:
        folder = pending.pop(0)
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            raise InputError(f"Cannot list {folder} of the adapter: {exc.strerror or exc}.",
                             hint="Make it readable, or remove it from the adapter directory.") from None
        for entry in entries:
            relative = entry.relative_to(root)
            if entry in weights:
                continue
            mode = os.lstat(entry).st_mode
            if stat.S_ISLNK(mode):
                target, reason = _link_target(entry, roots, weights, chosen / CONFIG_NAME)
                if target is not None:
                    files.append(FileCopy(target, relative))
                else:
                    skipped.append(_skip(relative, reason))
            elif stat.S_ISDIR(mode) and entry.name in SKIPPED_FOLDERS:
                skipped.append(_skip(relative, "a version-control or download-tool folder"))
            elif stat.S_ISDIR(mode):
                directories.append(relative)
                pending.append(entry)
            elif stat.S_ISREG(mode):
                files.append(FileCopy(entry, relative))
            else:
                skipped.append(_skip(relative, "not a regular file"))
    return CopyPlan(files, directories, skipped)


def provenance(tool: str, inputs: dict[str, str | None], settings: dict[str, object], projected: list[str]) -> str:
    record = {"tool": tool, **inputs, "settings": settings, "projected_layers": sorted(projected)}
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


Planned = Mapping[str, torch.Tensor | StoredTensor]  # what write_safetensors writes


def _expected(value: torch.Tensor | StoredTensor) -> torch.Tensor:
    return read_stored(value) if isinstance(value, StoredTensor) else value


def _same_bytes(first: torch.Tensor, second: torch.Tensor, chunk: int = 8 << 20) -> bool:
    """Bytes, not values: NaN in an untouched tensor is not equal to itself, and some dtypes
    (float4) have no comparison at all. Compared as `bytes` a chunk at a time: a memcmp, where
    `torch.equal` on uint8 runs at a few hundred MB/s."""
    a = first.contiguous().reshape(-1).view(torch.uint8).numpy()
    b = second.contiguous().reshape(-1).view(torch.uint8).numpy()
    return len(a) == len(b) and all(a[i:i + chunk].tobytes() == b[i:i + chunk].tobytes()
                                    for i in range(0, len(a), chunk))


def _verify(path: Path, expected: Planned) -> None:
    """Read the written file back a tensor at a time, each against its source (a patched tensor, or
    the input file's bytes read again): any difference is a bug, not a user error."""
    with open_safetensors(path) as handle:
        if set(handle.keys()) != set(expected):
            raise RuntimeError(f"verification failed: {path} has other keys than were written")
        for key in sorted(expected):
            written, tensor = read_tensor(handle, key, path), _expected(expected[key])
            if not (written.dtype == tensor.dtype and written.shape == tensor.shape and _same_bytes(written, tensor)):
                raise RuntimeError(f"verification failed: {key} in {path} differs from what was written")


def _copy_file(source: Path, target: Path, chunk: int = 8 << 20) -> None:
    """Copy in chunks (an adapter directory may hold large files), telling a failure to read the
    input (the adapter's problem) from a failure to write the output (an OSError for the caller)."""

    def unreadable(exc: OSError) -> InputError:
        return InputError(f"Cannot read {source} of the adapter: {exc.strerror or exc}; nothing was written.")

    try:
        reader = open(source, "rb")  # noqa: SIM115 - closed below, after the copy
    except OSError as exc:
        raise unreadable(exc) from None
    with reader, open(target, "wb") as writer:
        while True:
            try:
                data = reader.read(chunk)
            except OSError as exc:
                raise unreadable(exc) from None
            if not data:
                break
            writer.write(data)
    shutil.copymode(source, target)


def _build(staging: Path, adapter: Adapter, patched: dict[str, torch.Tensor], copy: CopyPlan, report: Report,
           provenance_record: str, title: str) -> None:
    for directory in copy.directories:
        (staging / directory).mkdir()
    for item in copy.files:
        _copy_file(item.source, staging / item.relative)
    # A named adapter (a subfolder) is written at the same place in a copy of the whole directory.
    root = adapter.root or adapter.path
    weights = staging / adapter.path.relative_to(root) / WEIGHTS_NAME
    # Untouched tensors are copied from the input file's bytes as the file is written, not loaded.
    tensors = {k: patched[k] if k in patched else adapter.tensors.source(k) for k in adapter.tensors}
    metadata = {**adapter.metadata, "format": "pt", PROVENANCE_KEY: provenance_record}
    # PEFT keeps one model card at the top of the directory, also for named adapters. The copy in
    # staging is ours to change; the input's README.md is never opened for writing.
    card = staging / MODEL_CARD
    existing = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None
    card.write_text(model_card(existing, report, title), encoding="utf-8")
    write_safetensors(weights, tensors, metadata)
    (staging / REPORT_NAME).write_text(to_json(report), encoding="utf-8")
    _verify(weights, tensors)


def write_patched_adapter(target: Target, adapter: Adapter, patched: dict[str, torch.Tensor], copy: CopyPlan,
                          report: Report, provenance_record: str, title: str) -> Path:
    """Write the adapter files, patched weights, report and card to `target`; return its path.

    Raises:
        OutputError: when it cannot be written, or something else appeared at the target;
            nothing is left behind (staging and any parent directories created are removed).
    """
    out = target.path
    write_directory(out, target.existed, target.label,
                    lambda staging: _build(staging, adapter, patched, copy, report, provenance_record, title))
    return out
