"""Resolve what the user passed (--base, --aligned, --adapter) to local files, and record whence.

A spec is a local path or a Hub repository id (`org/name`, optionally `org/name@revision`). An
existing local path always wins; otherwise a spec shaped like a repo id goes to the Hub; anything
else is a path that does not exist. Models are resolved for a set of tensor names, so that only
those tensors (by range, see `hub_model`) or the shards holding them are downloaded.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli.checkpoint import CONFIG_FILE, LAYOUTS, Checkpoint, open_checkpoint
from safelora_cli.errors import InputError, UsageError, expand_user

# `org/name` or `org/name@revision`: one slash, no leading dot (so ./x/y and ../x stay paths).
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[^\s@]+))?$")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Origin:
    """Where one input came from: the spec, the local folder used, and for the Hub the commit."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    from_adapter_config: bool | None = None
    # Bytes fetched from the Hub for this input (0: all from a cache); None for local inputs.
    bytes_downloaded: int | None = None

    def record(self) -> dict[str, Any]:
        """The report's fields beyond source and path (`from_adapter_config` for --aligned only)."""
        record: dict[str, Any] = {"revision": self.revision, "commit": self.commit,
                                  "bytes_downloaded": self.bytes_downloaded}
        if self.from_adapter_config is not None:
            record["from_adapter_config"] = self.from_adapter_config
        return record


@dataclass(frozen=True)
class _Spec:
    path: Path | None
    repo_id: str | None
    revision: str | None
    # For `dir/name` where `dir` exists here: the "no such directory" error, raised if the Hub fails too.
    missing: InputError | None = None


def _option(label: str) -> str:
    return "--adapter" if label == "adapter" else f"--{label}"


def _printable(spec: str) -> str:
    """`spec` as it can be printed: bytes that are not UTF-8 (surrogate escapes) shown as \\xNN."""
    return spec.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _exists(path: Path, spec: str, label: str) -> bool:
    """Whether `path` exists; a path the OS refuses to look up is an error, not "missing"."""
    try:
        os.stat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        raise InputError(f"Permission denied looking up the {label} path {spec}.",
                         hint="A directory on the way cannot be searched by this user; check its permissions.",
                         ) from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise InputError(f"The {label} path {spec} has a name longer than the file system allows "
                             "(255 bytes per component).", hint="Rename or link it to a shorter name.") from None
        raise InputError(f"The {label} path {spec} cannot be used: {exc.strerror}.") from None


def _missing(path: Path, spec: str, label: str) -> InputError:
    """'no such directory', with the deepest part of the path that does exist."""
    detail = ""
    if os.path.lexists(path):
        detail = f" ({spec} is a symbolic link to {os.readlink(path)}, which does not exist)"
    else:
        found = next((p for p in path.parents if p != Path(".") and os.path.lexists(p)), None)
        if found is not None:
            child = path.relative_to(found).parts[0]
            detail = f" ({found} exists, but holds no {child})"
    return InputError(f"The {label} path {spec} does not exist: no such directory{detail}.",
                      hint=f"Check the path given to {_option(label)}.")


def parse_spec(spec: str, revision: str | None, label: str) -> _Spec:
    """Local path, or Hub id with its revision (inline `@rev` or the --<label>-revision option).

    A spec that exists locally is local. One written as a path (./x, ../x, /x, ~/x, a dangling
    link, a/b/c) that does not exist is "no such directory", never a Hub lookup; only
    `org/name[@rev]` goes to the Hub.

    Raises:
        InputError: the spec is not valid UTF-8, cannot be looked up, or is a path that does not exist.
        UsageError: a revision for a local path, or two different revisions.
    """
    option = _option(label)
    try:
        spec.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"The {label} path {_printable(spec)} is not valid UTF-8.",
                         hint="Rename it, or pass a symbolic link with a UTF-8 name.") from None
    path = expand_user(spec)
    if _exists(path, spec, label):
        if revision is not None:
            raise UsageError(f"{option}-revision applies to Hub repositories, but {spec} is a local path.")
        return _Spec(path, None, None)
    match = _REPO_ID.match(spec)
    hub_id = match is not None and ".." not in spec and "--" not in match["repo"]
    if spec.startswith(("./", "../", "/", "~")) or os.path.lexists(path) or ("/" in spec and not hub_id):
        raise _missing(path, spec, label)
    if match is None or not hub_id:
        raise InputError(
            f"The {label} path {spec} does not exist.",
            hint=f"Pass a local directory, or a Hub repository id such as org/name, to {option}.",
        )
    inline = match["revision"]
    if inline is not None and revision is not None and inline != revision:
        raise UsageError(f"{spec} names revision {inline!r} but {option}-revision says {revision!r}; give one.")
    # `org/name` beside a local `org/`: a mistyped local path or a Hub id (docs/inputs.md). The Hub
    # is asked; if it fails too, the error says "no such directory" first.
    beside_local = os.path.lexists(spec.split("/", 1)[0])
    return _Spec(None, match["repo"], inline or revision, _missing(path, spec, label) if beside_local else None)


