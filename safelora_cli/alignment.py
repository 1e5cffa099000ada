"""V = W_aligned − W_base for one layer, formed a block of rows at a time.

Forming V whole costs out·in float32 values (180 MB for a 7B MLP weight) on top of the weights
themselves; block by block, the working set is a fixed few MB whatever the model's size, so peak
memory does not grow with the model, and each block stays in cache while it is used. Products
with V need two passes over the blocks: C·B = V·(Vᵀ·B)/‖V‖_F first accumulates M = Vᵀ·B (in, r),
then forms C·B a block at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

# 4 MB of float32 per block on the CPU: measured fastest among 0.5–64 MB blocks for 7B-shaped
# weights (a block that fits in cache beats forming V once: 64 ms against 200 ms for an
# 11008 × 4096 weight at r = 16). A weight that fits in one block is formed once and reused by
# every pass. On a GPU memory is not the constraint, and V is always formed whole, once.
BLOCK_ELEMENTS = 1 << 20


class AlignmentMatrix:
    """V (out, in) of one layer, as the difference of two weights stored in the same layout.

    Args:
        w_base: the base weight, (out, in), or (in, out) when `transposed`.
        w_aligned: the aligned weight, same shape and layout as `w_base`.
        transposed: the checkpoint stores Vᵀ (GPT-2 Conv1D, embeddings relative to their LoRA).
        block_elements: about how many float32 values one block holds.
    """

    def __init__(self, w_base: torch.Tensor, w_aligned: torch.Tensor, transposed: bool = False,
                 block_elements: int = BLOCK_ELEMENTS) -> None:
        self._base, self._aligned, self.transposed = w_base, w_aligned, transposed
        rows, cols = w_base.shape
        if w_base.device.type != "cpu":
            block_elements = rows * cols
        self._block_rows = min(rows, max(1, block_elements // max(cols, 1)))
        self._whole: torch.Tensor | None = None  # V as stored, when it is a single block
        self.shape = (cols, rows) if transposed else (rows, cols)
        self.device = w_base.device
        self._norm: float | None = None

    def _form(self, rows: slice, out: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
        """V's stored rows `rows` in float32, written into `out` (using `scratch` for a cast)."""
        aligned, base = self._aligned[rows], self._base[rows]
        block = out[: aligned.shape[0]].copy_(aligned)
        # Subtracting a bfloat16 operand in place casts element by element, several times
        # slower than casting it into a float32 buffer first.
        return block.sub_(base if scratch is None else scratch[: base.shape[0]].copy_(base))

    def _blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, float32 block) over the *stored* rows; a block is only valid until the next one."""
        stored_rows, cols = self._base.shape
        if self._whole is not None:
            yield slice(0, stored_rows), self._whole
            return
        # Buffers reused by every block of every pass: fresh allocations of this size would be
        # served from the heap and fragment it, and peak memory would creep up over a long run.
        buffer = torch.empty(self._block_rows, cols, dtype=torch.float32, device=self.device)
        scratch = None if self._base.dtype == torch.float32 else torch.empty_like(buffer)
        for start in range(0, stored_rows, self._block_rows):
            rows = slice(start, start + self._block_rows)
            yield rows, self._form(rows, buffer, scratch)
        if self._block_rows == stored_rows:
            self._whole = buffer  # a single block: keep it for the next pass instead of re-forming it

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
        times faster that way round than with r last for small r.
        """
        bts = [b.T.contiguous() for b in bs]  # (r, out)
        squared = 0.0
        if not self.transposed:  # stored S = V (out, in)
            mts = [torch.zeros(bt.shape[0], self.shape[1], device=bt.device) for bt in bts]  # (V^T B)^T
            for rows, block in self._blocks():
                squared += _squared_norm(block)
                for mt, bt in zip(mts, bts, strict=True):
                    mt.addmm_(bt[:, rows], block)
            if not self._set_norm(squared):
                return None
            parts: list[list[torch.Tensor]] = [[] for _ in bs]
            for _, block in self._blocks():  # (C·B)^T block columns = M^T · S_blk^T
                for part, mt in zip(parts, mts, strict=True):
                    part.append(torch.mm(mt, block.T))
            return [torch.cat(part, dim=1).T.contiguous().div_(self.norm()) for part in parts]
        # stored S = V^T (in, out): (V^T B)^T = B^T S^T, block columns B^T S_blk^T; then
        # (C·B)^T = M^T V^T = Σ M_blk^T S_blk
        blocks_m: list[list[torch.Tensor]] = [[] for _ in bs]
        for _, block in self._blocks():
            squared += _squared_norm(block)
            for part, bt in zip(blocks_m, bts, strict=True):
                part.append(torch.mm(bt, block.T))
        if not self._set_norm(squared):
            return None
        mts = [torch.cat(part, dim=1) for part in blocks_m]  # (r, in)
        cbts = [torch.zeros(bt.shape[0], self.shape[0], device=bt.device) for bt in bts]
        for rows, block in self._blocks():
            for cbt, mt in zip(cbts, mts, strict=True):
                cbt.addmm_(mt[:, rows], block)
        return [cbt.T.contiguous().div_(self.norm()) for cbt in cbts]

    def _set_norm(self, squared: float) -> bool:
        """Record ‖V‖_F from a pass; whether it allows projecting (finite and non-zero)."""
        self._norm = math.sqrt(squared)
        return math.isfinite(self._norm) and self._norm > 0.0

    def dense(self) -> torch.Tensor:
        """V whole, (out, in) float32: for the SVD of the exact projection."""
        v = self._whole
        if v is None:
            rows = slice(0, self._base.shape[0])
            v = self._form(rows, torch.empty(self._base.shape, device=self.device), None)
        return v.T if self.transposed else v


def _squared_norm(block: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(block)) ** 2
