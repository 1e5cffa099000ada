"""Read the next modules' weights in a background thread while the current one is computed.

Three costs overlap: reading from disk or page cache (the reader thread), copying to the GPU
(pinned host memory and an asynchronous copy on the reader's own CUDA stream), and computing
(the caller's thread). The queue between them is bounded, so at most `depth` modules wait in
memory whatever the model size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from safelora_cli.checkpoint import Checkpoint, TensorStream

_POLL_SECONDS = 0.1


@dataclass
class Fetched:
    """One weight key's base and aligned tensors, on the compute device once `wait()` returns."""

    key: str
    w_base: torch.Tensor
    w_aligned: torch.Tensor
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


class Prefetcher:
    """Iterate `Fetched` items for `keys`, in that order, read `depth` modules ahead.

    Use as a context manager: leaving it (normally or by an exception) stops the reader.
    """

    def __init__(self, keys: list[str], base: Checkpoint, aligned: Checkpoint, device: torch.device,
                 depth: int = 2) -> None:
        self._keys = keys
        self._models = (base, aligned)
        self._device = device
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safelora-reader", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Iterator[Fetched]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]

    def _put(self, item: object) -> bool:
        """Block until there is room or the consumer has stopped; False when it stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        copy_stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        try:
            with TensorStream() as stream:
                for key in self._keys:
                    if self._stop.is_set():
                        return
                    base, aligned = (stream.read(model, key) for model in self._models)
                    if not self._put(self._to_device(key, base, aligned, copy_stream)):
                        return
        except BaseException as exc:  # handed to the consumer, which re-raises it in its thread
            self._put(_Failed(exc))
            return
        self._put(_DONE)

    def _to_device(self, key: str, base: torch.Tensor, aligned: torch.Tensor, copy_stream: Any) -> Fetched:
        if copy_stream is None:
            return Fetched(key, base, aligned)
        with torch.cuda.stream(copy_stream):
            moved = [t.pin_memory().to(self._device, non_blocking=True) for t in (base, aligned)]
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        return Fetched(key, moved[0], moved[1], ready)
