"""Thin, error-mapped access to safetensors files.

Every failure of the safetensors library becomes an `InputError` naming the file. Reads use
the `pread` backend where the installed safetensors has it (0.8+): it reads tensor bytes into
fresh memory instead of mapping the file, so the pages of a 10 GB shard do not stay resident.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from safelora_cli import file_kind
from safelora_cli.errors import InputError


@functools.cache
def pread_supported() -> bool:
    """Whether this safetensors accepts `backend="pread"` (it rejects unknown keywords)."""
    return "backend" in (getattr(safe_open, "__text_signature__", None) or "")


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """Open `path` for reading, mapping library errors to `InputError`."""
    kwargs = {"backend": "pread"} if pread_supported() else {}
    try:
        handle = safe_open(str(path), framework="pt", device="cpu", **kwargs)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _open_error(path, exc) from None
    with handle:
        yield handle


def _open_error(path: Path, exc: Exception) -> InputError:
    """The real reason `path` did not open: safetensors reports an unreadable file as "No such
    file", so the OS is asked again (non-blocking, in case of a pipe)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except FileNotFoundError:
        return InputError(f"{path} does not exist.")
    except PermissionError:
        return InputError(f"Permission denied reading {path}.")
    except IsADirectoryError:
        return InputError(f"{path} is a directory, not a safetensors file.")
    except OSError as os_exc:
        return InputError(f"Cannot read {path}: {os_exc.strerror}.")
    if isinstance(exc, PermissionError):  # the OS said so to the library (e.g. a mandatory lock)
        return InputError(f"Permission denied reading {path}.")
    return file_kind.explain(path, "a safetensors file") or InputError(
        f"{path} is not a readable safetensors file ({str(exc)[:300]}).",
        hint="The file may be truncated or corrupted; download or save it again.",
    )



def read_tensor(handle: Any, key: str, path: Path) -> torch.Tensor:
    """One tensor; a dtype this PyTorch cannot hold (e.g. F6_E2M3) is named rather than reported raw."""
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        dtype = _stored_dtype(handle, key)
        if dtype in _PACKED and pread_supported():
            return _read_packed(path, key)
        if dtype is not None and dtype not in _TORCH_DTYPES:
            raise InputError(f"{path}: tensor {key} is stored as {dtype}, a dtype PyTorch {torch.__version__} "
                             "cannot load.", hint="Convert that tensor to a dtype PyTorch supports.") from None
        raise InputError(f"Cannot read tensor {key} from {path} ({str(exc)[:300]}).") from None


