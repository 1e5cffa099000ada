"""Write the patched adapter atomically: build it in a hidden directory beside the target,
verify it by reading it back, then rename it into place. Inputs are only ever read.

The staging directory is `.NAME.partial-PID-XXXX` beside `--out`. A run killed outright
(SIGKILL, power loss) cannot remove it; the next run writing the same `--out` removes those
whose process is gone, and leaves alone those of a run still in progress.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safelora_cli import __version__
from safelora_cli.adapter import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from safelora_cli.errors import OutputError
from safelora_cli.report import REPORT_NAME, to_json, to_markdown
from safelora_cli.safetensors_io import open_safetensors, read_tensor, write_safetensors

if TYPE_CHECKING:
    from safelora_cli.pipeline import Analysis

PROVENANCE_KEY = "safelora"
MODEL_CARD = "README.md"
# The model card section is fenced so that patching a patched adapter replaces it instead of stacking.
CARD_BEGIN = "<!-- safelora:begin -->"
CARD_END = "<!-- safelora:end -->"
# Written when the input adapter has no README.md; names no path, so outputs stay reproducible.
_NEW_CARD = "---\nlibrary_name: peft\ntags:\n- lora\n- safe-lora\n---\n\n# LoRA adapter\n\nA PEFT LoRA adapter.\n"


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
    if not parent.is_dir():
        raise OutputError(f"--out {out}: {parent} is a file, not a directory.", hint="Choose another --out.")
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
        # The output's weights are always adapter_model.safetensors; an input .bin is not copied,
        # since an unpatched pickle beside the patched weights is what some loaders would pick.
        if entry in (skip, skip.with_name(LEGACY_WEIGHTS_NAME)):
            continue
        if entry.is_dir() and skip.is_relative_to(entry):
            (dst / entry.name).mkdir()
            _copy_other_files(entry, dst / entry.name, skip)
        elif entry.is_dir():
            shutil.copytree(entry, dst / entry.name, symlinks=False)
        else:
            shutil.copy2(entry, dst / entry.name)


def _verify(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Read the written file back, a tensor at a time; any difference is a bug, not a user error."""
    with open_safetensors(path) as handle:
        if set(handle.keys()) != expected.keys():
            raise RuntimeError(f"verification failed: {path} has other keys than were written")
        for key, tensor in expected.items():
            written = read_tensor(handle, key, path)
            if written.dtype != tensor.dtype or not torch.equal(written, tensor):
                raise RuntimeError(f"verification failed: {key} in {path} differs from what was written")


def write_patched_adapter(analysis: Analysis, report: dict[str, Any]) -> Path:
    """Write adapter files, patched weights and report to `config.out`; return that path."""
    out = Path(analysis.config.out)  # type: ignore[arg-type]
    adapter = analysis.adapter
    tensors = {k: analysis.patched_b.get(k, v) for k, v in adapter.tensors.items()}
    metadata = {**adapter.metadata, "format": "pt", PROVENANCE_KEY: _provenance(analysis)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        staging.chmod(0o777 & ~_current_umask())  # mkdtemp makes it 0700; a plain mkdir would not
    except OSError as exc:
        raise _os_error(exc, out) from None
    try:
        # A named adapter (a subfolder) is written at the same place in a copy of the whole directory.
        root = adapter.root or adapter.path
        weights = staging / adapter.path.relative_to(root) / WEIGHTS_NAME
        _copy_other_files(root, staging, adapter.path / WEIGHTS_NAME)
        # PEFT keeps one model card at the top of the directory, also for named adapters.
        _write_model_card(staging / MODEL_CARD, report)
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
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def model_card(existing: str | None, report: dict[str, Any]) -> str:
    """The adapter's README.md with its Safe LoRA section added (or replaced, when re-patched)."""
    card = existing if existing is not None else _NEW_CARD
    if CARD_BEGIN in card and CARD_END in card.split(CARD_BEGIN, 1)[1]:
        before, rest = card.split(CARD_BEGIN, 1)
        card = before + rest.split(CARD_END, 1)[1].lstrip("\n")
    return f"{card.rstrip()}\n\n{CARD_BEGIN}\n{to_markdown(report)}{CARD_END}\n"


def _write_model_card(path: Path, report: dict[str, Any]) -> None:
    # The copy in staging is ours to change; the input's README.md is never opened for writing.
    existing = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    path.write_text(model_card(existing, report), encoding="utf-8")


def _staging_owner(name: str, out_name: str) -> int | None:
    match = re.fullmatch(rf"\.{re.escape(out_name)}\.(?:partial|old)-(\d+)-.+", name)
    return int(match.group(1)) if match else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete staging directories for `out` left by runs that were killed; return them.

    Only directories named by this writer for this `out` and whose process no longer exists
    are removed, so a concurrent run's staging directory is never touched.
    """
    removed = []
    for entry in sorted(out.parent.glob(f".{glob_escape(out.name)}.*-*")):
        pid = _staging_owner(entry.name, out.name)
        if pid is None or pid == os.getpid() or not entry.is_dir() or entry.is_symlink():
            continue
        if not _process_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters made literal."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_file_target(path: Path, option: str, inputs: tuple[str, ...]) -> None:
    """Refuse a `--report-md`/`--plot` file that is a directory or would land inside an input.

    Raises:
        OutputError: naming the option and what to do instead.
    """
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; expected a file name.", hint="Add a file name.")
    target = path.resolve()
    for spec in inputs:
        source = Path(spec).expanduser()
        if source.exists() and (target == source.resolve() or source.resolve() in target.parents):
            raise OutputError(f"{option} {path} lies inside the input {spec}; inputs are never modified.",
                              hint="Write it elsewhere.")
    parent = _existing_parent(target)
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Permission denied: cannot create {path} in {parent}.")


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file beside it, then rename).

    Raises:
        OutputError: when the file cannot be written (disk full, permissions); no partial file is left.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    except OSError as exc:
        raise _os_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it 0600; a plain open would not
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _os_error(exc, path) from None
