"""The low-rank safety subspace: C ≈ C_k = Q·Qᵀ, and what that costs the cosine, provably.

With V = U Σ Wᵀ (module orientation, out × in) and n = ‖V‖_F, the paper's C = V·Vᵀ/n has
eigenvalues σ_j²/n on the left singular vectors. Keeping the top k gives C_k = Q·Qᵀ with
Q = U_k Σ_k/√n, and C = C_k + E where E = U_⊥ Σ_⊥² U_⊥ᵀ/n is positive semi-definite, acts on the
complement of U_k only, and has norm e = σ_{k+1}²/n. C weighs a direction by σ², so the energy a
factor keeps is its share of ‖C‖_F² = Σσ⁴/n², not of Σσ².

For an update X = B·A, write p = ⟨C_k X, X⟩, a = ‖C_k X‖, t = ‖X − U_k U_kᵀ X‖ (the part of X
outside the kept subspace) and c' = p/(a‖X‖), the cosine with C_k. With q = ⟨E X, X⟩ and
b = ‖E X‖ the cosine with C is c = (p + q)/(‖X‖·√(a² + b²)), and the facts q ≤ b·t, b ≤ e·t,
b² ≤ e·q and a² ≥ λ_min(C_k)·p ≥ e·p give, for every V that agrees with the stored factor:

    c' ≤ c ≤ max over 0 ≤ b ≤ e·t of (p + b·t) / (‖X‖·√(a² + b²)).

So the low-rank cosine never overstates the true one, and the gap is bounded by what the dropped
singular values can add (docs/method.md has the derivation). Everything here is float64 from the
r × r Gram matrix of A, like `projection.layer_math`; the bound holds to the rounding of the SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from safelora_cli.projection import gram_inner

# The cosines themselves are computed from float32 C_k·B: a reported interval is widened by this on
# both sides (measured rounding: ~2e-8 against a float64 two-model run at full rank).
ROUNDING = 1e-6


@dataclass(frozen=True)
class Factor:
    """One weight's low-rank factor, as `safelora subspace` stores it.

    Attributes:
        q: Q (out, k), float32, with C_k = Q·Qᵀ; its columns are orthogonal, of norms σ_j/√n.
        v_norm: ‖V‖_F = n.
        energy_kept: Σ_{j≤k} σ_j⁴ / Σ σ_j⁴, the share of ‖C‖_F² that C_k keeps (1 when k is V's rank).
        dropped: e = σ_{k+1}²/n, the largest eigenvalue of C that C_k drops (0 when none is).
        full_rank: V's numerical rank (what k = everything would be).
    """

    q: torch.Tensor
    v_norm: float
    energy_kept: float
    dropped: float
    full_rank: int


def factor_of(v: torch.Tensor, rank: int | None, energy: float | None) -> Factor:
    """Q for V (out, in): the top `rank` directions, or the fewest keeping `energy` of Σσ⁴.

    Directions whose σ is at rounding level are never kept, so k ≤ V's numerical rank. V = 0
    gives an empty factor (k = 0, n = 0): no alignment signal, as in the two-model run.
    """
    v_norm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
    if v_norm == 0.0 or min(v.shape) == 0:
        return Factor(torch.zeros(v.shape[0], 0), v_norm, 1.0, 0.0, 0)
    eigenvalues, u_of = _spectrum(v)
    s64 = eigenvalues.sqrt()
    numerical = int((s64 > s64[0] * max(v.shape) * torch.finfo(torch.float32).eps).sum())
    weights = eigenvalues[:numerical] ** 2
    kept = torch.cumsum(weights, 0) / weights.sum()
    if rank is not None:
        k = min(rank, numerical)
    else:
        assert energy is not None
        k = min(numerical, int((kept < energy - 1e-12).sum()) + 1)
    energy_kept = float(kept[k - 1]) if k > 0 else 0.0
    dropped = float(s64[k] ** 2 / v_norm) if k < numerical else 0.0
    q = (u_of(k) * (s64[:k] / math.sqrt(v_norm))).float().contiguous()
    return Factor(q, v_norm, min(energy_kept, 1.0), dropped, numerical)


def _spectrum(v: torch.Tensor) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
    """σ² of V in descending order, and a function giving its top-k left singular vectors.

    In float64, through the Gram matrix of V's smaller side and a symmetric eigensolver: half the
    time of an SVD, and what the bound needs (σ_{k+1}² to ~1e-16·σ_1², and the kept directions)
    far below the cosine differences it decides; a float32 SVD is off by ~1e-5 there.
    """
    v64 = v.double()
    out, inp = v64.shape
    gram = v64 @ v64.T if out <= inp else v64.T @ v64
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    if out <= inp:
        return values, lambda k: vectors[:, :k]
    # Tall V: the eigenvectors are its right singular vectors W; U_k = V·W_k/σ_k.
    return values, lambda k: (v64 @ vectors[:, :k]) / values[:k].sqrt()


@dataclass(frozen=True)
class LowRankProjection:
    """C_k·B for one adapter's B, and what the cosine bound needs beyond `projection.layer_math`.

    Attributes:
        cb: C_k·B (out, r), float32.
        outside_sq: ‖X − U_k U_kᵀ X‖² / ‖X‖², the share of ‖ΔW‖² outside the kept subspace.
    """

    cb: torch.Tensor
    outside_sq: float


def project_low_rank(q: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> LowRankProjection:
    """C_k·B = Q·(Qᵀ·B), and the share of ΔW = B·A outside the span of Q.

    In float64 (Q and B are thin): the share outside is a difference of nearly equal numbers
    when ΔW lies almost inside the subspace, and the bound built on it must not round below the truth.
    """
    q64 = q.double()
    b = lora_b.to(q.device, torch.float64)
    qtb = q64.T @ b  # (k, r)
    cb = (q64 @ qtb).float()
    a64 = lora_a.to(device=q.device, dtype=torch.float64)
    gram = a64 @ a64.T
    total = gram_inner(b, b, gram)
    if total <= 0.0 or q.shape[1] == 0:
        return LowRankProjection(cb, 1.0 if total > 0.0 else 0.0)
    # Q's columns are orthogonal with norms σ_j/√n: U_kᵀ·B divides them out.
    inside = qtb / torch.linalg.vector_norm(q64, dim=0)[:, None]
    kept = gram_inner(inside, inside, gram)
    return LowRankProjection(cb, min(1.0, max(0.0, 1.0 - kept / total)))


def cosine_upper(lower: float, retained: float, outside_sq: float, dropped: float, v_norm: float) -> float:
    """The largest cosine with C that is consistent with the cosine `lower` = c' with C_k.

    Args:
        lower: c' = p/(a‖X‖).
        retained: a/‖X‖ = ‖C_k X‖/‖X‖.
        outside_sq: t²/‖X‖².
        dropped: e, the largest eigenvalue of C left out of C_k.
        v_norm: ‖V‖_F, only to tell "no signal" (0) apart.

    Everything is scaled by ‖X‖ (the cosine does not depend on it): with p̂ = c'·â, â = a/‖X‖,
    t̂ = t/‖X‖, the bound is max over 0 ≤ b̂ ≤ e·t̂ of (p̂ + b̂·t̂)/√(â² + b̂²), whose only
    stationary point is b̂ = t̂·â²/p̂.
    """
    if v_norm == 0.0 or dropped <= 0.0 or outside_sq <= 0.0:
        return min(1.0, lower + ROUNDING)
    t = math.sqrt(outside_sq)
    a, p = retained, lower * retained
    top = dropped * t
    candidates = [top]
    if p > 0.0:
        candidates.append(min(top, t * a * a / p))

    def value(b: float) -> float:
        denominator = math.sqrt(a * a + b * b)
        return (p + b * t) / denominator if denominator > 0.0 else t

    return min(1.0, max(lower, *(value(b) for b in candidates)) + ROUNDING)


def undecided(lowers: list[float | None], uppers: list[float | None], selected: list[bool],
              threshold: float | None) -> list[bool]:
    """Which layers' selection the bounds cannot decide: the exact cosines could select otherwise.

    Threshold τ: a selected layer (c' ≤ τ) whose upper bound exceeds τ; an unselected one is
    decided, since c ≥ c' > τ. Top-K: a selected and an unselected layer whose intervals
    [c', upper] overlap could trade places; both are flagged.
    """
    flags = [False] * len(lowers)
    if threshold is not None:
        # Widened by ROUNDING below too: an unselected layer just above τ may lie at or below it.
        return [(s and u is not None and u > threshold) or
                (not s and low is not None and low - ROUNDING <= threshold)
                for s, low, u in zip(selected, lowers, uppers, strict=True)]
    inside = [i for i, s in enumerate(selected) if s]
    outside = [i for i, s in enumerate(selected) if not s and lowers[i] is not None]
    for i in inside:
        upper = uppers[i]
        assert upper is not None
        for j in outside:
            low = lowers[j]
            assert low is not None
            if upper > low - ROUNDING:
                flags[i] = flags[j] = True
    return flags
