"""What a weights file that failed to open really is, from its first bytes.

A download that went wrong leaves something else under the right name: a git-lfs pointer (a
clone without `git lfs pull`), an HTML error or login page, a JSON error body, or a file cut
short. The libraries then report "invalid load key" or "header too large"; this module names the
real cause. It is only consulted after a file failed to open, so good files cost nothing.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

from safelora_cli.errors import InputError

_SAMPLE = 1024
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# Bytes that never occur in text files (NUL and the other C0 controls but \t \n \f \r and ESC).
_BINARY = set(range(32)) - {9, 10, 12, 13, 27}


def _text_kind(sample: bytes) -> str | None:
    """'HTML', 'JSON' or 'text' for a sample that decodes as UTF-8 text; None for binary data."""
    if any(byte in _BINARY for byte in sample):
        return None
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 3:  # a character cut at the end of the sample is still text
            return None
        text = sample[: exc.start].decode("utf-8")
    start = text.lstrip("\ufeff \t\r\n")[:15].lower()
    if start.startswith("<"):  # <!doctype html>, <html>, <?xml …>: a web page saved under the file's name
        return "HTML"
    if start.startswith(("{", "[")):
        return "JSON"
    return "text"


def _safetensors_layout(path: Path, size: int, head: bytes) -> str | None:
    """Why a file shaped like safetensors (u64 header length, then JSON) cannot be read, if we can say."""
    if size < 8:
        return f"is truncated: {size} bytes, fewer than the 8-byte header length of a safetensors file"
    (length,) = struct.unpack("<Q", head[:8])
    if length > size - 8:
        return f"is truncated or not safetensors: its header claims {length} bytes but the file holds {size - 8}"
    try:
        with open(path, "rb") as file:
            file.seek(8)
            header = json.loads(file.read(length))
        ends = [(entry["data_offsets"][1], name) for name, entry in header.items() if name != "__metadata__"]
        end, name = max(ends)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None  # not a header we can follow: the library's own message says more
    data = size - 8 - length
    if isinstance(end, int) and end > data:
        return (f"is truncated: tensor {name} ends at byte {end} of the data, but the file holds only {data} "
                "bytes of data")
    return None


def explain(path: Path, expected: str) -> InputError | None:
    """An error naming what `path` is, when that is not `expected` (e.g. "a safetensors file").

    Returns None when the first bytes say nothing more than the library did.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(_SAMPLE)
    except OSError:
        return None
    if size == 0:
        return InputError(f"{path} is empty (0 bytes), not {expected}.",
                          hint="The download or save was interrupted; fetch or save it again.")
    if head.startswith(_LFS_POINTER):
        return InputError(
            f"{path} is a git-lfs pointer, not the weights; fetch them with `git lfs pull`.",
            hint="Run git lfs install and git lfs pull in the clone, or download the repository with huggingface_hub.",
        )
    kind = _text_kind(head)
    if kind is not None:
        return InputError(f"{path} is a text file ({kind}), not {expected}.",
                          hint="An error page or a message was saved in place of the file; download it again.")
    if path.suffix == ".safetensors":
        reason = _safetensors_layout(path, size, head)
        if reason is not None:
            return InputError(f"{path} {reason}.", hint="Download or save the file again.")
    return None


def refuse_irregular(path: Path) -> None:
    """A named pipe, socket or device under a weights or config name would block or mislead a read.

    Raises:
        InputError: when `path` exists and is neither a regular file nor a directory.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's own check says which
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise InputError(f"{path} is {kind}, not a regular file.", hint="Pass the file itself.")
