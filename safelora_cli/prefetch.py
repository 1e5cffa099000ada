"""Read the next modules' weights in a background thread while the current one is computed.

Three costs overlap: reading from disk or page cache (the reader thread), copying to the GPU
(pinned host memory and an asynchronous copy on the reader's own CUDA stream), and computing
(the caller's thread). What is read but not yet done with is bounded in bytes, not in modules,
so memory is the same for a 1B and a 70B model: small modules are read many ahead, large ones
few, and a module larger than the budget alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from safelora_cli.checkpoint import Checkpoint, TensorStream

# Enough for two 7B-class MLP weights of both models, so reading overlaps computing there.
READ_AHEAD_BYTES = 384 << 20
_POLL_SECONDS = 0.1


@dataclass
class Fetched:
    """One weight key's base and aligned tensors, on the compute device once `wait()` returns."""

    key: str
    w_base: torch.Tensor
    w_aligned: torch.Tensor
    nbytes: int
    ready: Any = None  # a torch.cuda.Event when the copy runs asynchronously

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ready is not None:
            torch.cuda.current_stream(self.w_base.device).wait_event(self.ready)
            for tensor in (self.w_base, self.w_aligned):
                # Memory made on the copy stream is used on the compute stream: tell the allocator.
                tensor.record_stream(torch.cuda.current_stream(tensor.device))
        return self.w_base, self.w_aligned


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_DONE = object()


def disk_order(keys: list[str], base: Checkpoint) -> list[str]:
    """Shard by shard, and within a shard in name order, which is how safetensors lays tensors out."""
    return sorted(keys, key=lambda k: (str(base.tensors[k].file), k))


def weight_bytes(models: tuple[Checkpoint, ...], key: str) -> int:
    """Bytes of `key` in all `models` together, from their headers."""
    return sum(model.tensors[key].nbytes for model in models)


class Prefetcher:
    """Iterate `Fetched` items for `keys`, in that order, reading ahead up to `budget_bytes`.

    An item counts against the budget from when it is read until the consumer asks for the
    next one. The budget is raised to two of the largest items, so that one can be read while
    the other is computed. Use as a context manager: leaving it (normally or by an exception)
    stops the reader.
    """

    def __init__(self, keys: list[str], base: Checkpoint, aligned: Checkpoint, device: torch.device,
                 budget_bytes: int = READ_AHEAD_BYTES) -> None:
        self._keys = keys
        self._models = (base, aligned)
        self._device = device
        largest = max((weight_bytes(self._models, k) for k in keys), default=0)
        self._budget = max(budget_bytes, 2 * largest)
        self._queue: queue.Queue[object] = queue.Queue()
        self._held = 0  # bytes read and not yet released by the consumer
        self._room = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safelora-reader", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._room:
            self._room.notify_all()
        self._thread.join()

    def __iter__(self) -> Iterator[Fetched]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            assert isinstance(item, Fetched)
            yield item
            nbytes = item.nbytes
            del item  # the consumer is done with it: its memory may go
            with self._room:
                self._held -= nbytes
                self._room.notify_all()

    def _wait_for_room(self, nbytes: int) -> bool:
        """Block until `nbytes` fit the budget (or nothing is held); False when stopped."""
        with self._room:
            while self._held > 0 and self._held + nbytes > self._budget:
                if self._stop.is_set():
                    return False
                self._room.wait(_POLL_SECONDS)
            self._held += nbytes
        return not self._stop.is_set()

    def _run(self) -> None:
        copy_stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        try:
            with TensorStream() as stream:
                for key in self._keys:
                    nbytes = weight_bytes(self._models, key)
                    if not self._wait_for_room(nbytes):
                        return
                    base, aligned = (stream.read(model, key) for model in self._models)
                    self._queue.put(self._to_device(key, base, aligned, nbytes, copy_stream))
        except BaseException as exc:  # handed to the consumer, which re-raises it in its thread
            self._queue.put(_Failed(exc))
            return
        self._queue.put(_DONE)

    def _to_device(self, key: str, base: torch.Tensor, aligned: torch.Tensor, nbytes: int,
                   copy_stream: Any) -> Fetched:
        if copy_stream is None:
            return Fetched(key, base, aligned, nbytes)
        with torch.cuda.stream(copy_stream):
            moved = [t.pin_memory().to(self._device, non_blocking=True) for t in (base, aligned)]
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        return Fetched(key, moved[0], moved[1], nbytes, ready)
