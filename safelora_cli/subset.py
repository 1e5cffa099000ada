"""Safetensors headers checked byte for byte, and subset files: some tensors of a shard, verbatim.

A subset file is an ordinary safetensors file holding some of the tensors of a (remote) shard,
their bytes copied unchanged and laid out again from offset 0. Its metadata carries the whole
header of the shard it was cut from (under `ORIGIN_KEY`), so that a later run knows every name
the shard holds, and where the tensors it lacks lie, without asking the Hub again.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORIGIN_KEY = "safelora.origin"
MAX_HEADER = 100_000_000  # the safetensors library's own limit
# Bits per element of every safetensors dtype; a dtype not listed is checked for order only.
_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
         "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "C64": 64, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8,
         "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}


@dataclass(frozen=True)
class Entry:
    """One tensor of a header: dtype, shape, and its byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A checked safetensors header. `length` is the JSON's byte count after the 8-byte prefix."""

    tensors: dict[str, Entry]
    metadata: dict[str, str]
    length: int

    @property
    def data_start(self) -> int:
        return 8 + self.length

    @property
    def data_size(self) -> int:
        return max((entry.end for entry in self.tensors.values()), default=0)


def header_length(prefix: bytes, file_size: int | None) -> int:
    """The header length the first 8 bytes state, if plausible for a file of `file_size` bytes.

    Raises:
        ValueError: with the reason.
    """
    if len(prefix) != 8:
        raise ValueError(f"the file is {len(prefix)} bytes long, shorter than a header")
    (length,) = struct.unpack("<Q", prefix)
    if length < 2 or length > MAX_HEADER:
        raise ValueError(f"its header claims {length} bytes (a header holds 2 to {MAX_HEADER})")
    if file_size is not None and 8 + length > file_size:
        raise ValueError(f"its header claims {length} bytes but the file holds {file_size}")
    return length


def _entry(name: str, value: Any) -> Entry:
    if not isinstance(value, dict) or not isinstance(value.get("dtype"), str):
        raise ValueError(f"tensor {name} has no dtype")
    shape, offsets = value.get("shape"), value.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"tensor {name} has no valid shape")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise ValueError(f"tensor {name} has no valid data_offsets")
    entry = Entry(value["dtype"], tuple(shape), offsets[0], offsets[1])
    bits = _BITS.get(entry.dtype)
    if bits is not None and entry.size * 8 != math.prod(entry.shape) * bits:
        raise ValueError(f"tensor {name} ({entry.dtype}, shape {list(entry.shape)}) spans {entry.size} bytes")
    return entry


def parse_header(raw: bytes, data_size: int | None) -> Header:
    """Check a header as the safetensors library does: JSON object, entries well formed, tensors
    back to back from offset 0, and (when `data_size` is known) covering exactly the data.

    Raises:
        ValueError: with the reason.
    """
    try:
        decoded = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"its header is not JSON ({exc})") from None
    if not isinstance(decoded, dict):
        raise ValueError("its header is not a JSON object")
    metadata = decoded.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its __metadata__ is not an object of strings")
    tensors = {name: _entry(name, value) for name, value in decoded.items()}
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position or entry.end < entry.begin:
            raise ValueError(f"tensor {name} starts at byte {entry.begin} of the data, expected {position}")
        position = entry.end
    if data_size is not None and position != data_size:
        raise ValueError(f"its tensors cover {position} bytes of data but the file holds {data_size}")
    return Header(tensors, dict(metadata), len(raw))


def _origin_json(origin: Header) -> str:
    tensors = {name: [e.dtype, list(e.shape), e.begin, e.end] for name, e in origin.tensors.items()}
    return json.dumps({"length": origin.length, "metadata": origin.metadata, "tensors": tensors},
                      separators=(",", ":"))


def _origin_of(own: Header) -> Header:
    """The shard header a subset file carries; ValueError when it is missing or does not fit."""
    try:
        data = json.loads(own.metadata[ORIGIN_KEY])
        tensors = {name: Entry(d, tuple(s), b, e) for name, (d, s, b, e) in data["tensors"].items()}
        origin = Header(tensors, dict(data["metadata"]), int(data["length"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"it carries no readable shard header ({exc!r})") from None
    for name, entry in own.tensors.items():
        known = origin.tensors.get(name)
        if known is None or (known.dtype, known.shape, known.size) != (entry.dtype, entry.shape, entry.size):
            raise ValueError(f"tensor {name} does not match the shard's header")
    return origin


def read_subset(path: Path) -> tuple[Header, Header]:
    """A subset file's own header and the shard header it carries, checked against its size.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, garbled or not a subset file (the reason).
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        length = header_length(file.read(8), size)
        own = parse_header(file.read(length), size - 8 - length)
    return own, _origin_of(own)


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a subset goes: the encoded header, and name → offset in the file."""

    header: bytes
    positions: dict[str, int]
    size: int


def plan_subset(origin: Header, names: Collection[str]) -> Layout:
    """The layout of a subset file holding `names` (all in `origin`), in the shard's order."""
    ordered = sorted(names, key=lambda name: origin.tensors[name].begin)
    header: dict[str, Any] = {"__metadata__": {**origin.metadata, ORIGIN_KEY: _origin_json(origin)}}
    offset = 0
    for name in ordered:
        entry = origin.tensors[name]
        header[name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.size]}
        offset += entry.size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    start = 8 + len(encoded)
    positions, position = {}, start
    for name in ordered:
        positions[name] = position
        position += origin.tensors[name].size
    return Layout(struct.pack("<Q", len(encoded)) + encoded, positions, position)
