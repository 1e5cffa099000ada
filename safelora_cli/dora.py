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

import torch

from safelora_cli.checkpoint import Checkpoint, TensorStream
from safelora_cli.pairing import LayerPlan


def recomputed_magnitude(weight: torch.Tensor, lora_a: torch.Tensor, new_b: torch.Tensor, scaling: float,
                         transposed: bool, device: torch.device) -> torch.Tensor:
    """Row norms of W + s·B·A in float32.

    Args:
        weight: the aligned weight as stored, (out, in), or (in, out) when `transposed`.
        lora_a: (r, in).
        new_b: the projected B, (out, r).
        scaling: PEFT's scaling of B·A for this layer.
        transposed: the checkpoint stores the weight transposed relative to B·A.
        device: where to compute.

    Returns:
        (out,) float32 tensor on `device`.
    """
    w = weight.to(device=device, dtype=torch.float32)
    if transposed:
        w = w.T
    a = lora_a.to(device=device, dtype=torch.float32)
    b = new_b.to(device=device, dtype=torch.float32)
    return torch.linalg.vector_norm(w + scaling * (b @ a), dim=1)


def recompute_magnitudes(projected: list[tuple[LayerPlan, torch.Tensor]], tensors: dict[str, torch.Tensor],
                         aligned: Checkpoint, device: torch.device) -> dict[str, torch.Tensor]:
    """New magnitude vectors of the projected DoRA layers, keyed like the adapter file.

    Args:
        projected: (plan, projected B) of every projected layer; plans without a magnitude key are skipped.
        tensors: the adapter's tensors (for lora_A and the magnitude's dtype).
        aligned: the checkpoint the adapter is applied to.
        device: where to compute.

    Returns:
        magnitude key → (out,) tensor in the magnitude's own dtype, on the CPU.
    """
    dora = [(plan, b) for plan, b in projected if plan.magnitude_key is not None]
    # Shard by shard, so each aligned shard is opened once.
    dora.sort(key=lambda item: str(aligned.tensors[item[0].weight_key].file))
    magnitudes: dict[str, torch.Tensor] = {}
    with TensorStream() as stream:
        for plan, new_b in dora:
            key = plan.magnitude_key
            assert key is not None
            weight = stream.read(aligned, plan.weight_key)
            m = recomputed_magnitude(weight, tensors[plan.a_key], new_b, plan.scaling, plan.transposed, device)
            magnitudes[key] = m.to("cpu", tensors[key].dtype).contiguous()
    return magnitudes
