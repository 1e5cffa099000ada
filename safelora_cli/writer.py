"""Write the patched adapter atomically: build it in a hidden directory beside the target,
verify it by reading it back, then rename it into place. Inputs are only ever read."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safelora_cli import __version__
from safelora_cli.adapter import WEIGHTS_NAME
from safelora_cli.errors import OutputError
from safelora_cli.report import REPORT_NAME, to_json
from safelora_cli.safetensors_io import read_all_tensors, write_safetensors

if TYPE_CHECKING:
    from safelora_cli.pipeline import Analysis

PROVENANCE_KEY = "safelora"


def check_output_target(out: Path, adapter: Path, force: bool) -> None:
    """Refuse an output that would overwrite or sit inside the input, or exists without --force."""
    out_abs, adapter_abs = out.resolve(), adapter.resolve()
    if out_abs == adapter_abs:
        raise OutputError(f"--out {out} is the input adapter directory.", hint="Choose a new directory.")
    if adapter_abs in out_abs.parents:
        raise OutputError(f"--out {out} lies inside the input adapter directory.", hint="Choose a directory elsewhere.")
    if out_abs in adapter_abs.parents:
        raise OutputError(f"--out {out} contains the input adapter; replacing it would delete the input.")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"--out {out} exists and is not a directory.")
        if not force:
            raise OutputError(f"--out {out} already exists.", hint="Pass --force to replace it, or choose another.")
    parent = _existing_parent(out_abs)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Permission denied: cannot create {out} in {parent}.")


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _os_error(exc: OSError, out: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"No space left on the device while writing {out}; nothing was written.",
                           hint="Free some space or choose another --out.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"Permission denied writing {out}; nothing was written.")
    return OutputError(f"Cannot write {out}: {exc.strerror or exc}; nothing was written.")


def _provenance(analysis: Analysis) -> str:
    config = analysis.config
    record = {
        "tool": f"safelora-cli {__version__}",
        "base": config.base,
        "aligned": config.aligned,
        "adapter": config.adapter,
        "settings": config.settings_record(),
        "projected_layers": sorted(r.plan.module for r in analysis.layers if r.selected),
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _copy_other_files(src: Path, dst: Path, skip: Path) -> None:
    """Copy the tree `src` into `dst`, except the file `skip` (the weights about to be rewritten)."""
    for entry in sorted(src.iterdir()):
        if entry == skip:
            continue
        if entry.is_dir() and skip.is_relative_to(entry):
            (dst / entry.name).mkdir()
            _copy_other_files(entry, dst / entry.name, skip)
        elif entry.is_dir():
            shutil.copytree(entry, dst / entry.name, symlinks=False)
        else:
            shutil.copy2(entry, dst / entry.name)


def _verify(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Read the written file back; any difference is a bug, not a user error."""
    written, _ = read_all_tensors(path)
    if written.keys() != expected.keys():
        raise RuntimeError(f"verification failed: {path} has other keys than were written")
    for key, tensor in expected.items():
        if written[key].dtype != tensor.dtype or not torch.equal(written[key], tensor):
            raise RuntimeError(f"verification failed: {key} in {path} differs from what was written")


def write_patched_adapter(analysis: Analysis, report: dict[str, Any]) -> Path:
    """Write adapter files, patched weights and report to `config.out`; return that path."""
    out = Path(analysis.config.out)  # type: ignore[arg-type]
    adapter = analysis.adapter
    tensors = {k: analysis.patched_b.get(k, v) for k, v in adapter.tensors.items()}
    metadata = {**adapter.metadata, "format": "pt", PROVENANCE_KEY: _provenance(analysis)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        staging.chmod(0o777 & ~_current_umask())  # mkdtemp makes it 0700; a plain mkdir would not
    except OSError as exc:
        raise _os_error(exc, out) from None
    try:
        # A named adapter (a subfolder) is written at the same place in a copy of the whole directory.
        root = adapter.root or adapter.path
        weights = staging / adapter.path.relative_to(root) / WEIGHTS_NAME
        _copy_other_files(root, staging, adapter.path / WEIGHTS_NAME)
        write_safetensors(weights, tensors, metadata)
        (staging / REPORT_NAME).write_text(to_json(report), encoding="utf-8")
        _verify(weights, tensors)
        _replace_dir(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _os_error(exc, out) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an existing `out` (allowed by --force) is moved aside first."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
