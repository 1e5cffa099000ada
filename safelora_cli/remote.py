"""Only the needed tensors of a Hub model, fetched as byte ranges into subset files of our own cache.

Per shard: the safetensors header is read with two range requests (its length, then its JSON),
then only the needed tensors' byte ranges are fetched (neighbours coalesced into one request) and
written, bytes unchanged, into a subset safetensors file (see `subset`) under
`<cache>/hub/models--<org>--<name>/<commit>/<shard>`. The rest of the code reads those files like
any checkpoint. A later run needing more tensors of a shard fetches only the missing ones and
rewrites the subset; one needing nothing new makes no request. Files are written to a temporary
name and renamed only once every shard of the model arrived whole, so a failed fetch caches nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from safelora_cli import ranges
from safelora_cli.cache_dir import CACHE_ENV, cache_root
from safelora_cli.errors import InputError
from safelora_cli.hub import PinnedRepo, Tally
from safelora_cli.subset import Header, header_length, parse_header, plan_subset, read_subset

# Ranges closer than this are fetched as one request: fewer round trips for a few wasted bytes
# (a layer norm between two projections, say).
GAP = 64 * 1024
_COPY = 16 << 20
Select = Callable[[Collection[str]], Collection[str]]


def commit_dir(repo: PinnedRepo) -> Path:
    """Where the subset files of one commit of a repository live."""
    return cache_root() / "hub" / f"models--{repo.repo_id.replace('/', '--')}" / repo.commit


def shard_path(repo: PinnedRepo, shard: str) -> Path:
    """The subset file of `shard`; a name that would leave the commit's folder is refused."""
    parts = PurePosixPath(shard).parts
    if not parts or PurePosixPath(shard).is_absolute() or any(p in ("..", ".") for p in parts) or "\\" in shard:
        raise InputError(f"The {repo.label} repository {repo.repo_id} names a shard {shard!r} outside the repository.",
                         hint="Check the repository's model.safetensors.index.json; pass a repository with a sound "
                         "index.")
    return commit_dir(repo).joinpath(*parts)


@dataclass(frozen=True)
class Subset:
    """A shard's subset file, and every tensor name the shard itself holds."""

    path: Path
    listed: frozenset[str]


@dataclass(frozen=True)
class _Pending:
    """A subset file written under a temporary name, renamed once all shards arrived."""

    temp: Path
    final: Path


def held(repo: PinnedRepo, shard: str) -> bool:
    """Whether our cache holds a readable subset file of `shard` (no request)."""
    try:
        read_subset(shard_path(repo, shard))
    except (OSError, ValueError):
        return False
    return True


def _cached(path: Path) -> tuple[Header, Header] | None:
    """The subset file's own and shard headers; None when absent, truncated or garbled (refetched)."""
    try:
        return read_subset(path)
    except (OSError, ValueError):
        return None


def _remote_header(repo: PinnedRepo, shard: str, tally: Tally) -> Header:
    """The shard's header, read with two range requests and checked like a local file's."""
    buffer = bytearray()

    def sink(_offset: int, chunk: bytes) -> None:
        buffer.extend(chunk)

    total = ranges.read_range(repo, shard, 0, 8, sink, tally)
    try:
        length = header_length(bytes(buffer), total)
        buffer.clear()
        ranges.read_range(repo, shard, 8, 8 + length, sink, tally)
        return parse_header(bytes(buffer), None if total is None else total - 8 - length)
    except ValueError as exc:
        raise InputError(f"{shard} in the {repo.label} repository {repo.repo_id} (commit {repo.commit[:12]}) is not a "
                         f"valid safetensors file: {exc}.", hint="Check the file on the Hub; pass a repository with "
                         "intact safetensors weights.") from None


