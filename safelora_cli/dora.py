"""DoRA: the magnitude vector of a layer whose B was projected.

PEFT's DoRA layer computes, per output row j (W, B·A as (out, in); s the LoRA scaling):

    W'_j = m_j · (W + s·B·A)_j / ‖(W + s·B·A)_j‖

so the update it applies is W' − W = diag(m / ‖W + s·B·A‖_row)·(W + s·B·A) − W, which holds a
per-row rescaling of the aligned weight W besides s·B·A. Projecting B alone and keeping the learned
m would leave that rescaling, a change outside the alignment subspace, in a layer Safe LoRA chose
to project. So a projected DoRA layer gets m = ‖W_aligned + s·(C·B)·A‖_row: the rescaling becomes
the identity and the layer applies exactly W_aligned + s·(C·B)·A, the paper's patch. Layers that
are not projected keep their B and m untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from safelora_cli.checkpoint import Checkpoint, TensorStream
from safelora_cli.pairing import LayerPlan
from safelora_cli.prefetch import CHUNK_BYTES

Blocks = Iterable[tuple[int, torch.Tensor]]  # (first stored row, rows as stored)


def recomputed_magnitude(blocks: Blocks, lora_a: torch.Tensor, new_b: torch.Tensor, scaling: float,
                         transposed: bool, device: torch.device) -> torch.Tensor:
    """Row norms of W + s·B·A in float32, from the aligned weight's stored rows, a block at a time.

    Args:
        blocks: the aligned weight as stored, (out, in), or (in, out) when `transposed`, in row
            blocks that cover it in order.
        lora_a: (r, in).
        new_b: the projected B, (out, r).
        scaling: PEFT's scaling of B·A for this layer.
        transposed: the checkpoint stores the weight transposed relative to B·A.
        device: where to compute.

    Returns:
        (out,) float32 tensor on `device`. Stored as (out, in), a block holds whole rows of W and
        gives their norms directly; stored transposed, it holds columns, whose squares are summed
        (in float64) over the blocks.
    """
    a = lora_a.to(device=device, dtype=torch.float32)
    b = new_b.to(device=device, dtype=torch.float32)
    norms = torch.empty(b.shape[0], dtype=torch.float32, device=device)
    squares = torch.zeros(b.shape[0], dtype=torch.float64, device=device)
    for start, block in blocks:
        w = block.to(device=device, dtype=torch.float32)
        stop = start + w.shape[0]
        if transposed:
            part = w.T + scaling * (b @ a[:, start:stop])
            squares += part.square().sum(dim=1, dtype=torch.float64)
        else:
            norms[start:stop] = torch.linalg.vector_norm(w + scaling * (b[start:stop] @ a), dim=1)
    return squares.sqrt().to(torch.float32) if transposed else norms


def _row_blocks(stream: TensorStream, aligned: Checkpoint, key: str, buffer: torch.Tensor) -> Iterator[
        tuple[int, torch.Tensor]]:
    """`key`'s stored rows in blocks of at most `CHUNK_BYTES`, each read into `buffer` (reused)."""
    info = aligned.tensors[key]
    rows = info.shape[0]
    per_block = max(1, CHUNK_BYTES // max(info.nbytes // max(rows, 1), 1))
    for start in range(0, rows, per_block):
        yield start, stream.read_rows(aligned, key, start, start + per_block, buffer)


def recompute_magnitudes(projected: list[tuple[LayerPlan, torch.Tensor]], tensors: Mapping[str, torch.Tensor],
                         aligned: Checkpoint, device: torch.device) -> dict[str, torch.Tensor]:
    """New magnitude vectors of the projected DoRA layers, keyed like the adapter file.

    Args:
        projected: (plan, projected B) of every projected layer; plans without a magnitude key are skipped.
        tensors: the adapter's tensors (for lora_A and the magnitude's dtype), read one layer at a time.
        aligned: the checkpoint the adapter is applied to; its weights are read in row blocks, so
            memory holds one block, not a whole weight.
        device: where to compute.

    Returns:
        magnitude key → (out,) tensor in the magnitude's own dtype, on the CPU.
    """
    dora = [(plan, b) for plan, b in projected if plan.magnitude_key is not None]
    # Shard by shard, so each aligned shard is opened once.
    dora.sort(key=lambda item: str(aligned.tensors[item[0].weight_key].file))
    magnitudes: dict[str, torch.Tensor] = {}
    widest = max((aligned.tensors[plan.weight_key].nbytes // max(aligned.tensors[plan.weight_key].shape[0], 1)
                  for plan, _ in dora), default=0)
    buffer = torch.empty(max(CHUNK_BYTES, widest) + 8, dtype=torch.uint8)
    with TensorStream() as stream:
        for plan, new_b in dora:
            key = plan.magnitude_key
            assert key is not None
            blocks = _row_blocks(stream, aligned, plan.weight_key, buffer)
            m = recomputed_magnitude(blocks, tensors[plan.a_key], new_b, plan.scaling, plan.transposed, device)
            magnitudes[key] = m.to("cpu", tensors[key].dtype).contiguous()
    return magnitudes
