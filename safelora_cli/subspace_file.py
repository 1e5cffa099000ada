"""The safety-subspace file: what `patch --subspace` needs in place of the base and aligned models.

A directory laid out like a one-file model, so that it resolves from a local path or the Hub
exactly as a model does (and only the tensors an adapter needs are fetched):

- `model.safetensors`: one tensor per weight, named like the model's weight (`…q_proj.weight`).
  Exact mode: V = W_aligned − W_base as the model stores the weight. Low-rank mode: the factor
  Q (out, k), float32, with C_k = Q·Qᵀ in the adapted module's orientation (see `lowrank`).
- its header's `__metadata__["safelora_subspace"]`: JSON with the format version, the mode, the
  provenance (tool, inputs and their commits) and one record per weight (the stored weight's
  shape; for low-rank also ‖V‖_F, k, the energy kept and the largest dropped eigenvalue of C).
- `README.md`: a card saying what the file is and how it was made.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.checkpoint import Checkpoint, TensorInfo
from safelora_cli.errors import InputError, UsageError
from safelora_cli.outputs import file_metadata
from safelora_cli.safetensors_io import dtype_name, header_bytes, item_bytes, open_safetensors
from safelora_cli.subspace_records import bad_file as _bad
from safelora_cli.subspace_records import check_document, check_entry

FORMAT = "safelora-subspace"
VERSION = 1
METADATA_KEY = "safelora_subspace"
WEIGHTS_FILE = "model.safetensors"
EXACT, LOW_RANK = "exact", "low-rank"
# What exact mode may store V in; see docs/inputs.md for the measured cosine error of each.
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Entry:
    """One weight's record. `shape` is the weight as the models store it (what pairing checks);
    `transposed` says that Q spans the columns of the stored weight (Conv1D, embeddings)."""

    shape: tuple[int, int]
    transposed: bool = False
    v_norm: float | None = None
    rank: int | None = None
    energy_kept: float | None = None
    dropped: float | None = None
    full_rank: int | None = None

    def record(self) -> dict[str, Any]:
        return {k: (list(v) if k == "shape" else v) for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Subspace:
    """An opened subspace file: its header's records and a `Checkpoint` to pair adapters against."""

    root: Path
    mode: str
    dtype: str
    entries: dict[str, Entry]
    provenance: dict[str, Any]
    checkpoint: Checkpoint

    @property
    def exact(self) -> bool:
        return self.mode == EXACT


def header_metadata(mode: str, dtype: str, provenance: dict[str, Any], entries: dict[str, Entry]) -> dict[str, str]:
    document = {"format": FORMAT, "version": VERSION, "mode": mode, "dtype": dtype, **provenance,
                "entries": {key: entries[key].record() for key in sorted(entries)}}
    return {METADATA_KEY: json.dumps(document, ensure_ascii=False, sort_keys=True)}


class StreamingWriter:
    """A safetensors file written tensor by tensor, in the layout's order, from a layout known in advance.

    The header (shapes, dtypes, offsets) is written first; each tensor's bytes follow as they are
    produced, so the file is never held in memory. `close` checks every byte promised was written.
    """

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]) -> None:
        self._sizes = {key: item_bytes(dtype_name(dtype)) * math.prod(shape) for key, (dtype, shape) in layout.items()}
        entries = [(key, dtype_name(dtype), list(shape), self._sizes[key]) for key, (dtype, shape) in layout.items()]
        self._order = list(layout)
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(header_bytes(entries, metadata))
        self._current, self._left = 0, self._sizes[self._order[0]] if self._order else 0

    def write(self, key: str, part: torch.Tensor) -> None:
        """The next bytes of `key` (tensors come in the layout's order, each whole before the next)."""
        while self._left == 0 and self._current + 1 < len(self._order):
            self._current += 1
            self._left = self._sizes[self._order[self._current]]
        if self._order[self._current] != key:
            raise RuntimeError(f"{key} written out of order (expected {self._order[self._current]})")
        data = part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        if len(data) > self._left:
            raise RuntimeError(f"{key}: more bytes than its shape holds")
        self._file.write(data)
        self._left -= len(data)

    def close(self) -> None:
        complete = self._left == 0 and all(self._sizes[k] == 0 for k in self._order[self._current + 1:])
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if not complete:
            raise RuntimeError("a subspace file was closed before all its tensors were written")

    def abort(self) -> None:
        self._file.close()