def _pin(parsed: _Spec, token: str | None, label: str) -> Any:
    """hub.pin, but a spec that may be a mistyped local path says so when the Hub fails too."""
    from safelora_cli import hub

    assert parsed.repo_id is not None
    try:
        return hub.pin(parsed.repo_id, parsed.revision, token, label)
    except hub.HubError as exc:
        if parsed.missing is None:
            raise
        raise InputError(f"{parsed.missing.message.removesuffix('.')}, and as a Hub repository id: {exc.message}",
                         hint=parsed.missing.hint) from None


def check_local_dir(path: Path, spec: str, label: str) -> Path:
    """A local directory that can be listed and is not empty."""
    if path.is_dir():
        try:
            entries = list(path.iterdir())
        except PermissionError:
            raise InputError(f"Permission denied reading the {label} directory {spec}.") from None
        if not entries:
            raise InputError(f"The {label} directory {spec} is empty.")
        try:  # listable is not searchable: without x permission no file inside can be opened
            os.stat(entries[0])
        except PermissionError:
            raise InputError(f"Permission denied opening the files of the {label} directory {spec}.",
                             hint="The directory can be listed but not searched (no x permission); check its "
                             "permissions.") from None
        except OSError:
            pass  # e.g. a dangling link inside: the file that is needed is checked when it is opened
    return path


def resolve_adapter(spec: str, revision: str | None, token: str | None) -> Origin:
    """The adapter's local folder: a directory, or the top-level files of a Hub repository.

    From the Hub, only top-level files are fetched (config, weights, model card, ...), and of
    the weights only the file PEFT would load (safetensors when both exist).
    """
    parsed = parse_spec(spec, revision, "adapter")
    if parsed.path is not None:
        return Origin(spec, check_local_dir(parsed.path, spec, "adapter"))
    from safelora_cli import hub

    repo = _pin(parsed, token, "adapter")
    tally = hub.Tally()
    weights = hub.first_present(repo, ADAPTER_WEIGHTS, tally)
    skip = [name for name in ADAPTER_WEIGHTS if name != weights]
    folder = hub.snapshot_top_level(repo, skip=skip, tally=tally)
    return Origin(spec, folder, repo.repo_id, repo.revision, repo.commit, bytes_downloaded=tally.bytes)


def resolve_model(spec: str, revision: str | None, token: str | None, label: str,
                  needed: Callable[[Collection[str]], Collection[str]]) -> tuple[Checkpoint, Origin]:
    """Index a model for the tensors in `needed`; from the Hub, fetch only what holds them.

    Args:
        spec: local path or Hub id.
        revision: the --<label>-revision option (None: inline `@rev`, or the default branch).
        token: Hub token (None: HF_TOKEN or the saved login).
        label: 'base' or 'aligned'.
        needed: given the names an index (or header) lists, those the adapter may use (e.g.
            `model.layers.0.self_attn.q_proj.weight`); only they (or, with whole files, their
            shards) are downloaded.
    """
    parsed = parse_spec(spec, revision, label)
    if parsed.path is not None:
        path = check_local_dir(parsed.path, spec, label)
        return open_checkpoint(path, label), Origin(spec, path)
    from safelora_cli import hub, hub_model

    assert parsed.repo_id is not None
    tensors_only = hub_model.download_mode() == hub_model.TENSORS
    repo = _pin(parsed, token, label)
    tally = hub.Tally()
    layout = hub.first_present(repo, LAYOUTS, tally, probe=hub_model.RANGED if tensors_only else (),
                               elsewhere=hub_model.held_elsewhere(repo) if tensors_only else None)
    if layout is None:
        raise InputError(
            f"The {label} repository {parsed.repo_id} (commit {repo.commit[:12]}) has none of {', '.join(LAYOUTS)}.",
            hint="Pass a repository with transformers-format weights.",
        )
    hub.first_present(repo, (CONFIG_FILE,), tally)  # optional; its quantization_config flags quantized weights
    if tensors_only and layout in hub_model.RANGED_LAYOUTS:
        checkpoint = hub_model.tensors_of(repo, layout, needed, tally)
    else:
        checkpoint = hub_model.whole_files(repo, layout, needed, tally)
    origin = Origin(spec, checkpoint.root, repo.repo_id, repo.revision, repo.commit, bytes_downloaded=tally.bytes)
    return checkpoint, origin


def aligned_from_adapter(raw_config: dict[str, Any], adapter: Path, revision: str | None) -> tuple[str, str | None]:
    """The aligned model named by adapter_config.json (`base_model_name_or_path`, `revision`).

    Raises:
        UsageError: when the config names no model.
    """
    name = raw_config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(
            f"--aligned was not given and {adapter / 'adapter_config.json'} names no base_model_name_or_path.",
            hint="Pass --aligned with the safety-aligned model the adapter was trained on.",
        )
    try:
        if os.path.exists(expand_user(name)):
            return name, revision
    except ValueError:  # a NUL byte in the name
        pass
    if _REPO_ID.match(name) is None:
        raise UsageError(
            f"--aligned was not given and the adapter's base_model_name_or_path {name!r} is neither an existing "
            "path nor a Hub repository id.",
            hint="Pass --aligned with the safety-aligned model the adapter was trained on.",
        )
    config_revision = raw_config.get("revision")
    if revision is None and isinstance(config_revision, str) and config_revision:
        revision = config_revision
    return name, revision
