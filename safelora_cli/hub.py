"""The module that talks to the Hugging Face Hub (with `ranges`, for byte ranges of a file), and the
one place its errors are mapped.

Everything goes through huggingface_hub, so HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_TOKEN and a saved login behave as they do for transformers. A repository is pinned once
(its revision resolved to a commit) and every file is then fetched at that commit: files come
from one consistent snapshot, and a cached file costs no request at all on later runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.utils import tqdm

from safelora_cli.errors import InputError

_TOKEN_HINT = "pass a token with --token, set HF_TOKEN, or run `hf auth login`"


class HubError(InputError):
    """A Hub repository, revision or file cannot be had (or not without a token or network)."""


@dataclass(frozen=True)
class PinnedRepo:
    """A Hub model repository at the commit its requested revision resolved to."""

    repo_id: str
    label: str
    revision: str | None
    commit: str
    token: str | None = field(default=None, repr=False)


@dataclass
class Tally:
    """Bytes one input fetched from the Hub, summed over its requests (a running sum, so not frozen)."""

    bytes: int = 0


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence huggingface_hub's own warnings and log lines ("Could not reach the Hub … using the
    cached commit") during a call: this module reports every problem itself, once, and `--quiet`
    must mean quiet. Hub calls run on the main thread only, so the global state is safe to swap."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def unreachable(label: str, repo_id: str, what: str) -> HubError:
    # Only the first call (resolving the revision) can be mistaken for a local path.
    local = ", nor a local path" if what.startswith("revision") else ""
    if constants.is_offline_mode():
        return HubError(
            f"The {label} {what} of {repo_id} is not in the local cache ({constants.HF_HUB_CACHE}){local}, "
            "and HF_HUB_OFFLINE is set.",
            hint="Run once with network access (unset HF_HUB_OFFLINE) to download it, or point HF_HUB_CACHE "
            "(or HF_HOME) at the cache that holds it.",
        )
    return HubError(
        f"Cannot reach the Hub at {constants.ENDPOINT} to fetch the {label} {what} of {repo_id}, and it is not "
        f"in the local cache{local}.",
        hint="Check the network (and HF_ENDPOINT, proxies); to use only the cache, set HF_HUB_OFFLINE=1.",
    )


@contextlib.contextmanager
def hub_errors(label: str, repo_id: str, revision: str | None, what: str) -> Iterator[None]:
    """Turn huggingface_hub failures into one-line `HubError`s (most specific class first).

    Args:
        label: 'base', 'aligned' or 'adapter'.
        repo_id: the repository asked for.
        revision: the revision asked for, for messages.
        what: what was being fetched ("revision", "file config.json"), for messages.
    """
    option = "--adapter" if label == "adapter" else f"--{label}"
    try:
        with quiet():
            yield
    except GatedRepoError:
        raise HubError(
            f"The {label} repository {repo_id} is gated and this request is not authorised to read it.",
            hint=f"Accept its conditions on the Hub page of {repo_id}, then {_TOKEN_HINT}.",
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"The {label} repository {repo_id} was not found on the Hub ({constants.ENDPOINT}), nor as a local path.",
            hint=f"Check the id given to {option}; if the repository is private, {_TOKEN_HINT}.",
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"Revision {revision!r} does not exist in the {label} repository {repo_id}.",
            hint=f"Pass an existing branch, tag or commit with {option}-revision (or {repo_id}@REVISION).",
        ) from None
    except (LocalEntryNotFoundError, RevisionResolutionError):
        raise unreachable(label, repo_id, what) from None
    except EntryNotFoundError:
        raise HubError(
            f"The {label} repository {_where(repo_id, revision)} has no {what}.",
            hint="Check the repository's files on the Hub: it may hold another layout or be incomplete.",
        ) from None
    except (httpx2.TransportError, OfflineModeIsEnabled):
        raise unreachable(label, repo_id, what) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(
            f"The Hub answered HTTP {status} for the {label} {what} of {repo_id}.",
            hint="Retry later; if it persists, check HF_ENDPOINT and the repository's page.",
        ) from None


def pin(repo_id: str, revision: str | None, token: str | None, label: str) -> PinnedRepo:
    """Resolve `revision` (default branch when None) to a commit, once; offline from the cache."""
    with hub_errors(label, repo_id, revision, "revision " + (revision or constants.DEFAULT_REVISION)):
        resolved = HfApi().resolve_revision(repo_id, revision=revision, token=token)
    return PinnedRepo(repo_id, label, revision, resolved.resolved, token)


def cached_path(repo: PinnedRepo, filename: str) -> Path | None:
    """The file of the pinned commit if the Hugging Face cache holds it (no request); else None."""
    with quiet():
        entry = try_to_load_from_cache(repo.repo_id, filename, revision=repo.commit)
    return Path(entry) if isinstance(entry, str) else None


def download(repo: PinnedRepo, filename: str, tally: Tally | None = None) -> Path:
    """One file of the pinned commit, from the cache or downloaded into it (its size then added to `tally`)."""
    cached = cached_path(repo, filename)
    if cached is not None:
        return cached
    with hub_errors(repo.label, repo.repo_id, repo.revision, f"file {filename}"):
        path = Path(hf_hub_download(repo.repo_id, filename, revision=repo.commit, token=repo.token))
    if tally is not None:
        tally.bytes += path.stat().st_size
    return path


def _exists_remotely(repo: PinnedRepo, name: str) -> bool:
    """Whether the pinned commit holds `name`, asked with one HEAD request (nothing downloaded)."""
    url = hf_hub_url(repo.repo_id, name, revision=repo.commit)
    with hub_errors(repo.label, repo.repo_id, repo.revision, f"file {name}"):
        try:
            get_hf_file_metadata(url, token=repo.token)
        except EntryNotFoundError:
            return False
    return True


def first_present(repo: PinnedRepo, names: Sequence[str], tally: Tally | None = None, *,
                  probe: Collection[str] = (), elsewhere: Callable[[str], bool] | None = None) -> str | None:
    """The first of `names` the pinned commit holds, downloading it; None when it holds none.

    The cache is asked first (a file cached, or cached as absent, costs no request), so a
    second run with everything cached makes no request at all. Offline, the first cached
    name wins. Names in `probe` are large files that are only looked for (HEAD), not
    downloaded; `elsewhere(name)` says a name is known present from another cache.

    Raises:
        HubError: offline with none of `names` cached, or any Hub failure but "no such file".
    """
    offline, unknown = constants.is_offline_mode(), False
    for name in names:
        with quiet():
            entry = try_to_load_from_cache(repo.repo_id, name, revision=repo.commit)
        if isinstance(entry, str) or (elsewhere is not None and elsewhere(name)):
            return name
        # The documented results are a path (cached), None (unknown) or a sentinel object meaning
        # "cached as absent"; the sentinel's name is private, so it is recognised as "neither".
        if entry is not None:
            continue
        unknown = True
        if offline:
            continue
        if name in probe:
            if _exists_remotely(repo, name):
                return name
            continue
        with hub_errors(repo.label, repo.repo_id, repo.revision, f"file {name}"):
            try:
                path = hf_hub_download(repo.repo_id, name, revision=repo.commit, token=repo.token)
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError:
                continue  # not in this commit: try the next layout
        if tally is not None:
            tally.bytes += os.path.getsize(path)
        return name
    if offline and unknown:
        raise unreachable(repo.label, repo.repo_id, "checkpoint files")
    return None


class _NoFileCountBar(tqdm):
    """snapshot_download's "Fetching N files" bar says nothing useful; byte bars of downloads stay."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})


def snapshot_top_level(repo: PinnedRepo, skip: Sequence[str] = (), tally: Tally | None = None) -> Path:
    """The files at the top of the pinned commit (no subfolders, none of `skip`) as one folder.

    `tally` gets the sizes of the files the snapshot folder did not hold before the call.
    """
    before = _snapshot_files(repo)
    with hub_errors(repo.label, repo.repo_id, repo.revision, "files"):
        folder = Path(snapshot_download(repo.repo_id, revision=repo.commit, token=repo.token,
                                        ignore_patterns=["*/*", *skip], tqdm_class=_NoFileCountBar))
    if tally is not None:
        tally.bytes += sum(path.stat().st_size for path in folder.iterdir()
                           if path.is_file() and path.name not in before)
    return folder


def _snapshot_files(repo: PinnedRepo) -> set[str]:
    """Names of the files the cache's snapshot folder of the pinned commit holds now."""
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.repo_id.replace('/', '--')}" / "snapshots" / repo.commit
    try:
        return {entry.name for entry in folder.iterdir()}
    except OSError:
        return set()
