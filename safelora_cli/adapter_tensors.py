"""An adapter's tensors, read from its file each time one is asked for.

A 70B all-linear r = 64 adapter is about 1.6 GB in bf16: held whole, it would set the run's peak
memory. So `Adapter.tensors` is a read-only mapping whose keys, shapes and dtypes come from the
file's header, and whose values are read on each access and never kept: the caller holds a
tensor for as long as it needs it, and memory follows the layers in use, not the adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from safelora_cli import pickled_io
from safelora_cli.safetensors_io import StoredTensor, dtype_name, read_layout, read_stored, refuse_unloadable


class AdapterTensors(Mapping[str, torch.Tensor]):
    """Tensor name → tensor, read when asked for; `shape`, `dtype` and `source` read nothing."""

    path: Path
    metadata: dict[str, str]

    def check_loadable(self) -> None:
        """Refuse a tensor in a dtype this PyTorch cannot hold (only safetensors can store one)."""

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape as torch gives it."""
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype name (`BF16`, `F32`, …)."""
        raise NotImplementedError

    def source(self, key: str) -> torch.Tensor | StoredTensor:
        """What a writer copies for an untouched tensor: its bytes in the file, or a mapped tensor."""
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:
        # Mapping's own `in` would read the tensor to find out.
        return key in set(self)


class SafetensorsTensors(AdapterTensors):
    """The tensors of an `adapter_model.safetensors`, each read by `pread` from its byte range."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._layout, self.metadata = read_layout(path)

    def check_loadable(self) -> None:
        refuse_unloadable(self._layout)

    def __getitem__(self, key: str) -> torch.Tensor:
        return read_stored(self._layout[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __contains__(self, key: object) -> bool:
        return key in self._layout

    def __len__(self) -> int:
        return len(self._layout)

    def shape(self, key: str) -> tuple[int, ...]:
        stored = self._layout[key]
        if stored.dtype == "F4" and stored.shape:  # torch packs two F4 values in one element
            return (*stored.shape[:-1], stored.shape[-1] // 2)
        return stored.shape

    def dtype(self, key: str) -> str:
        return self._layout[key].dtype

    def source(self, key: str) -> StoredTensor:
        return self._layout[key]


class PickledTensors(AdapterTensors):
    """The tensors of a legacy `adapter_model.bin`, memory-mapped (`weights_only` loading).

    A tensor read is copied out of the mapping, so what the caller holds is its own; the mapped
    pages are file pages the kernel may drop. The pre-1.6 (non-zip) format cannot be mapped and
    is held whole.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state = pickled_io.load_state_dict(path)
        self.metadata = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._state:
            raise KeyError(key)
        return pickled_io.take(self._state, key, self.path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def __len__(self) -> int:
        return len(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> str:
        return dtype_name(self._state[key].dtype)

    def source(self, key: str) -> torch.Tensor:
        return self._state[key]