def refuse_as_model(checkpoint: Checkpoint) -> None:
    """A subspace file passed as --base or --aligned would be read as weights (V, or Q, as W): refuse it.

    Raises:
        UsageError: naming the option to pass it with.
    """
    files = sorted({info.file for info in checkpoint.tensors.values() if info.file.suffix == ".safetensors"})
    if not files:
        return
    with open_safetensors(files[0]) as handle:
        if METADATA_KEY not in (handle.metadata() or {}):
            return
    raise UsageError(f"The {checkpoint.label} model {checkpoint.root} is a safelora subspace file, not a model.",
                     hint="Pass it with --subspace (in place of --base and --aligned).")


def written_by_subspace(directory: Path) -> bool:
    """Whether `directory` holds what `safelora subspace` writes and nothing else, its weights not
    changed since (the card is written last): what --force may replace."""
    try:
        names = {p.name for p in directory.iterdir()}
        unchanged = (directory / WEIGHTS_FILE).stat().st_mtime_ns <= (directory / "README.md").stat().st_mtime_ns
    except OSError:
        return False
    return names == {WEIGHTS_FILE, "README.md", "config.json"} and unchanged and \
        METADATA_KEY in file_metadata(directory / WEIGHTS_FILE)


def open_subspace(root: Path, checkpoint: Checkpoint) -> Subspace:
    """Read the records of a subspace directory whose weights `checkpoint` indexes.

    Raises:
        InputError: the file carries no subspace record, a newer format, or records that do not
            match its tensors.
    """
    files = {info.file for info in checkpoint.tensors.values()}
    documents: list[dict[str, Any]] = []
    for file in sorted(files):
        with open_safetensors(file) as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
        try:
            document = json.loads(raw) if raw is not None else None
        except json.JSONDecodeError:
            document = None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise _bad(root, f"{file.name} carries no {METADATA_KEY} record")
        documents.append(document)
    if not documents:
        raise _bad(root, f"it has no {WEIGHTS_FILE}")
    first = documents[0]
    version = first.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(root, f"its format version {version!r} is not a positive integer")
    if version > VERSION:
        raise InputError(f"The subspace file {root} has format version {first.get('version')}; this safelora-cli "
                         f"reads version {VERSION}.",
                         hint="Upgrade safelora-cli, or write the file again with this one.")
    if first.get("mode") not in (EXACT, LOW_RANK):
        raise _bad(root, f"unknown mode {first.get('mode')!r}")
    records: dict[str, Any] = {}
    for document in documents:
        if isinstance(document.get("entries"), dict):
            records.update(document["entries"])
    check_document(first, root)
    low_rank = first["mode"] == LOW_RANK
    entries = {key: Entry(**check_entry(key, records[key], low_rank, root)) for key in sorted(records)}
    missing = sorted(set(entries) ^ set(checkpoint.tensors))
    if missing:
        raise _bad(root, f"its records and tensors disagree on {missing[0]}")
    _check_shapes(first["mode"], entries, checkpoint, root)
    pairing = Checkpoint(root, "subspace", {k: TensorInfo(checkpoint.tensors[k].file, e.shape,
                                                          checkpoint.tensors[k].dtype) for k, e in entries.items()},
                         frozenset(entries))
    names = ("tool", "inputs", "modules", "rank_requested", "energy_requested")
    provenance: dict[str, Any] = {k: first[k] for k in names if k in first}
    return Subspace(root, first["mode"], str(first.get("dtype", "")), entries, provenance, pairing)


def _check_shapes(mode: str, entries: dict[str, Entry], checkpoint: Checkpoint, root: Path) -> None:
    allowed = {"F32", "BF16", "F16"} if mode == EXACT else {"F32"}
    for key, entry in entries.items():
        if checkpoint.tensors[key].dtype not in allowed:
            raise _bad(root, f"{key} is stored as {checkpoint.tensors[key].dtype}, not {' or '.join(sorted(allowed))}")
        stored = checkpoint.tensors[key].shape
        out = entry.shape[1] if entry.transposed else entry.shape[0]
        expected: Iterable[int] = entry.shape if mode == EXACT else (out, entry.rank if entry.rank is not None else -1)
        if tuple(stored) != tuple(expected):
            raise _bad(root, f"{key} is stored as {tuple(stored)} but its record says {tuple(expected)}")
