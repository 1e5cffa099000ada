"""Read the next weights in a background thread while the current one is computed.

Three costs overlap: reading from disk or page cache (the reader thread), copying to the GPU
(pinned host memory and an asynchronous copy on the reader's own CUDA stream), and computing
(the caller's thread). What is read but not yet done with is bounded in bytes, not in modules:
a weight pair of up to `HOLD_BYTES` is read whole, once, and held while it is used; a wider one
is streamed in chunks of rows of at most `CHUNK_BYTES`, once for each of the two passes the
projection makes over V (the second read usually comes from the page cache). So the read-ahead
holds at most max(`READ_AHEAD_BYTES`, 2 × `HOLD_BYTES`) whatever the width of the model: the
same for a 1B, a 70B and a 405B model. (The exact projection, which needs V whole, is the
exception: see `AlignmentMatrix.dense`.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from safelora_cli.alignment import BLOCK_ELEMENTS, PairSide, Weight
from safelora_cli.checkpoint import Checkpoint, TensorStream
from safelora_cli.streamed import PASSES, Chunk, End, StreamedPair, wait_ready

# What is read and not yet done with, both models together.
READ_AHEAD_BYTES = 384 << 20
# A base + aligned pair up to this size (a 7B-class MLP weight in bf16: 180 MB) is read whole;
# see docs/benchmarks.md for the measurement behind holding against streaming twice.
HOLD_BYTES = 192 << 20
# Both models' rows of one read of a streamed weight.
CHUNK_BYTES = 32 << 20
_POLL_SECONDS = 0.1


@dataclass
class Fetched:
    """One weight key's base and aligned weights, on the compute device once `wait()` returns.

    They are tensors, or, for a weight streamed in row chunks, the two sides of a `StreamedPair`
    (which `AlignmentMatrix` accepts in their place).
    """

    key: str
    w_base: Weight
    w_aligned: Weight
    nbytes: int
    ready: Any = None  # a torch.cuda.Event when the copy runs asynchronously

    def wait(self) -> tuple[Weight, Weight]:
        if isinstance(self.w_base, torch.Tensor) and isinstance(self.w_aligned, torch.Tensor):
            wait_ready(self.w_base.device, self.ready, (self.w_base, self.w_aligned))
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


def chunk_rows(models: tuple[Checkpoint, ...], key: str, chunk_bytes: int) -> int:
    """Rows per chunk: within `chunk_bytes`, and a multiple of V's CPU block (so blocks stay aligned)."""
    rows, cols = models[0].tensors[key].shape
    per_row = weight_bytes(models, key) // max(rows, 1)
    fit = max(1, chunk_bytes // max(per_row, 1))
    block = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return min(rows, fit if fit < block else fit - fit % block)


class Prefetcher:
    """Iterate `Fetched` items for `keys`, in that order, reading ahead up to `budget_bytes`.

    A whole weight pair counts against the budget from when it is read until the consumer asks
    for the next item; a chunk of a streamed one until the consumer asks for the next chunk.
    The budget is raised to two of the largest such units, so that one can be read while the
    other is computed. Use as a context manager: leaving it (normally or by an exception)
    stops the reader.
    """

    def __init__(self, keys: list[str], base: Checkpoint, aligned: Checkpoint, device: torch.device,
                 budget_bytes: int = READ_AHEAD_BYTES, hold_bytes: int | None = None,
                 chunk_bytes: int | None = None) -> None:
        self._keys = keys
        self.models = (base, aligned)
        self.device = device
        self._hold = HOLD_BYTES if hold_bytes is None else hold_bytes
        self._chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self._chunks = {k: chunk_rows(self.models, k, self._chunk_bytes) for k in keys if self._streamed(k)}
        units = [self._unit_bytes(k) for k in keys]
        self._budget = max(budget_bytes, 2 * max(units, default=0))
        # Room for one chunk of any streamed weight (with 8 bytes to align the aligned rows).
        self._buffer_bytes = max((self._unit_bytes(k) for k in self._chunks), default=0) + 8
        self._free: list[torch.Tensor] = []  # chunk buffers handed back, reused by the next reads
        self._free_lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue()
        self._held = 0  # bytes read and not yet released by the consumer
        self._room = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safelora-reader", daemon=True)

    def _streamed(self, key: str) -> bool:
        return len(self.models[0].tensors[key].shape) == 2 and weight_bytes(self.models, key) > self._hold

    def _unit_bytes(self, key: str) -> int:
        """The most bytes of `key` held at once: the pair, or one chunk of it."""
        total = weight_bytes(self.models, key)
        if key not in self._chunks:
            return total
        return total // self.models[0].tensors[key].shape[0] * self._chunks[key]

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._room:
            self._room.notify_all()
        self._thread.join()

    def take(self) -> object:
        """The reader's next message (the caller's thread); its errors are raised here."""
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def release(self, nbytes: int, buffer: torch.Tensor | None = None) -> None:
        """The consumer is done with `nbytes` of what was read (and with the chunk `buffer`)."""
        if buffer is not None:
            with self._free_lock:
                self._free.append(buffer)
        if nbytes:
            with self._room:
                self._held -= nbytes
                self._room.notify_all()

    def new_buffer(self) -> torch.Tensor:
        """A chunk buffer: a handed-back one when there is one. Reusing a few fixed buffers keeps the
        heap from fragmenting, which would otherwise let memory creep up over a long stream."""
        with self._free_lock:
            if self._free:
                return self._free.pop()
        return torch.empty(self._buffer_bytes, dtype=torch.uint8)

    def read_chunk(self, stream: TensorStream, key: str, start: int, stop: int,
                   buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `start:stop` of `key` in both models, read into `buffer` one after the other."""
        info = self.models[0].tensors[key]
        split = (info.nbytes // info.shape[0] * (stop - start) + 7) // 8 * 8  # aligned for any dtype
        base = stream.read_rows(self.models[0], key, start, stop, buffer[:split])
        return base, stream.read_rows(self.models[1], key, start, stop, buffer[split:])

    def __iter__(self) -> Iterator[Fetched]:
        while True:
            item = self.take()
            if item is _DONE:
                return
            assert isinstance(item, Fetched)
            yield item
            nbytes, side = item.nbytes, item.w_base
            del item  # the consumer is done with it: its memory may go
            if isinstance(side, PairSide):
                assert isinstance(side.source, StreamedPair)
                side.source.finish()
            self.release(nbytes)

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
        copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            with TensorStream() as stream:
                for key in self._keys:
                    done = self._stream_key(key, stream, copy_stream) if key in self._chunks else \
                        self._read_key(key, stream, copy_stream)
                    if not done:
                        return
        except BaseException as exc:  # handed to the consumer, which re-raises it in its thread
            self._queue.put(_Failed(exc))
            return
        self._queue.put(_DONE)

    def _read_key(self, key: str, stream: TensorStream, copy_stream: Any) -> bool:
        nbytes = weight_bytes(self.models, key)
        if not self._wait_for_room(nbytes):
            return False
        tensors, ready = self._to_device([stream.read(model, key) for model in self.models], copy_stream)
        self._queue.put(Fetched(key, tensors[0], tensors[1], nbytes, ready))
        return True

    def _stream_key(self, key: str, stream: TensorStream, copy_stream: Any) -> bool:
        pair = StreamedPair(self, key, self._chunks[key])
        self._queue.put(Fetched(key, PairSide(pair, False), PairSide(pair, True), 0))
        rows, step = pair.shape[0], self._chunks[key]
        per_row = weight_bytes(self.models, key) // rows
        for index in range(PASSES):
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                if not self._wait_for_room(per_row * (stop - start)):
                    return False
                buffer = self.new_buffer()
                read = self.read_chunk(stream, key, start, stop, buffer)
                tensors, ready = self._to_device(list(read), copy_stream)
                if copy_stream is not None:  # the rows were copied into pinned memory: the buffer is free
                    self.release(0, buffer)
                self._queue.put(Chunk(index, start, stop, tensors[0], tensors[1], per_row * (stop - start), ready,
                                       None if copy_stream is not None else buffer))
        self._queue.put(End(key))
        return True

    def _to_device(self, tensors: list[torch.Tensor], copy_stream: Any) -> tuple[list[torch.Tensor], Any]:
        if copy_stream is None:
            return tensors, None
        with torch.cuda.stream(copy_stream):
            moved = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        return moved, ready
