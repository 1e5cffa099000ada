"""Safe access to PyTorch pickle checkpoints (`pytorch_model.bin`, `adapter_model.bin`).

Only `torch.load(weights_only=True)` is ever used: its restricted unpickler accepts plain
tensors and containers and refuses anything that would run code, and there is deliberately
no fallback to `weights_only=False`. Zip-format files (every `torch.save` since PyTorch 1.6)
are memory-mapped, so indexing a shard reads no tensor data and reading one tensor touches
only its pages; the old non-zip format cannot be mapped and is read whole.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from safelora_cli import file_kind
from safelora_cli.errors import InputError, UnsupportedError
from safelora_cli.safetensors_io import dtype_name

StateDict = dict[str, torch.Tensor]


def load_state_dict(path: Path) -> StateDict:
    """Every tensor of a pickled state dict, memory-mapped where the format allows it.

    Raises:
        UnsupportedError: when the file holds objects other than tensors (loading them would
            execute code from the file).
        InputError: when the file is missing, truncated or not a state dict.
    """
    if not path.is_file():
        raise InputError(f"{path} does not exist.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except PermissionError:
        raise InputError(f"Permission denied reading {path}.") from None
    except pickle.UnpicklingError:
        # A text file (git-lfs pointer, HTML page) fails here too: name it before blaming pickled code.
        raise file_kind.explain(path, "a PyTorch checkpoint") or UnsupportedError(
            f"{path} contains pickled objects other than tensors; it was not loaded, because loading it "
            "would run code stored in the file.",
            hint="Use the safetensors release of this model or adapter, or convert the file in a sandbox you trust.",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        # Truncated zip → RuntimeError, empty file → EOFError: the file is damaged, not a bug here.
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise file_kind.explain(path, "a PyTorch checkpoint") or InputError(
            f"{path} is not a readable PyTorch checkpoint ({reason}).",
            hint="The file may be truncated or corrupted; download or save it again.",
        ) from None
    if not isinstance(loaded, dict):
        raise InputError(f"{path} holds a {type(loaded).__name__}, not a state dict of named tensors.")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name → (shape, safetensors dtype string); with a mapped file no data is read."""
    return {key: (tuple(t.shape), dtype_name(t.dtype)) for key, t in load_state_dict(path).items()}


def take(state: StateDict, key: str, path: Path) -> torch.Tensor:
    """One tensor copied out of a mapped state dict, so the mapping can be released afterwards."""
    tensor = state.get(key)
    if tensor is None:
        raise InputError(f"Cannot read tensor {key} from {path}: the file does not contain it.")
    return tensor.clone()
