"""V = W_aligned − W_base for one layer, formed a block of rows at a time.

Forming V whole costs out·in float32 values (180 MB for a 7B MLP weight, 3.5 GB for a 405B
one) on top of the weights themselves; block by block, the working set is a fixed few MB
whatever the model's size or width, and each block stays in cache while it is used. The
weights themselves need not be whole either: a `RowSource` delivers their stored rows a block
at a time (the prefetcher streams wide weights from disk that way). Products with V need two
passes over the blocks: C·B = V·(Vᵀ·B)/‖V‖_F first accumulates M = Vᵀ·B (in, r) and ‖V‖_F,
then forms C·B a block at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

# 4 MB of float32 per block on the CPU: measured fastest among 0.5–64 MB blocks for 7B-shaped
# weights (a block that fits in cache beats forming V once: 64 ms against 200 ms for an
# 11008 × 4096 weight at r = 16). A weight that fits in one block is formed once and reused by
# every pass. On a GPU memory is not the constraint, and V is always formed whole, once.
BLOCK_ELEMENTS = 1 << 20

Rows = tuple[slice, torch.Tensor | None, torch.Tensor]  # (stored rows, base rows, aligned rows)
# A source whose base rows are None delivers V itself as the aligned rows (a subspace file stores V).


class RowSource(Protocol):
    """The stored rows of a base/aligned weight pair, delivered in order, one pass at a time."""

    @property
    def shape(self) -> tuple[int, int]: ...  # as stored

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def rows(self, block_rows: int) -> Iterator[Rows]:
        """One pass over all stored rows in blocks of at most `block_rows`, on `device`.

        Each block starts at a multiple of `block_rows` or ends a block of the source's own
        (a read chunk); its tensors are only valid until the next block is asked for.
        """
        ...


@dataclass(frozen=True)
class TensorRows:
    """A `RowSource` over two weights already in memory (no base: `aligned` is V itself)."""

    base: torch.Tensor | None
    aligned: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.aligned.shape
        return rows, cols

    @property
    def dtype(self) -> torch.dtype:
        return self.aligned.dtype

    @property
    def device(self) -> torch.device:
        return self.aligned.device

    def rows(self, block_rows: int) -> Iterator[Rows]:
        for start in range(0, self.aligned.shape[0], block_rows):
            rows = slice(start, start + block_rows)
            yield rows, None if self.base is None else self.base[rows], self.aligned[rows]


@dataclass(frozen=True)
class PairSide:
    """One weight of a `RowSource` pair, standing where a whole weight tensor would."""

    source: RowSource
    aligned: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.source.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    @property
    def device(self) -> torch.device:
        return self.source.device


Weight = torch.Tensor | PairSide


def _source(w_base: Weight, w_aligned: Weight) -> RowSource:
    if isinstance(w_base, torch.Tensor) and isinstance(w_aligned, torch.Tensor):
        return TensorRows(w_base, w_aligned)
    if isinstance(w_base, PairSide) and isinstance(w_aligned, PairSide) and w_base.source is w_aligned.source:
        return w_base.source
    raise TypeError("w_base and w_aligned must be two tensors or the two sides of one RowSource")


class AlignmentMatrix:
    """V (out, in) of one layer, as the difference of two weights stored in the same layout.

    Args:
        w_base: the base weight, (out, in), or (in, out) when `transposed`; a tensor, or one
            side of a `RowSource` (then `w_aligned` is its other side).
        w_aligned: the aligned weight, same shape and layout as `w_base`.
        transposed: the checkpoint stores Vᵀ (GPT-2 Conv1D, embeddings relative to their LoRA).
        block_elements: about how many float32 values one block holds.
    """

    def __init__(self, w_base: Weight, w_aligned: Weight, transposed: bool = False,
                 block_elements: int = BLOCK_ELEMENTS) -> None:
        self._source, self.transposed = _source(w_base, w_aligned), transposed
        rows, cols = self._source.shape
        self.device = self._source.device
        if self.device.type != "cpu":
            block_elements = rows * cols
        self._block_rows = min(rows, max(1, block_elements // max(cols, 1)))
        self._whole: torch.Tensor | None = None  # V as stored, when it is a single block
        self.shape = (cols, rows) if transposed else (rows, cols)
        self._norm: float | None = None
        # (Vᵀ·B)ᵀ of the last paper_project, one (r, in) per B: ⟨B·A, V⟩_F = sum((Vᵀ·B)ᵀ ⊙ A) for free.
        self.vtbs: list[torch.Tensor] | None = None

    @staticmethod
    def _form(base: torch.Tensor | None, aligned: torch.Tensor, out: torch.Tensor,
              scratch: torch.Tensor | None) -> torch.Tensor:
        """aligned − base in float32, written into `out` (same rows; `scratch` for a cast); V itself
        when there is no base."""
        if base is None:
            return out.copy_(aligned)
        # Subtracting a bfloat16 operand in place casts element by element, several times
        # slower than casting it into a float32 buffer first.
        return out.copy_(aligned).sub_(base if scratch is None else scratch.copy_(base))

    def _blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, float32 block) over the *stored* rows; a block is only valid until the next one."""
        stored_rows, cols = self._source.shape
        if self._whole is None and self._block_rows >= stored_rows:
            # A single block (a GPU, or a small weight): formed once, from however the source
            # delivers it, and kept for the next pass instead of being formed again.
            whole = torch.empty(stored_rows, cols, dtype=torch.float32, device=self.device)
            scratch = None if self._source.dtype == torch.float32 else torch.empty_like(whole)
            for rows, base, aligned in self._source.rows(stored_rows):
                self._form(base, aligned, whole[rows], None if scratch is None else scratch[rows])
            del scratch
            self._whole = whole
        if self._whole is not None:
            yield slice(0, stored_rows), self._whole
            return
        # Buffers reused by every block of every pass: fresh allocations of this size would be
        # served from the heap and fragment it, and peak memory would creep up over a long run.
        buffer = torch.empty(self._block_rows, cols, dtype=torch.float32, device=self.device)
        scratch = None if self._source.dtype == torch.float32 else torch.empty_like(buffer)
        for rows, base, aligned in self._source.rows(self._block_rows):
            n = aligned.shape[0]
            yield rows, self._form(base, aligned, buffer[:n], None if scratch is None else scratch[:n])

    def stored_blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """V as the checkpoints store it, float32, a block of rows at a time (each block is only
        valid until the next is asked for): what a subspace file's exact mode writes."""
        return self._blocks()

    def norm(self) -> float:
        """‖V‖_F (inf or nan when a weight is not finite)."""
        if self._norm is None:
            self._norm = math.sqrt(sum(_squared_norm(block) for _, block in self._blocks()))
        return self._norm

    def paper_project(self, bs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """C·B = V·(Vᵀ·B)/‖V‖_F for each B (out, r), float32 on this device.

        Two passes over V: the first also gives ‖V‖_F, so V is formed no more often than the
        products need. Returns None, after the first pass, when ‖V‖_F is 0 or not finite
        (`norm()` then tells which). Each V block serves all the B's, and each B sees exactly the
        operations it would see alone, so results do not depend on which others are given.

        Products are written with the thin dimension r first, (r, n)·(n, k): BLAS is several
        times faster that way round than with r last for small r. When V·M itself overflows
        float32 (entries near 1e19 and more), the second pass is made again with M/‖V‖_F, which
        is bounded by ‖B‖; if even that overflows, ‖V‖_F is recorded as inf and None returned.
        """
        bts = [b.T.contiguous() for b in bs]  # (r, out)
        mts, squared = self._first_pass(bts)
        self.vtbs = mts
        if not self._set_norm(squared):
            return None
        cbs = self._second_pass(mts, scale_first=False)
        if all(bool(torch.isfinite(cb).all()) for cb in cbs):
            return cbs
        cbs = self._second_pass(mts, scale_first=True)
        if all(bool(torch.isfinite(cb).all()) for cb in cbs):
            return cbs
        self._norm = math.inf
        return None

    def _first_pass(self, bts: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """Mᵀ = (Vᵀ·B)ᵀ (r, in) for each Bᵀ, and ‖V‖_F²."""
        squared = 0.0
        if not self.transposed:  # stored S = V (out, in): Mᵀ = Σ Bᵀ_blk · S_blk
            mts = [torch.zeros(bt.shape[0], self.shape[1], device=bt.device) for bt in bts]
            for rows, block in self._blocks():
                squared += _squared_norm(block)
                for mt, bt in zip(mts, bts, strict=True):
                    mt.addmm_(bt[:, rows], block)
        else:  # stored S = Vᵀ (in, out): Mᵀ = Bᵀ Sᵀ, block columns Bᵀ S_blkᵀ
            parts: list[list[torch.Tensor]] = [[] for _ in bts]
            for _, block in self._blocks():
                squared += _squared_norm(block)
                for part, bt in zip(parts, bts, strict=True):
                    part.append(torch.mm(bt, block.T))
            mts = [torch.cat(part, dim=1) for part in parts]
        return mts, squared

    def _second_pass(self, mts: list[torch.Tensor], scale_first: bool) -> list[torch.Tensor]:
        """C·B from each Mᵀ: divided by ‖V‖_F at the end, or (`scale_first`) before the products."""
        n = self.norm()
        if scale_first:
            mts = [mt / n for mt in mts]
        if not self.transposed:  # (C·B)ᵀ block columns = Mᵀ · S_blkᵀ
            parts: list[list[torch.Tensor]] = [[] for _ in mts]
            for _, block in self._blocks():
                for part, mt in zip(parts, mts, strict=True):
                    part.append(torch.mm(mt, block.T))
            cbts = [torch.cat(part, dim=1) for part in parts]
        else:  # (C·B)ᵀ = Mᵀ Vᵀ = Σ M_blkᵀ S_blk
            cbts = [torch.zeros(mt.shape[0], self.shape[0], device=mt.device) for mt in mts]
            for rows, block in self._blocks():
                for cbt, mt in zip(cbts, mts, strict=True):
                    cbt.addmm_(mt[:, rows], block)
        cbs = [cbt.T.contiguous() for cbt in cbts]
        return cbs if scale_first else [cb.div_(n) for cb in cbs]

    def _set_norm(self, squared: float) -> bool:
        """Record ‖V‖_F from a pass; whether it allows projecting (finite and non-zero)."""
        self._norm = math.sqrt(squared)
        return math.isfinite(self._norm) and self._norm > 0.0

    def dense(self) -> torch.Tensor:
        """V whole, (out, in) float32: for the SVD of the exact projection.

        Costs out·in float32 values at once (plus one row block of each weight when they are
        streamed), unlike the paper's projection, whose memory does not grow with the weight.
        """
        v = self._whole
        if v is None:
            v = torch.empty(self._source.shape, device=self.device)
            for rows, base, aligned in self._source.rows(self._block_rows):
                self._form(base, aligned, v[rows], None)
        return v.T if self.transposed else v

    def nonfinite_weight(self) -> int | None:
        """Which weight holds NaN or Inf: 0 for the base, 1 for the aligned one, None for neither.

        One more pass over the rows: only paid once ‖V‖_F has been found not finite.
        """
        for _, base, aligned in self._source.rows(self._block_rows):
            for index, weight in enumerate((base, aligned)):
                if weight is not None and not bool(torch.isfinite(weight).all()):
                    return index
        return None


def _squared_norm(block: torch.Tensor) -> float:
    """‖block‖² as a Python (double) float, so that summing blocks cannot overflow float32.

    torch sums the squares in float32, which overflows for a finite block of entries around
    1e19; only then is the block's norm taken again in float64.
    """
    norm = float(torch.linalg.vector_norm(block))
    if math.isinf(norm) and bool(torch.isfinite(block).all()):
        norm = float(torch.linalg.vector_norm(block, dtype=torch.float64))
    return norm**2
