"""The method written the direct way, in float64: form C, form ΔW, flatten, take the cosine.

Tests compare the fast implementation against this; it shares no code with it.
"""

from __future__ import annotations

import torch


def dense_c(w_base: torch.Tensor, w_aligned: torch.Tensor) -> torch.Tensor:
    v = w_aligned.double() - w_base.double()
    return v @ v.T / torch.linalg.norm(v)  # Frobenius norm of a matrix


def truncated_projector(w_base: torch.Tensor, w_aligned: torch.Tensor, k: int) -> torch.Tensor:
    v = w_aligned.double() - w_base.double()
    u, _, _ = torch.linalg.svd(v)
    return u[:, :k] @ u[:, :k].T


def cosine(c: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    dw = lora_b.double() @ lora_a.double()
    cdw = c @ dw
    return float(torch.dot(cdw.flatten(), dw.flatten()) / (cdw.norm() * dw.norm()))


def patched_b(c: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    return c @ lora_b.double()


def alignment_cosine(w_base: torch.Tensor, w_aligned: torch.Tensor, lora_a: torch.Tensor,
                     lora_b: torch.Tensor) -> float:
    """cos(ΔW, V) of the flattened matrices, signed."""
    v = w_aligned.double() - w_base.double()
    dw = lora_b.double() @ lora_a.double()
    return float(torch.dot(v.flatten(), dw.flatten()) / (v.norm() * dw.norm()))