def _read_packed(path: Path, key: str) -> torch.Tensor:
    """safetensors 0.8's pread backend builds packed F4 tensors with the unpacked element count and
    fails; the mapped backend gets them right. Only such (small, rare) tensors take this path."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key).clone()
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise InputError(f"Cannot read tensor {key} from {path} ({str(exc)[:300]}).") from None


def _stored_dtype(handle: Any, key: str) -> str | None:
    try:
        return str(handle.get_slice(key).get_dtype())
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError):
        return None


def read_all_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a (small) file, in its own dtype, and the file's metadata."""
    with open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
        return {k: read_tensor(handle, k, path) for k in handle.keys()}, dict(metadata)  # noqa: SIM118


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name → (shape, safetensors dtype string), without reading tensor data."""
    with open_safetensors(path) as handle:
        out = {}
        for key in handle.keys():  # noqa: SIM118
            view = handle.get_slice(key)
            out[key] = (tuple(view.get_shape()), view.get_dtype())
        return out


# Every dtype both torch and safetensors know (the names are safetensors'), so that tensors the
# tool does not touch (modules_to_save, biases) are written back whatever they hold. Looked up by
# attribute: older torch builds lack some.
_DTYPE_NAMES = {
    getattr(torch, attr): name for attr, name in (
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"),
        ("int64", "I64"), ("int32", "I32"), ("int16", "I16"), ("int8", "I8"),
        ("uint64", "U64"), ("uint32", "U32"), ("uint16", "U16"), ("uint8", "U8"), ("bool", "BOOL"),
        ("complex64", "C64"), ("float8_e4m3fn", "F8_E4M3"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
        ("float8_e5m2", "F8_E5M2"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float8_e8m0fnu", "F8_E8M0"),
        ("float4_e2m1fn_x2", "F4"),
    ) if hasattr(torch, attr)
}
_TORCH_DTYPES = frozenset(_DTYPE_NAMES.values())
# torch packs two F4 values in one float4_e2m1fn_x2 element; safetensors counts the F4 values.
_PACKED = {"F4": 2}
_ITEM_BYTES = {name: dtype.itemsize for dtype, name in _DTYPE_NAMES.items()}


def item_bytes(name: str) -> int:
    """Bytes per element of a safetensors dtype name (4 for names this table does not know)."""
    return _ITEM_BYTES.get(name, 4)


def _header_shape(tensor: torch.Tensor, name: str) -> list[int]:
    shape = list(tensor.shape)
    if name in _PACKED and shape:
        shape[-1] *= _PACKED[name]
    return shape


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`torch.bfloat16` → `BF16`); others by torch's name."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file: copied as they are, never decoded.

    `dtype` and `shape` are the header's (a packed F4 tensor counts its F4 values); `start` and
    `stop` are absolute offsets in the file.
    """

    path: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_layout(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Every tensor's place in `path`, and the file's metadata, from the header alone.

    The file is opened with the safetensors library first, which validates the header (offsets
    inside the file, no overlaps) that the byte ranges here are then read from.

    Raises:
        InputError: the file is not a readable safetensors file.
    """
    with open_safetensors(path) as handle:
        metadata = dict(handle.metadata() or {})
    try:
        with open(path, "rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc}).") from None
    header.pop("__metadata__", None)
    start = 8 + size
    layout = {key: StoredTensor(path, key, entry["dtype"], tuple(entry["shape"]), start + entry["data_offsets"][0],
                                start + entry["data_offsets"][1]) for key, entry in header.items()}
    return layout, metadata


def refuse_unloadable(layout: Mapping[str, StoredTensor]) -> None:
    """Every tensor must be in a dtype this PyTorch can hold, since each is read back to verify a written file.

    Raises:
        InputError: naming the first tensor in another dtype (e.g. F6_E2M3).
    """
    for stored in layout.values():
        if stored.dtype not in _TORCH_DTYPES:
            raise InputError(f"{stored.path}: tensor {stored.key} is stored as {stored.dtype}, a dtype PyTorch "
                             f"{torch.__version__} cannot load.",
                             hint="Convert that tensor to a dtype PyTorch supports.")


def _pread_into(fd: int, view: memoryview, position: int, stored: StoredTensor) -> None:
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], position + done)
        except OSError as exc:
            raise InputError(f"Cannot read tensor {stored.key} from {stored.path}: {exc.strerror or exc}.") from None
        if got <= 0:
            raise InputError(f"Cannot read tensor {stored.key} from {stored.path}: the file ends early.",
                             hint="The file may be truncated; download or save it again.")
        done += got


def read_stored(stored: StoredTensor) -> torch.Tensor:
    """The tensor at `stored`, read with `pread` into fresh memory (the file is opened for this read only)."""
    data = torch.empty(stored.nbytes, dtype=torch.uint8)
    try:
        fd = os.open(stored.path, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"Cannot read tensor {stored.key} from {stored.path}: {exc.strerror or exc}.") from None
    try:
        _pread_into(fd, data.numpy().data, stored.start, stored)
    finally:
        os.close(fd)
    shape = list(stored.shape)
    if stored.dtype in _PACKED and shape:
        shape[-1] //= _PACKED[stored.dtype]
    return data.view(torch_dtype(stored.dtype)).view(shape)


def _entry(key: str, value: torch.Tensor | StoredTensor) -> tuple[str, list[int], int]:
    """(dtype name, header shape, bytes) of one tensor to write."""
    if isinstance(value, StoredTensor):
        return value.dtype, list(value.shape), value.nbytes
    name = _DTYPE_NAMES.get(value.dtype)
    if name is None:  # a bug: tensors come from files torch and safetensors both read
        raise TypeError(f"{key}: safetensors has no dtype for {value.dtype}")
    return name, _header_shape(value, name), value.numel() * value.element_size()


def _copy_stored(stored: StoredTensor, file: BinaryIO, sources: dict[Path, int], chunk: int) -> None:
    """Copy `stored`'s byte range into `file` in chunks of at most `chunk` bytes."""
    if stored.path not in sources:
        try:
            sources[stored.path] = os.open(stored.path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"Cannot read tensor {stored.key} from {stored.path}: {exc.strerror or exc}.") from None
    buffer = memoryview(bytearray(min(chunk, stored.nbytes)))
    for position in range(stored.start, stored.stop, chunk):
        view = buffer[: min(chunk, stored.stop - position)]
        _pread_into(sources[stored.path], view, position, stored)
        file.write(view)


def header_bytes(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str]) -> bytes:
    """A safetensors file's first bytes: header length and header, for (key, dtype name, shape,
    bytes) laid out in the order given; metadata keys sorted, so the bytes depend on contents only."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key, name, shape, size in entries:
        header[key] = {"dtype": name, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    return len(encoded).to_bytes(8, "little") + encoded


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | StoredTensor], metadata: dict[str, str],
                      chunk: int = 8 << 20) -> None:
    """Write a safetensors file whose bytes depend only on its contents, one tensor at a time.

    `safetensors.save_file` serialises metadata in hash-map order, so two identical runs can
    differ byte for byte; here header keys are sorted and tensors laid out in name order. The
    header comes first, from each tensor's dtype and shape; then the data: a `StoredTensor` is
    copied from its file in chunks of `chunk` bytes without being decoded, a tensor from its
    memory. So memory holds no more than one chunk besides the tensors passed in.
    The result is read back by the safetensors library (see writer._verify) before use.
    """
    ordered = sorted(tensors)
    encoded = header_bytes([(key, *_entry(key, tensors[key])) for key in ordered], metadata)
    sources: dict[Path, int] = {}
    try:
        with open(path, "wb") as file:
            file.write(encoded)
            for key in ordered:
                value = tensors[key]
                if isinstance(value, StoredTensor):
                    _copy_stored(value, file, sources, chunk)
                elif value.numel():
                    file.write(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
            file.flush()
            os.fsync(file.fileno())
    finally:
        for fd in sources.values():
            os.close(fd)


class RowReader:
    """Rows of the tensors of one safetensors file, read with `os.pread` into fresh memory.

    safetensors' own slicing (`get_slice(key)[a:b]`) costs as much as reading the whole tensor
    on every call with the pread backend (0.35 s for any block of a 28672 × 8192 bf16 weight),
    so streaming a weight in blocks that way would read it once per block. A row block of a
    row-major tensor is one contiguous byte range: it is read directly, and costs its own bytes.
    Open the file with `open_safetensors` first: that validates the header this trusts.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, size, 8))
        except (OSError, ValueError, struct.error) as exc:
            os.close(self._fd)
            raise InputError(f"{path} is not a readable safetensors file ({exc}).") from None
        header.pop("__metadata__", None)
        self._start = 8 + size
        self._layout = {k: (v["dtype"], tuple(v["shape"]), v["data_offsets"][0]) for k, v in header.items()}

    def rows(self, key: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `start:stop` (first dimension, clipped to its length) of `key`.

        Read into `buffer` (uint8, large enough) when given, so that a caller streaming many
        blocks reuses its memory instead of allocating (and fragmenting the heap) for each.
        """
        name, shape, offset = self._layout[key]
        stop = min(stop, shape[0])
        out = empty_rows((max(stop - start, 0), *shape[1:]), torch_dtype(name), buffer)
        row_bytes = out[:1].numel() * out.element_size() if out.numel() else 0
        view = out.view(-1).view(torch.uint8).numpy().data
        position, done = self._start + offset + start * row_bytes, 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], position + done)
            if got <= 0:
                raise InputError(f"Cannot read rows {start}:{stop} of tensor {key} from {self._path}: "
                                 "the file ends early.", hint="The file may be truncated; download or save it again.")
            done += got
        return out

    def close(self) -> None:
        os.close(self._fd)

def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (`BF16` → `torch.bfloat16`); float32 for others."""
    return next((dtype for dtype, known in _DTYPE_NAMES.items() if known == name), torch.float32)


def empty_rows(shape: tuple[int, ...], dtype: torch.dtype, buffer: torch.Tensor | None) -> torch.Tensor:
    """An uninitialised tensor of `shape` and `dtype`: the start of the uint8 `buffer`, or new memory."""
    if buffer is None:
        return torch.empty(shape, dtype=dtype)
    count = math.prod(shape) * dtype.itemsize
    return buffer[:count].view(dtype).view(shape)
