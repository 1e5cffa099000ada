"""Safe LoRA math on one layer's tensors. Pure functions: no I/O, no names, no selection.

Shapes: V and ΔW are (out, in); B = lora_B is (out, r); A = lora_A is (r, in).
Nothing here forms an out × out matrix: C·B is computed as V·(Vᵀ·B)/‖V‖_F and every
Frobenius quantity of ΔW = B·A goes through the r × r Gram matrix G = A·Aᵀ, since
⟨X·A, Y·A⟩_F = sum((Xᵀ·Y) ⊙ G) for any X, Y of shape (out, r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safelora_cli.alignment import AlignmentMatrix
from safelora_cli.config import Projection, ProjectionSettings, SvdMethod

# ΔW counts as zero when ‖B·A‖² is at rounding level of ‖B‖²·‖A‖² (float32 inputs).
_ZERO_UPDATE_RTOL = 1e-14
# Oversampling and power iterations for the randomized SVD.
_RSVD_OVERSAMPLE = 10
_RSVD_NITER = 4

UNDEFINED_V_ZERO = "aligned equals base in this layer (V = 0): no alignment signal"
UNDEFINED_DW_ZERO = "the LoRA update is zero (B·A = 0): nothing to project"



@dataclass(frozen=True)
class LayerMath:
    """What one layer's projection gives.

    Attributes:
        cosine: ⟨CΔW, ΔW⟩_F / (‖CΔW‖_F ‖ΔW‖_F), or None when undefined.
        undefined_reason: why `cosine` is None.
        v_norm: ‖V‖_F.
        delta_norm: ‖B·A‖_F (unscaled; multiply by the LoRA scaling for the real update).
        residual_norm: ‖ΔW − CΔW‖_F (unscaled), what projecting would remove.
        b_distance: ‖B − C·B‖_F, the official code's per-layer distance (None when V = 0).
        projected_b: C·B (None when the layer cannot be projected; the pipeline also drops it for
            layers a threshold rule cannot select).
        subspace_rank: k of the exact projector, None for the paper's C.
        projected_norm: ‖CΔW‖_F (unscaled), what a projected layer keeps of its update.
        alignment_cosine: ⟨ΔW, V⟩_F / (‖ΔW‖_F ‖V‖_F), signed (unscaled ΔW: the caller applies the
            sign of the LoRA scaling); None when undefined. Negative: the update moves the layer
            back toward the base model, which the paper's cosine cannot see (C is PSD).
        cosine_upper: with a low-rank C_k, the largest value the cosine with the full C can take
            (`cosine` is then the cosine with C_k, a proven lower end); None otherwise.
    """

    cosine: float | None
    undefined_reason: str | None
    v_norm: float
    delta_norm: float
    residual_norm: float
    b_distance: float | None
    projected_b: torch.Tensor | None
    subspace_rank: int | None = None
    projected_norm: float = 0.0
    alignment_cosine: float | None = None
    cosine_upper: float | None = None


def subspace_basis(v: torch.Tensor, settings: ProjectionSettings) -> torch.Tensor:
    """U_k: orthonormal basis of V's top-k left singular vectors, shape (out, k).

    k is `settings.rank`, or the smallest k whose σ² carry `settings.energy` of Σσ².
    Directions with σ at rounding level are dropped, so k never exceeds the numerical rank.
    """
    full = min(v.shape)
    use_randomized = settings.svd is SvdMethod.RANDOMIZED or (
        settings.svd is SvdMethod.AUTO
        and settings.rank is not None
        and settings.rank + _RSVD_OVERSAMPLE <= full // 4
    )
    if use_randomized and settings.rank is not None:
        q = min(settings.rank + _RSVD_OVERSAMPLE, full)
        u, s, _ = torch.svd_lowrank(v, q=q, niter=_RSVD_NITER)
    else:
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
    numerical_rank = int((s > s[0] * max(v.shape) * torch.finfo(s.dtype).eps).sum()) if s.numel() else 0
    if settings.rank is not None:
        k = settings.rank
    else:
        energy = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        k = int((energy < settings.energy - 1e-12).sum()) + 1  # type: ignore[operator]
    k = min(k, numerical_rank)
    return u[:, :k]


def gram_inner(x: torch.Tensor, y: torch.Tensor, gram: torch.Tensor) -> float:
    """⟨X·A, Y·A⟩_F from X, Y (out, r) and G = A·Aᵀ, in float64."""
    return float(((x.T @ y) * gram).sum())


@dataclass(frozen=True)
class Projected:
    """One layer's V applied to the B's of every adapter on it (V is formed once for all).

    Attributes:
        v_norm: ‖V‖_F (not finite when a weight is not: the caller reports which).
        cbs: C·B (or P_k·B) for each B given, float32; None when V = 0 or ‖V‖_F is not finite.
        subspace_rank: k of the exact projector, None for the paper's C.
        vtbs: (Vᵀ·B)ᵀ, (r, in), for each B: the signed alignment cosine comes from it.
    """

    v_norm: float
    cbs: list[torch.Tensor] | None
    subspace_rank: int | None = None
    vtbs: list[torch.Tensor] | None = None


def project(alignment: AlignmentMatrix, settings: ProjectionSettings, bs: list[torch.Tensor]) -> Projected:
    """Apply the projection of `settings` for one layer's V to each B (out, r) in `bs`."""
    if settings.kind is Projection.APPROX:
        cbs = alignment.paper_project(bs)
        return Projected(alignment.norm(), cbs, vtbs=alignment.vtbs)
    v_norm = alignment.norm()
    if v_norm == 0.0 or not math.isfinite(v_norm):
        return Projected(v_norm, None)
    v = alignment.dense()
    u = subspace_basis(v, settings)
    return Projected(v_norm, [u @ (u.T @ b) for b in bs], u.shape[1], [b.T @ v for b in bs])


