"""A model checkpoint on disk: which file holds which tensor, and streaming reads.

Layouts, in the order transformers prefers them: shards listed by `model.safetensors.index.json`,
a single `model.safetensors`, shards listed by `pytorch_model.bin.index.json`, a single
`pytorch_model.bin`. Follow the index, never a glob: some repos hold extra files. Pickled files
are only read through `pickled_io` (no code execution). Nothing here holds more than the
tensors asked for; `TensorStream` keeps at most one shard open per checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from safelora_cli import file_kind, pickled_io
from safelora_cli.errors import InputError, UnsupportedError, format_keys
from safelora_cli.safetensors_io import RowReader, empty_rows, item_bytes, open_safetensors, read_header, read_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"
# Preference order when several layouts are present (safetensors first, like transformers).
LAYOUTS = (INDEX_FILE, SINGLE_FILE, PICKLE_INDEX_FILE, PICKLE_FILE)
# W must be a float tensor; anything else (int8/fp8/packed ints of quantized checkpoints, BOOL) is refused.
_WEIGHT_DTYPES = {"F64", "F32", "F16", "BF16"}
# Tensors that sit beside (or instead of) `<module>.weight` in quantized layouts:
# GPTQ/AWQ, FP8 (weight_scale[_inv]), compressed-tensors, bitsandbytes 8-bit and 4-bit.
_QUANTIZED_SIBLINGS = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv",
                       "weight_packed", "SCB", "weight.absmax", "weight.quant_map",
                       "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * item_bytes(self.dtype)

    @property
    def pickled(self) -> bool:
        return self.file.suffix != ".safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """Tensor name → where it lives, for one model (`label` is 'base' or 'aligned').

    `tensors` holds the tensors whose files were indexed; `listed` every name the index or
    header lists (also those in shards not indexed); `quantization` the `quant_method` of
    config.json's `quantization_config`, if any.
    """

    root: Path
    label: str
    tensors: dict[str, TensorInfo]
    listed: frozenset[str] = frozenset()
    quantization: str | None = None


def choose_layout(exists: Callable[[str], bool]) -> str | None:
    """The preferred layout file among those for which `exists(name)` is true."""
    return next((name for name in LAYOUTS if exists(name)), None)


def read_index(index: Path, label: str) -> dict[str, str]:
    """An index's `weight_map` (tensor name → shard file name), validated."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        mapping = data["weight_map"]
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"The {label} index {index} is not a valid checkpoint index ({exc}).") from None
    return mapping


def shards_for(weight_map: dict[str, str], needed: Collection[str] | None) -> list[str]:
    """The shard files holding `needed` tensors (every shard when `needed` is None), sorted."""
    if needed is None:
        return sorted(set(weight_map.values()))
    return sorted({weight_map[name] for name in needed if name in weight_map})


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    return read_header(file) if file.suffix == ".safetensors" else pickled_io.read_header(file)


def _quantization(root: Path) -> str | None:
    """`quantization_config.quant_method` of config.json: a strong sign the weights are not W."""
    try:
        config = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # no (readable) config: the tensors themselves are still checked
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return str(method or "unknown method")


def _files_to_index(root: Path, label: str, needed: Collection[str] | None) -> tuple[list[Path], dict[str, str]]:
    """The files whose headers must be read, and the index's weight map ({} for one file)."""
    for name in LAYOUTS:
        file_kind.refuse_irregular(root / name)
    layout = choose_layout(lambda name: (root / name).is_file())
    if layout is None:
        raise InputError(
            f"The {label} model at {root} has no {INDEX_FILE}, {SINGLE_FILE}, {PICKLE_INDEX_FILE} or {PICKLE_FILE}.",
            hint="Pass a directory written by save_pretrained.",
        )
    if not layout.endswith(".index.json"):
        return [root / layout], {}
    mapping = read_index(root / layout, label)
    shards = shards_for(mapping, needed)
    missing = [shard for shard in shards if not (root / shard).is_file()]
    if missing:
        raise InputError(
            f"The {label} index {root / layout} points at missing shard(s): {format_keys(missing)}.",
            hint="Download the complete checkpoint.",
        )
    return [root / shard for shard in shards], mapping


