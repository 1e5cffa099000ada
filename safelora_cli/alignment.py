"""V = W_aligned − W_base for one layer, formed a block of rows at a time.

Forming V whole costs out·in float32 values (180 MB for a 7B MLP weight) on top of the weights
themselves; block by block, the working set is a fixed few MB whatever the model's size, so peak
memory does not grow with the model. Products with V need two passes over the blocks:
C·B = V·(Vᵀ·B)/‖V‖_F first accumulates M = Vᵀ·B (in, r), then forms C·B a block at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

# 64 MB of float32 per block on the CPU: a 4096 × 4096 weight is one block, formed once and
# reused by every pass; larger weights are re-formed block by block in each pass instead of
# held whole. On a GPU memory is not the constraint, and V is always formed whole, once.
BLOCK_ELEMENTS = 1 << 24


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
        self._block_rows = max(1, block_elements // max(cols, 1))
        self._whole: torch.Tensor | None = None  # V as stored, when it is a single block
        self.shape = (cols, rows) if transposed else (rows, cols)
        self.device = w_base.device
        self._norm: float | None = None

    def _form(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """V's stored rows `rows` in float32, written into `out` when given."""
        aligned = self._aligned[rows]
        block = aligned.to(torch.float32, copy=True) if out is None else out[: aligned.shape[0]].copy_(aligned)
        block -= self._base[rows]  # promotes the base block on the fly: no float32 copy of it
        return block

    def _blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, float32 block) over the *stored* rows; a block is only valid until the next one."""
        stored_rows, cols = self._base.shape
        if self._block_rows >= stored_rows:
            if self._whole is None:
                self._whole = self._form(slice(0, stored_rows))
            yield slice(0, stored_rows), self._whole
            return
        # One buffer for every block of every pass: fresh allocations of this size would be
        # served from the heap and fragment it, and peak memory would creep up over a long run.
        buffer = torch.empty(self._block_rows, cols, dtype=torch.float32, device=self.device)
        for start in range(0, stored_rows, self._block_rows):
            rows = slice(start, start + self._block_rows)
            yield rows, self._form(rows, buffer)

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
        """
        squared = 0.0
        if not self.transposed:  # stored S = V: Vᵀ·B = Σ S_blkᵀ·B_blk, then (C·B)_blk = S_blk·M
            ms = [torch.zeros(self.shape[1], b.shape[1], device=b.device) for b in bs]
            for rows, block in self._blocks():
                squared += _squared_norm(block)
                for m, b in zip(ms, bs, strict=True):
                    m.addmm_(block.T, b[rows])
            if not self._set_norm(squared):
                return None
            parts: list[list[torch.Tensor]] = [[] for _ in bs]
            for _, block in self._blocks():
                for part, m in zip(parts, ms, strict=True):
                    part.append(block @ m)
            return [torch.cat(part).div_(self.norm()) for part in parts]
        # stored S = Vᵀ: Vᵀ·B = S·B row block by row block, then C·B = Σ S_blkᵀ·M_blk
        blocks_m: list[list[torch.Tensor]] = [[] for _ in bs]
        for _, block in self._blocks():
            squared += _squared_norm(block)
            for part, b in zip(blocks_m, bs, strict=True):
                part.append(block @ b)
        if not self._set_norm(squared):
            return None
        ms = [torch.cat(part) for part in blocks_m]
        cbs = [torch.zeros(self.shape[0], b.shape[1], device=b.device) for b in bs]
        for rows, block in self._blocks():
            for cb, m in zip(cbs, ms, strict=True):
                cb.addmm_(block.T, m[rows])
        return [cb.div_(self.norm()) for cb in cbs]

    def _set_norm(self, squared: float) -> bool:
        """Record ‖V‖_F from a pass; whether it allows projecting (finite and non-zero)."""
        self._norm = math.sqrt(squared)
        return math.isfinite(self._norm) and self._norm > 0.0

    def dense(self) -> torch.Tensor:
        """V whole, (out, in) float32: for the SVD of the exact projection."""
        v = self._whole if self._whole is not None else self._form(slice(0, self._base.shape[0]))
        return v.T if self.transposed else v


def _squared_norm(block: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(block)) ** 2