def coalesce(origin: Header, names: Collection[str], gap: int | None = None) -> list[tuple[int, int, list[str]]]:
    """The data ranges (begin, end, tensors) to fetch for `names`, neighbours within `gap` (default
    `GAP`) merged."""
    gap = GAP if gap is None else gap
    runs: list[tuple[int, int, list[str]]] = []
    for name in sorted(names, key=lambda n: origin.tensors[n].begin):
        entry = origin.tensors[name]
        if runs and entry.begin - runs[-1][1] <= gap:
            begin, _, members = runs[-1]
            runs[-1] = (begin, max(entry.end, runs[-1][1]), [*members, name])
        else:
            runs.append((entry.begin, entry.end, [name]))
    return runs


def _fill(fd: int, repo: PinnedRepo, shard: str, origin: Header, missing: Collection[str],
          positions: dict[str, int], tally: Tally) -> None:
    """Fetch `missing` tensors' bytes into the open subset file at their positions."""
    for begin, end, members in coalesce(origin, missing):
        spans = [(origin.tensors[n].begin, origin.tensors[n].end, positions[n]) for n in members]

        def sink(offset: int, chunk: bytes, spans: list[tuple[int, int, int]] = spans) -> None:
            at = offset - origin.data_start  # position in the data section
            for first, last, target in spans:
                low, high = max(first, at), min(last, at + len(chunk))
                if low < high:
                    os.pwrite(fd, chunk[low - at:high - at], target + low - first)

        ranges.read_range(repo, shard, origin.data_start + begin, origin.data_start + end, sink, tally)


def _copy(fd: int, source: Path, own: Header, positions: dict[str, int]) -> None:
    """Copy the tensors a previous subset file already holds into the new one."""
    with open(source, "rb") as old:
        for name, entry in own.tensors.items():
            done = 0
            while done < entry.size:
                chunk = os.pread(old.fileno(), min(_COPY, entry.size - done), own.data_start + entry.begin + done)
                if not chunk:
                    raise ValueError(f"{source} ended early")
                os.pwrite(fd, chunk, positions[name] + done)
                done += len(chunk)


def _write(repo: PinnedRepo, shard: str, path: Path, origin: Header, wanted: set[str],
           cached: tuple[Header, Header] | None, tally: Tally) -> _Pending:
    """A new subset file (temporary name) holding `wanted` and what the old one held."""
    have = set(cached[0].tensors) if cached else set()
    layout = plan_subset(origin, have | wanted)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.write(fd, layout.header)
        os.ftruncate(fd, layout.size)
        if cached:
            _copy(fd, path, cached[0], layout.positions)
        _fill(fd, repo, shard, origin, wanted - have, layout.positions, tally)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    return _Pending(Path(temp), path)


def fetch(repo: PinnedRepo, selections: dict[str, Select], tally: Tally) -> dict[str, Subset]:
    """Subset files of the shards in `selections` (shard → which of its tensor names are needed).

    Raises:
        HubError: offline with tensors missing, or the Hub failing or answering short.
        InputError: a shard that is not valid safetensors, a shard name outside the repository,
            or our cache not writable.
    """
    found: dict[str, Subset] = {}
    pending: list[_Pending] = []
    try:
        for shard, select in selections.items():
            path = shard_path(repo, shard)
            cached = _cached(path)
            origin = cached[1] if cached else _remote_header(repo, shard, tally)
            wanted = set(select(origin.tensors.keys())) & origin.tensors.keys()
            if cached is None or not wanted <= cached[0].tensors.keys():
                pending.append(_write(repo, shard, path, origin, wanted, cached, tally))
            found[shard] = Subset(path, frozenset(origin.tensors))
        for item in pending:
            os.replace(item.temp, item.final)
    except OSError as exc:
        raise InputError(f"Cannot write the tensor cache {commit_dir(repo)}: {exc.strerror or exc}.",
                         hint=f"Make it writable, or point {CACHE_ENV} at a writable directory.") from None
    finally:
        for item in pending:
            if item.temp.exists():
                item.temp.unlink()
    return found
