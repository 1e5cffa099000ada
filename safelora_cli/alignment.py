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

    def _form(self, rows: slice) -> torch.Tensor:
        # copy=True: a float32 weight would otherwise be modified in place below.
        block = self._aligned[rows].to(torch.float32, copy=True)
        block -= self._base[rows]  # promotes the base block on the fly: no float32 copy of it
        return block

    def _blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, float32 block) over the *stored* rows."""
        stored_rows = self._base.shape[0]
        if self._block_rows >= stored_rows:
            if self._whole is None:
                self._whole = self._form(slice(0, stored_rows))
            yield slice(0, stored_rows), self._whole
            return
        for start in range(0, stored_rows, self._block_rows):
            rows = slice(start, start + self._block_rows)
            yield rows, self._form(rows)

    def norm(self) -> float:
        """‖V‖_F (inf or nan when a weight is not finite)."""
        if self._norm is None:
            total = sum(float(torch.linalg.vector_norm(block)) ** 2 for _, block in self._blocks())
            self._norm = math.sqrt(total)
        return self._norm

    def paper_project(self, bs: list[torch.Tensor]) -> list[torch.Tensor]:
        """C·B = V·(Vᵀ·B)/‖V‖_F for each B (out, r), float32 on this device; needs ‖V‖_F > 0.

        Each V block is formed once for all the B's, and each B sees exactly the same sequence
        of operations as it would alone, so results do not depend on which others are given.
        """
        n = self.norm()
        if not self.transposed:  # stored S = V: Vᵀ·B = Σ S_blkᵀ·B_blk, then (C·B)_blk = S_blk·M
            ms = [torch.zeros(self.shape[1], b.shape[1], device=b.device) for b in bs]
            for rows, block in self._blocks():
                for m, b in zip(ms, bs, strict=True):
                    m.addmm_(block.T, b[rows])
            parts: list[list[torch.Tensor]] = [[] for _ in bs]
            for _, block in self._blocks():
                for part, m in zip(parts, ms, strict=True):
                    part.append(block @ m)
            return [torch.cat(part).div_(n) for part in parts]
        # stored S = Vᵀ: Vᵀ·B = S·B row block by row block, then C·B = Σ S_blkᵀ·M_blk
        blocks_m: list[list[torch.Tensor]] = [[] for _ in bs]
        for _, block in self._blocks():
            for part, b in zip(blocks_m, bs, strict=True):
                part.append(block @ b)
        ms = [torch.cat(part) for part in blocks_m]
        cbs = [torch.zeros(self.shape[0], b.shape[1], device=b.device) for b in bs]
        for rows, block in self._blocks():
            for cb, m in zip(cbs, ms, strict=True):
                cb.addmm_(block.T, m[rows])
        return [cb.div_(n) for cb in cbs]

    def dense(self) -> torch.Tensor:
        """V whole, (out, in) float32: for the SVD of the exact projection."""
        v = torch.cat([block for _, block in self._blocks()])
        return v.T if self.transposed else v