def layer_math(
    projected: Projected, lora_a: torch.Tensor, lora_b: torch.Tensor, cb: torch.Tensor | None,
    vtb: torch.Tensor | None = None,
) -> LayerMath:
    """Cosine and norms for one adapter's A (r, in), B (out, r), given C·B (None when V = 0) and
    (Vᵀ·B)ᵀ (r, in) for the signed alignment cosine."""
    device = cb.device if cb is not None else lora_b.device
    a64 = lora_a.to(device=device, dtype=torch.float64)
    gram = a64 @ a64.T
    b64 = lora_b.to(device=device, dtype=torch.float64)
    dw_sq = gram_inner(b64, b64, gram)
    delta_norm = math.sqrt(max(dw_sq, 0.0))
    if cb is None:
        return LayerMath(None, UNDEFINED_V_ZERO, 0.0, delta_norm, 0.0, None, None)

    v_norm, subspace_rank = projected.v_norm, projected.subspace_rank
    cb64 = cb.double()
    b_distance = float(torch.linalg.vector_norm(b64 - cb64))
    scale = float((b64**2).sum()) * float((a64**2).sum())
    if dw_sq <= _ZERO_UPDATE_RTOL * scale:
        return LayerMath(None, UNDEFINED_DW_ZERO, v_norm, delta_norm, 0.0, b_distance, None, subspace_rank)

    diff = b64 - cb64
    residual_norm = math.sqrt(max(gram_inner(diff, diff, gram), 0.0))
    proj_sq = gram_inner(cb64, cb64, gram)
    inner = gram_inner(cb64, b64, gram)
    # CΔW = 0 with ΔW ≠ 0: the update is orthogonal to the aligned subspace, the limit cosine is 0.
    cosine = 0.0 if proj_sq <= 0.0 else inner / math.sqrt(proj_sq * dw_sq)
    cosine = min(1.0, max(-1.0, cosine))
    aligned = None
    if vtb is not None:
        signed = float((vtb.to(device=device, dtype=torch.float64) * a64).sum()) / (delta_norm * v_norm)
        aligned = min(1.0, max(-1.0, signed)) if math.isfinite(signed) else None
    return LayerMath(cosine, None, v_norm, delta_norm, residual_norm, b_distance, cb, subspace_rank,
                     math.sqrt(max(proj_sq, 0.0)), aligned)
