"""Putting a finished output in place without ever clobbering what appeared there meanwhile.

An output is built in a staging directory `.NAME.partial-PID-XXXXXXXX` beside its target and
renamed into place at the end. The rename never replaces: on Linux it is `renameat2` with
RENAME_NOREPLACE (Python's os.rename silently replaces an empty directory), elsewhere a check
just before a plain rename. A forced replacement moves the old output aside to
`.NAME.old-PID-…` first, and moves it back if the new one cannot be placed.

A run killed outright (SIGKILL, power loss) cannot clean up; the next run writing the same
target removes the staging directories of processes that are gone, and puts back an old
output that was moved aside and never replaced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safelora_cli.errors import OutputError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _libc_renameat2():  # type: ignore[no-untyped-def]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError):
        return None


_RENAMEAT2 = _libc_renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; FileExistsError when anything exists at `dst`."""
    if _RENAMEAT2 is not None:
        result = _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this file system lacks the flag
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def staging_stem(name: str) -> str:
    """The part of a staging name that stands for the target: the name, or a short stand-in for a
    long one, so that a legal 250-byte name still leaves room for the suffix."""
    if len(os.fsencode(name)) <= 160:
        return name
    return f"{name[:40]}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_parents(path: Path) -> list[Path]:
    """Create the missing parents of `path`; return those created, outermost first."""
    missing = []
    parent = path.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir()
    return list(reversed(missing))


def remove_created(directories: list[Path]) -> None:
    """Remove directories a failed run created, innermost first, if they are still empty."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return


def make_staging(target: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{staging_stem(target.name)}.partial-{os.getpid()}-",
                                    dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; a plain mkdir would not
    return staging


def place(staging: Path, target: Path, existed: tuple[int, int] | None, label: str) -> None:
    """Move `staging` to `target`. `existed`: the identity of the directory the checks allowed
    replacing (None: the target must still be absent).

    Raises:
        OutputError: something else now stands at the target; nothing was replaced.
    """
    changed = OutputError(f"{label} {target} changed while this run was writing (another run?); nothing was "
                          "replaced.", hint="Run again once the other run has finished.")
    if existed is None:
        try:
            rename_noreplace(staging, target)
        except FileExistsError:
            raise changed from None
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise changed from None
            raise
        return
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        raise changed from None
    if (info.st_dev, info.st_ino) != existed:
        raise changed
    old = Path(tempfile.mkdtemp(prefix=f".{staging_stem(target.name)}.old-{os.getpid()}-", dir=target.parent))
    aside = old / "previous"
    os.rename(target, aside)
    try:
        rename_noreplace(staging, target)
    except BaseException as exc:  # a signal or Ctrl-C here too: the previous output goes back
        try:
            rename_noreplace(aside, target)
            old.rmdir()
        except OSError:
            raise OutputError(f"Could not place {label} {target}, nor put the previous output back; it is "
                              f"in {aside}.", hint="Move it back by hand.") from None
        if isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise changed from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_directory(target: Path, existed: tuple[int, int] | None, label: str, build: Callable[[Path], None]) -> None:
    """Fill a staging directory with `build(staging)` and put it at `target`: whole, or not at all.

    On any failure the staging directory and the parents made for `target` are removed.

    Raises:
        OutputError: a write failed (disk full, permissions) or something else now stands at `target`.
    """
    created: list[Path] = []
    staging: Path | None = None
    placed = False
    try:
        created = make_parents(target)
        remove_stale_staging(target)
        staging = make_staging(target)
        build(staging)
        place(staging, target, existed, label)
        placed = True
    except OSError as exc:
        raise os_error(exc, target) from None
    finally:
        if not placed:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            remove_created(created)


def _owner(name: str, stem: str) -> tuple[str, int] | None:
    match = re.fullmatch(rf"\.{re.escape(stem)}\.(partial|old)-(\d+)-.+", name)
    return (match.group(1), int(match.group(2))) if match else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def remove_stale_staging(target: Path) -> list[Path]:
    """Clean up after killed runs that wrote `target`; return what was removed or restored.

    Only directories named by this module for this target and whose process no longer exists
    are touched, so a concurrent run's staging directory is left alone. A previous output moved
    aside by a killed forced run is put back when nothing has taken its place.
    """
    handled = []
    stem = staging_stem(target.name)
    for entry in sorted(target.parent.glob(f".{_glob_escape(stem)}.*-*")):
        owner = _owner(entry.name, stem)
        if owner is None or owner[1] == os.getpid() or not entry.is_dir() or entry.is_symlink():
            continue
        if _process_alive(owner[1]):
            continue
        previous = entry / "previous"
        if owner[0] == "old" and previous.is_dir() and not os.path.lexists(target):
            try:
                rename_noreplace(previous, target)
            except OSError:
                continue
        shutil.rmtree(entry, ignore_errors=True)
        handled.append(entry)
    return handled


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file beside it, then rename).

    Raises:
        OSError: when the file cannot be written; no partial file is left.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{staging_stem(path.name)}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; a plain open would not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def os_error(exc: OSError, target: Path) -> OutputError:
    """A write failure as one line naming the target."""
    if exc.errno == errno.ENOSPC:
        return OutputError(f"No space left on the device while writing {target}; nothing was written.",
                           hint="Free some space or choose another location.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"Permission denied writing {target}; nothing was written.")
    if exc.errno == errno.ENAMETOOLONG:
        return OutputError(f"A name under {target} is too long for the file system; nothing was written.",
                           hint="Choose a shorter name.")
    return OutputError(f"Cannot write {target}: {exc.strerror or exc}; nothing was written.")
