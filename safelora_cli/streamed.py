"""A weight pair streamed in row chunks: the prefetcher's side of `alignment.RowSource`.

The reader thread sends, for a weight too wide to hold whole, its rows in chunks, once for
each pass the projection makes over V; `StreamedPair` hands them to `AlignmentMatrix` block by
block, skips what an abandoned pass leaves, and reads the rows again itself for any pass
beyond those. Chunk buffers go back to the reader as soon as the next chunk is taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from safelora_cli.alignment import Rows
from safelora_cli.checkpoint import Checkpoint, TensorStream
from safelora_cli.safetensors_io import torch_dtype

# How often a streamed weight is read ahead: the passes of the paper's projection (and of the
# exact one: ‖V‖_F, then V whole). Any further pass reads the rows again in the caller's thread.
PASSES = 2


def wait_ready(device: torch.device, ready: Any, tensors: tuple[torch.Tensor, ...]) -> None:
    """Wait (on the compute stream) for an asynchronous copy made on the reader's stream."""
    if ready is None:
        return
    torch.cuda.current_stream(device).wait_event(ready)
    for tensor in tensors:
        # Memory made on the copy stream is used on the compute stream: tell the allocator.
        tensor.record_stream(torch.cuda.current_stream(tensor.device))



@dataclass(frozen=True)
class Chunk:
    """Rows `start:stop` of one pass over a streamed weight."""

    pass_index: int
    start: int
    stop: int
    base: torch.Tensor
    aligned: torch.Tensor
    nbytes: int
    ready: Any = None
    buffer: torch.Tensor | None = None  # the reader's buffer the rows lie in, handed back when done


@dataclass(frozen=True)
class End:
    key: str



class ChunkSupply(Protocol):
    """What a `StreamedPair` needs from the prefetcher that feeds it."""

    models: tuple[Checkpoint, Checkpoint]
    device: torch.device

    def take(self) -> object: ...

    def release(self, nbytes: int, buffer: torch.Tensor | None = None) -> None: ...

    def new_buffer(self) -> torch.Tensor: ...

    def read_chunk(self, stream: TensorStream, key: str, start: int, stop: int,
                   buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class StreamedPair:
    """A `RowSource` over a weight pair the prefetcher streams: the first `PASSES` passes come
    from the reader thread's chunks, any later one is read again here (from the page cache)."""

    def __init__(self, owner: ChunkSupply, key: str, rows_per_chunk: int) -> None:
        self._owner, self._key, self._chunk_rows = owner, key, rows_per_chunk
        info = owner.models[0].tensors[key]
        rows, cols = info.shape
        self.shape, self.dtype, self.device = (rows, cols), torch_dtype(info.dtype), owner.device
        self._passes = 0  # passes started
        self._held: tuple[int, torch.Tensor | None] = (0, None)  # the chunk last taken: bytes, buffer
        self._ended = False
        self._stream: TensorStream | None = None
        self._buffer: torch.Tensor | None = None  # for reading rows again, reused by every chunk

    def rows(self, block_rows: int) -> Iterator[Rows]:
        index, self._passes = self._passes, self._passes + 1
        chunks = self._queued(index) if index < PASSES and not self._ended else self._read_again()
        for chunk in chunks:
            for start in range(0, chunk.stop - chunk.start, block_rows):
                part = slice(start, start + block_rows)
                rows = slice(chunk.start + start, min(chunk.stop, chunk.start + start + block_rows))
                yield rows, chunk.base[part], chunk.aligned[part]

    def _queued(self, index: int) -> Iterator[Chunk]:
        """Pass `index` from the reader's chunks, skipping what is left of abandoned passes."""
        while True:
            chunk = self._next()
            if chunk is None:
                return
            if chunk.pass_index < index:
                continue
            wait_ready(self.device, chunk.ready, (chunk.base, chunk.aligned))
            yield chunk
            if chunk.stop == self.shape[0]:
                return

    def _next(self) -> Chunk | None:
        self._owner.release(*self._held)
        self._held = (0, None)
        if self._ended:
            return None
        item = self._owner.take()
        if isinstance(item, End):
            self._ended = True
            return None
        assert isinstance(item, Chunk)
        self._held = (item.nbytes, item.buffer)
        return item

    def _read_again(self) -> Iterator[Chunk]:
        if self._stream is None:
            self._stream = TensorStream()
            self._buffer = self._owner.new_buffer()
        assert self._buffer is not None
        for start in range(0, self.shape[0], self._chunk_rows):
            stop = min(self.shape[0], start + self._chunk_rows)
            base, aligned = self._owner.read_chunk(self._stream, self._key, start, stop, self._buffer)
            yield Chunk(-1, start, stop, base.to(self.device), aligned.to(self.device), 0)

    def finish(self) -> None:
        """Discard what the reader sent for this weight and the caller did not use."""
        while self._next() is not None:
            pass
        if self._stream is not None:
            self._stream.close()
