"""A model checkpoint on disk: which file holds which tensor, and streaming reads.

Layouts: a single `model.safetensors`, or shards listed by `model.safetensors.index.json`
(follow the index, never a glob: some repos hold extra files). Nothing here holds more than
the tensors asked for; `TensorStream` keeps at most one shard open at a time.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import InputError, UnsupportedError, format_keys
from safelora_cli.safetensors_io import open_safetensors, read_header, read_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# W must be a float tensor; anything else (int8/fp8/packed ints of quantized checkpoints, BOOL) is refused.
_WEIGHT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Checkpoint:
    """Tensor name → where it lives, for one model (`label` is 'base' or 'aligned')."""

    root: Path
    label: str
    tensors: dict[str, TensorInfo]

    def info(self, key: str) -> TensorInfo | None:
        return self.tensors.get(key)


def _weight_map(root: Path, label: str) -> dict[str, Path]:
    index = root / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            mapping = data["weight_map"]
            if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index} is not a valid safetensors index ({exc}).") from None
        files = {name: root / shard for name, shard in mapping.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise InputError(
                f"The {label} index {index} points at missing shard(s): {format_keys(missing)}.",
                hint="Download the complete checkpoint.",
            )
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        return {}  # filled from the header by the caller
    pickled = [name for name in _PICKLE_FILES if (root / name).is_file()]
    if pickled:
        raise UnsupportedError(
            f"The {label} model at {root} has only {pickled[0]}; pickled checkpoints are not supported yet.",
            hint="Convert it with transformers' save_pretrained(..., safe_serialization=True).",
        )
    raise InputError(
        f"The {label} model at {root} has no {SINGLE_FILE} or {INDEX_FILE}.",
        hint="Pass a directory written by save_pretrained.",
    )


def open_checkpoint(path: Path, label: str) -> Checkpoint:
    """Index a checkpoint directory (or a single .safetensors file) by tensor name.

    Reads only headers. Raises `InputError` for missing paths, missing shards and unreadable files.
    """
    if not path.exists():
        raise InputError(f"The {label} model path {path} does not exist.")
    if path.is_file():
        root, mapping = path.parent, {}
        single: Path | None = path
    else:
        root, mapping = path, _weight_map(path, label)
        single = path / SINGLE_FILE if not mapping else None
    tensors: dict[str, TensorInfo] = {}
    files = [single] if single is not None else sorted(set(mapping.values()))
    for file in files:
        for key, (shape, dtype) in read_header(file).items():
            if single is not None or mapping.get(key) == file:
                tensors[key] = TensorInfo(file, shape, dtype)
    listed_absent = sorted(k for k in mapping if k not in tensors)
    if listed_absent:
        raise InputError(
            f"The {label} index lists tensors its shards do not contain: {format_keys(listed_absent)}."
        )
    return Checkpoint(root, label, tensors)


def refuse_quantized(checkpoint: Checkpoint, key: str) -> None:
    """Quantized weights are not W: say which full-precision checkpoint to use instead."""
    dtype = checkpoint.tensors[key].dtype
    if dtype not in _WEIGHT_DTYPES:
        raise UnsupportedError(
            f"The {checkpoint.label} model stores {key} as {dtype}: quantized checkpoints cannot be used.",
            hint="Point at the full-precision (float32/float16/bfloat16) release of the same model.",
        )


class TensorStream:
    """Read tensors by name from several checkpoints, one open shard per checkpoint.

    Reading modules in the order their tensors lie in the shards means each shard is opened
    once; switching shards closes the previous one so its memory is released.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[Path, Any, ExitStack]] = {}

    def read(self, checkpoint: Checkpoint, key: str) -> torch.Tensor:
        info = checkpoint.tensors[key]
        current = self._open.get(checkpoint.label)
        if current is None or current[0] != info.file:
            self._close(checkpoint.label)
            stack = ExitStack()
            handle = stack.enter_context(open_safetensors(info.file))
            current = (info.file, handle, stack)
            self._open[checkpoint.label] = current
        return read_tensor(current[1], key, info.file)

    def _close(self, label: str) -> None:
        entry = self._open.pop(label, None)
        if entry is not None:
            entry[2].close()

    def close(self) -> None:
        for label in list(self._open):
            self._close(label)

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
