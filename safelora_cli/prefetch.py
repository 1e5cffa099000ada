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

from safelora_cli.alignment import BLOCK_ELEMENTS, PairSide, Rows, Weight
from safelora_cli.checkpoint import Checkpoint, TensorStream
from safelora_cli.safetensors_io import torch_dtype

# What is read and not yet done with, both models together.
READ_AHEAD_BYTES = 384 << 20
# A base + aligned pair up to this size (a 7B-class MLP weight in bf16: 180 MB) is read whole;
# see docs/benchmarks.md for the measurement behind holding against streaming twice.
HOLD_BYTES = 192 << 20
# Both models' rows of one read of a streamed weight.
CHUNK_BYTES = 32 << 20
# How often a streamed weight is read ahead: the passes of the paper's projection (and of the
# exact one: ‖V‖_F, then V whole). Any further pass reads the rows again in the caller's thread.
PASSES = 2
_POLL_SECONDS = 0.1


def _ready(device: torch.device, ready: Any, tensors: tuple[torch.Tensor, ...]) -> None:
    """Wait (on the compute stream) for an asynchronous copy made on the reader's stream."""
    if ready is None:
        return
    torch.cuda.current_stream(device).wait_event(ready)
    for tensor in tensors:
        # Memory made on the copy stream is used on the compute stream: tell the allocator.
        tensor.record_stream(torch.cuda.current_stream(tensor.device))


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
            _ready(self.w_base.device, self.ready, (self.w_base, self.w_aligned))
        return self.w_base, self.w_aligned


@dataclass(frozen=True)
class _Chunk:
    """Rows `start:stop` of one pass over a streamed weight."""

    pass_index: int
    start: int
    stop: int
    base: torch.Tensor
    aligned: torch.Tensor
    nbytes: int
    ready: Any = None


@dataclass(frozen=True)
class _End:
    key: str


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


class StreamedPair:
    """A `RowSource` over a weight pair the prefetcher streams: the first `PASSES` passes come
    from the reader thread's chunks, any later one is read again here (from the page cache)."""

    def __init__(self, owner: Prefetcher, key: str, rows_per_chunk: int) -> None:
        self._owner, self._key, self._chunk_rows = owner, key, rows_per_chunk
        info = owner.models[0].tensors[key]
        rows, cols = info.shape
        self.shape, self.dtype, self.device = (rows, cols), torch_dtype(info.dtype), owner.device
        self._passes = 0  # passes started
        self._held = 0  # bytes of the chunk last taken, released when the next one is
        self._ended = False
        self._stream: TensorStream | None = None

    def rows(self, block_rows: int) -> Iterator[Rows]:
        index, self._passes = self._passes, self._passes + 1
        chunks = self._queued(index) if index < PASSES and not self._ended else self._read_again()
        for chunk in chunks:
            for start in range(0, chunk.stop - chunk.start, block_rows):
                part = slice(start, start + block_rows)
                rows = slice(chunk.start + start, min(chunk.stop, chunk.start + start + block_rows))
                yield rows, chunk.base[part], chunk.aligned[part]

    def _queued(self, index: int) -> Iterator[_Chunk]:
        """Pass `index` from the reader's chunks, skipping what is left of abandoned passes."""
        while True:
            chunk = self._next()
            if chunk is None:
                return
            if chunk.pass_index < index:
                continue
            _ready(self.device, chunk.ready, (chunk.base, chunk.aligned))
            yield chunk
            if chunk.stop == self.shape[0]:
                return

    def _next(self) -> _Chunk | None:
        self._owner.release(self._held)
        self._held = 0
        if self._ended:
            return None
        item = self._owner.take()
        if isinstance(item, _End):
            self._ended = True
            return None
        assert isinstance(item, _Chunk)
        self._held = item.nbytes
        return item

    def _read_again(self) -> Iterator[_Chunk]:
        if self._stream is None:
            self._stream = TensorStream()
        for start in range(0, self.shape[0], self._chunk_rows):
            stop = min(self.shape[0], start + self._chunk_rows)
            base, aligned = (self._stream.read_rows(model, self._key, start, stop).to(self.device)
                             for model in self._owner.models)
            yield _Chunk(-1, start, stop, base, aligned, 0)

    def finish(self) -> None:
        """Discard what the reader sent for this weight and the caller did not use."""
        while self._next() is not None:
            pass
        if self._stream is not None:
            self._stream.close()


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

    def release(self, nbytes: int) -> None:
        if nbytes:
            with self._room:
                self._held -= nbytes
                self._room.notify_all()

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
                read = [stream.read_rows(model, key, start, stop) for model in self.models]
                tensors, ready = self._to_device(read, copy_stream)
                self._queue.put(_Chunk(index, start, stop, tensors[0], tensors[1], per_row * (stop - start), ready))
        self._queue.put(_End(key))
        return True

    def _to_device(self, tensors: list[torch.Tensor], copy_stream: Any) -> tuple[list[torch.Tensor], Any]:
        if copy_stream is None:
            return tensors, None
        with torch.cuda.stream(copy_stream):
            moved = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        return moved, ready
