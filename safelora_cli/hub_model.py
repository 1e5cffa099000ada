"""A Hub model as a `Checkpoint`: its needed tensors only (default), or its needed files whole.

SAFELORA_HUB_DOWNLOAD chooses: `tensors` (the default) reads safetensors layouts tensor by tensor
with range requests into our own cache (see `remote`); `full` downloads the index and each shard
holding a needed tensor whole, into the Hugging Face cache. Pickled layouts are always downloaded
whole (a pickle cannot be cut into tensors without reading it). A shard the Hugging Face cache
already holds is read from there either way, without any request.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

from safelora_cli import hub, remote
from safelora_cli.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    TensorInfo,
    open_checkpoint,
    read_index,
    shards_for,
)
from safelora_cli.errors import InputError, UsageError, format_keys

MODE_ENV = "SAFELORA_HUB_DOWNLOAD"
TENSORS, FULL = "tensors", "full"
RANGED_LAYOUTS = (INDEX_FILE, SINGLE_FILE)
RANGED = (SINGLE_FILE,)  # weight files looked for with a HEAD request, never downloaded whole
Needed = Callable[[Collection[str]], Collection[str]]


def download_mode() -> str:
    """`tensors` or `full`, from SAFELORA_HUB_DOWNLOAD (unset or empty: `tensors`).

    Raises:
        UsageError: any other value.
    """
    value = os.environ.get(MODE_ENV, "").strip().lower()
    if value in ("", TENSORS, FULL):
        return value or TENSORS
    raise UsageError(f"{MODE_ENV} is {os.environ[MODE_ENV]!r}; expected {TENSORS!r} or {FULL!r}.",
                     hint=f"Unset it (tensors only, the default), or set {MODE_ENV}=full to download whole files.")


def held_elsewhere(repo: hub.PinnedRepo) -> Callable[[str], bool]:
    """For `hub.first_present`: whether our cache holds a subset of a single-file weights file."""
    return lambda name: name in RANGED and remote.held(repo, name)


def whole_files(repo: hub.PinnedRepo, layout: str, needed: Needed, tally: hub.Tally) -> Checkpoint:
    """The layout file, and for an index the shards holding needed tensors, downloaded whole."""
    first = hub.download(repo, layout, tally)
    wanted: Collection[str] | None = None
    if layout.endswith(".index.json"):
        weight_map = read_index(first, repo.label)
        wanted = needed(weight_map.keys())
        for shard in shards_for(weight_map, wanted):
            remote.shard_path(repo, shard)  # a name that would leave the repository is refused first
            hub.download(repo, shard, tally)
    return open_checkpoint(first.parent, repo.label, needed=wanted)


def tensors_of(repo: hub.PinnedRepo, layout: str, needed: Needed, tally: hub.Tally) -> Checkpoint:
    """The needed tensors of a safetensors layout: from the Hugging Face cache where it holds a
    shard, else fetched by range into our cache."""
    weight_map: dict[str, str] = {}
    selections: dict[str, Needed] = {SINGLE_FILE: needed}
    if layout == INDEX_FILE:
        weight_map = read_index(hub.download(repo, INDEX_FILE, tally), repo.label)
        by_shard: dict[str, set[str]] = {}
        for name in needed(weight_map.keys()):
            if name in weight_map:
                by_shard.setdefault(weight_map[name], set()).add(name)
        selections = {shard: _chosen(names) for shard, names in by_shard.items()}
    for shard in selections:
        remote.shard_path(repo, shard)  # a name that would leave the repository is refused first
    local = {shard: path for shard in selections if (path := hub.cached_path(repo, shard)) is not None}
    fetched = remote.fetch(repo, {s: f for s, f in sorted(selections.items()) if s not in local}, tally)
    if fetched:
        _keep_config(repo)
    files = {**local, **{shard: subset.path for shard, subset in fetched.items()}}
    listed = {shard: subset.listed for shard, subset in fetched.items()}
    return _assemble(repo, weight_map, files, listed)


def _chosen(names: Collection[str]) -> Needed:
    """A selection that is `names` whatever the shard lists (the index already chose them)."""
    chosen = frozenset(names)
    return lambda _listed: chosen


def _keep_config(repo: hub.PinnedRepo) -> None:
    """A copy of config.json beside the subset files, where `open_checkpoint` looks for it."""
    source, target = hub.cached_path(repo, CONFIG_FILE), remote.commit_dir(repo) / CONFIG_FILE
    if source is None or target.is_file():
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".config.", suffix=".part")
        os.close(fd)
        shutil.copyfile(source, temp)
        os.replace(temp, target)
    except OSError as exc:
        raise InputError(f"Cannot write the tensor cache {target.parent}: {exc.strerror or exc}.",
                         hint=f"Make it writable, or point {remote.CACHE_ENV} at a writable directory.") from None


def _assemble(repo: hub.PinnedRepo, weight_map: dict[str, str], files: dict[str, Path],
              fetched_listed: dict[str, frozenset[str]]) -> Checkpoint:
    """One checkpoint from shard files of either cache; `listed` holds every name index and headers list."""
    label = repo.label
    tensors: dict[str, TensorInfo] = {}
    listed, quantization = set(weight_map), None
    for shard in sorted(files):
        part = open_checkpoint(files[shard], label)
        names = fetched_listed.get(shard, part.listed)
        listed |= names
        absent = sorted(k for k, s in weight_map.items() if s == shard and k not in names)
        if absent:
            raise InputError(f"The {label} index lists tensors its shards do not contain: {format_keys(absent)}.")
        tensors.update({k: v for k, v in part.tensors.items() if not weight_map or weight_map.get(k) == shard})
        quantization = quantization or part.quantization
    root = files[min(files)].parent if files else remote.commit_dir(repo)
    return Checkpoint(root, label, tensors, frozenset(listed), quantization)