def open_checkpoint(path: Path, label: str, needed: Collection[str] | None = None) -> Checkpoint:
    """Index a checkpoint directory (or a single .safetensors/.bin file) by tensor name.

    Args:
        path: the model directory, or one weights file.
        label: 'base' or 'aligned', for messages.
        needed: with a sharded layout, index only the shards holding these tensors (the
            others need not be present, e.g. when only they were downloaded); None: all.

    Reads only headers (pickled shards are memory-mapped, not read). Raises `InputError` for
    missing paths, missing shards and unreadable files.
    """
    if not path.exists():
        raise InputError(f"The {label} model path {path} does not exist.")
    file_kind.refuse_irregular(path)
    mapping: dict[str, str] = {}
    if path.is_file():
        root, files = path.parent, [path]
    else:
        root = path
        files, mapping = _files_to_index(path, label, needed)
    tensors: dict[str, TensorInfo] = {}
    listed = set(mapping)
    for file in files:
        for key, (shape, dtype) in _header(file).items():
            if not mapping or root / mapping.get(key, "") == file:
                tensors[key] = TensorInfo(file, shape, dtype)
                listed.add(key)
    absent = sorted(k for k, shard in mapping.items() if root / shard in files and k not in tensors)
    if absent:
        raise InputError(
            f"The {label} index lists tensors its shards do not contain: {format_keys(absent)}."
        )
    return Checkpoint(root, label, tensors, frozenset(listed), _quantization(root))


def refuse_quantized(checkpoint: Checkpoint, key: str) -> None:
    """Quantized weights are not W: say which full-precision checkpoint to use instead.

    Checked for every adapted module, also when `key` is absent (GPTQ/AWQ store `qweight`
    instead of `weight`), so the user hears "quantized" rather than "not found".

    Raises:
        UnsupportedError: when `key` is not a float tensor (integer/FP8 packing), sits beside quantization tensors
            (scales, zero points, bitsandbytes state), or config.json declares a quantization.
    """
    info = checkpoint.tensors.get(key)
    module = key.removesuffix(".weight")
    siblings = [f"{module}.{name}" for name in _QUANTIZED_SIBLINGS if f"{module}.{name}" in checkpoint.listed]
    if info is not None and info.dtype not in _WEIGHT_DTYPES:
        found = f"stores {key} as {info.dtype}"
    elif siblings:
        found = f"stores {module} as quantized tensors ({format_keys(siblings, 3)})"
    elif checkpoint.quantization is not None:
        found = f"is quantized (config.json quantization_config: {checkpoint.quantization})"
    else:
        return
    raise UnsupportedError(
        f"The {checkpoint.label} model {found}: quantized checkpoints cannot be used, since V = W_aligned − "
        "W_base needs the real weights.",
        hint="Point at the full-precision (float32/float16/bfloat16) release the quantized model was made from.",
    )


class _OpenShard(NamedTuple):
    """A shard `TensorStream` holds open: its reader, and a row reader once rows are asked for."""

    file: Path
    handle: Any  # a safetensors handle, or a (mapped) pickled state dict
    stack: ExitStack
    row_reader: list[RowReader]  # empty until rows are asked for


class TensorStream:
    """Read tensors, or blocks of their rows, by name from several checkpoints, one open shard each.

    Reading modules in the order their tensors lie in the shards means each shard is opened
    once; switching shards closes the previous one so its memory is released. Tensors from
    pickled shards are copied out of the mapping, so none of them keeps a closed shard alive.
    A row block (`read_rows`) costs memory for those rows only, whatever the tensor's width.
    """

    def __init__(self) -> None:
        self._open: dict[str, _OpenShard] = {}

    def read(self, checkpoint: Checkpoint, key: str) -> torch.Tensor:
        info, shard = self._shard(checkpoint, key)
        if info.pickled:
            return pickled_io.take(shard.handle, key, info.file)
        return read_tensor(shard.handle, key, info.file)

    def read_rows(self, checkpoint: Checkpoint, key: str, start: int, stop: int,
                  buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `start:stop` of `key` as independent memory: new, or the start of the uint8 `buffer`."""
        info, shard = self._shard(checkpoint, key)
        if info.pickled:
            # The zip format is memory-mapped: copying a slice touches only these rows' pages.
            state = shard.handle
            mapped = state[key] if key in state else pickled_io.take(state, key, info.file)  # take: not found
            rows = mapped[start:stop]
            return empty_rows(tuple(rows.shape), rows.dtype, buffer).copy_(rows)
        if not shard.row_reader:
            shard.row_reader.append(RowReader(info.file))
            shard.stack.callback(shard.row_reader[0].close)
        return shard.row_reader[0].rows(key, start, stop, buffer)

    def _shard(self, checkpoint: Checkpoint, key: str) -> tuple[TensorInfo, _OpenShard]:
        """`key`'s entry and its shard, opened (and the previous one of `checkpoint` closed) when needed."""
        info = checkpoint.tensors[key]
        current = self._open.get(checkpoint.label)
        if current is None or current.file != info.file:
            self._close(checkpoint.label)
            stack = ExitStack()
            if info.pickled:
                handle: Any = pickled_io.load_state_dict(info.file)
            else:
                handle = stack.enter_context(open_safetensors(info.file))
            current = self._open[checkpoint.label] = _OpenShard(info.file, handle, stack, [])
        return info, current

    def _close(self, label: str) -> None:
        entry = self._open.pop(label, None)
        if entry is not None:
            entry.stack.close()

    def close(self) -> None:
        for label in list(self._open):
            self._close(label)

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
