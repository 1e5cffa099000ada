"""The low-rank factor and the cosine bound, against a direct float64 implementation with the full C."""

from __future__ import annotations

import math

import pytest
import torch

from safelora_cli.lowrank import ROUNDING, cosine_upper, factor_of, project_low_rank, undecided
from safelora_cli.projection import Projected, layer_math


def _v_with_spectrum(out: int, inp: int, decay: float, gen: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(inp, inp, generator=gen, dtype=torch.float64))
    m = min(out, inp)
    s = decay ** torch.arange(m, dtype=torch.float64) * (1 + 0.1 * torch.rand(m, generator=gen, dtype=torch.float64))
    return (u[:, :m] * s.sort(descending=True).values) @ w[:, :m].T


def _true_cosine(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """The paper's cosine with C = V·Vᵀ/‖V‖_F formed densely, float64."""
    c = v @ v.T / torch.linalg.norm(v)
    x = b @ a
    cx = c @ x
    return float((cx * x).sum() / (torch.linalg.norm(cx) * torch.linalg.norm(x)))


def _low_rank(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor, rank: int | None, energy: float | None = None):  # type: ignore[no-untyped-def]
    factor = factor_of(v.float(), rank, energy)
    low = project_low_rank(factor.q, a.float(), b.float())
    math_ = layer_math(Projected(factor.v_norm, [low.cb]), a.float(), b.float(), low.cb)
    assert math_.cosine is not None
    upper = cosine_upper(math_.cosine, math_.projected_norm / math_.delta_norm, low.outside_sq, factor.dropped,
                         factor.v_norm)
    return factor, math_.cosine, upper


SHAPES = [(24, 24), (40, 16), (16, 40), (7, 33), (33, 7)]  # square, tall, wide, very wide, very tall


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay", [0.3, 0.7, 0.95])
def test_the_true_cosine_lies_between_the_low_rank_cosine_and_its_bound(shape: tuple[int, int], decay: float) -> None:
    gen = torch.Generator().manual_seed(hash((shape, decay)) % 2**31)
    out, inp = shape
    v = _v_with_spectrum(out, inp, decay, gen)
    widths = []
    for trial in range(24):
        r = 1 + trial % 4
        b, a = torch.randn(out, r, generator=gen, dtype=torch.float64), torch.randn(r, inp, generator=gen,
                                                                                      dtype=torch.float64)
        k = trial % (min(shape) + 1) or 1
        _, lower, upper = _low_rank(v, b, a, k)
        true = _true_cosine(v, b, a)
        assert lower - 1e-5 <= true <= upper + 1e-5, (k, lower, true, upper)
        widths.append(upper - lower)
    # The bound is not vacuous: with a fast-decaying spectrum it is tight for most ranks.
    if decay <= 0.3:
        assert sorted(widths)[len(widths) // 2] < 0.05


def test_updates_built_against_the_bound_stay_inside_it() -> None:
    """Adversarial updates: mostly in the first dropped direction, or split between kept and dropped ones."""
    gen = torch.Generator().manual_seed(7)
    v = _v_with_spectrum(20, 30, 0.8, gen)
    u, _, _ = torch.linalg.svd(v)
    for k in range(1, 19):
        for mix in (0.0, 0.01, 0.1, 0.5, 1.0, 3.0):
            b = (u[:, k] * mix + u[:, k - 1])[:, None] + 1e-3 * torch.randn(20, 1, generator=gen, dtype=torch.float64)
            a = torch.randn(1, 30, generator=gen, dtype=torch.float64)
            _, lower, upper = _low_rank(v, b, a, k)
            true = _true_cosine(v, b, a)
            assert lower - 1e-5 <= true <= upper + 1e-5, (k, mix, lower, true, upper)


def test_an_update_inside_the_kept_subspace_has_a_zero_bound_and_the_true_cosine() -> None:
    gen = torch.Generator().manual_seed(3)
    v = _v_with_spectrum(16, 24, 0.7, gen)
    u, _, _ = torch.linalg.svd(v)
    b = u[:, :4] @ torch.randn(4, 2, generator=gen, dtype=torch.float64)
    a = torch.randn(2, 24, generator=gen, dtype=torch.float64)
    _, lower, upper = _low_rank(v, b, a, 6)
    assert upper - lower < 1e-5
    assert lower == pytest.approx(_true_cosine(v, b, a), abs=1e-5)


def test_an_update_outside_the_kept_subspace_has_cosine_zero_and_a_valid_bound() -> None:
    gen = torch.Generator().manual_seed(4)
    v = _v_with_spectrum(16, 24, 0.7, gen)
    u, _, _ = torch.linalg.svd(v)
    b = u[:, 5:9] @ torch.randn(4, 2, generator=gen, dtype=torch.float64)
    a = torch.randn(2, 24, generator=gen, dtype=torch.float64)
    _, lower, upper = _low_rank(v, b, a, 3)
    assert lower == pytest.approx(0.0, abs=1e-5)
    assert _true_cosine(v, b, a) <= upper + 1e-5


def test_full_rank_keeps_everything_and_matches_the_full_cosine() -> None:
    gen = torch.Generator().manual_seed(5)
    v = _v_with_spectrum(12, 20, 0.9, gen)
    b = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    factor, lower, upper = _low_rank(v, b, a, 100)
    assert factor.q.shape == (12, 12) and factor.dropped == 0.0 and factor.energy_kept == pytest.approx(1.0)
    assert lower == pytest.approx(_true_cosine(v, b, a), abs=1e-5)
    assert upper - lower == pytest.approx(ROUNDING)  # nothing dropped: only the rounding allowance


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_picks_the_fewest_directions_holding_that_share_of_sigma_to_the_fourth(energy: float) -> None:
    gen = torch.Generator().manual_seed(6)
    v = _v_with_spectrum(30, 18, 0.85, gen)
    s4 = torch.linalg.svdvals(v) ** 4
    share = torch.cumsum(s4, 0) / s4.sum()
    factor = factor_of(v.float(), None, energy)
    k = factor.q.shape[1]
    assert float(share[k - 1]) >= energy - 1e-6
    assert k == 1 or float(share[k - 2]) < energy
    assert factor.energy_kept == pytest.approx(float(share[k - 1]), rel=1e-5)
    # The factor's columns are σ_j·u_j/√‖V‖: Q·Qᵀ is C's top-k part.
    c = v @ v.T / torch.linalg.norm(v)
    eig = torch.linalg.eigvalsh(c).flip(0)
    assert torch.allclose(torch.linalg.eigvalsh(factor.q.double() @ factor.q.double().T).flip(0)[:k], eig[:k],
                          rtol=1e-4, atol=1e-6)
    assert factor.dropped == pytest.approx(float(eig[k]) if k < len(eig) else 0.0, rel=1e-4, abs=1e-9)


def test_v_zero_and_rank_deficient_v() -> None:
    zero = factor_of(torch.zeros(6, 9), 3, None)
    assert zero.v_norm == 0.0 and zero.q.shape == (6, 0)
    gen = torch.Generator().manual_seed(8)
    low = torch.randn(10, 2, generator=gen) @ torch.randn(2, 14, generator=gen)  # rank 2
    factor = factor_of(low, 8, None)
    assert factor.full_rank == 2 and factor.q.shape[1] == 2 and factor.dropped == 0.0


def test_undecided_flags_threshold_and_top_k_cuts() -> None:
    lowers: list[float | None] = [0.2, 0.45, 0.6, None]
    uppers: list[float | None] = [0.3, 0.55, 0.7, None]
    assert undecided(lowers, uppers, [True, True, False, False], 0.5) == [False, True, False, False]
    # Top-2 of three: the second selected one's interval [0.45, 0.55] lies below 0.6: decided.
    assert undecided(lowers, uppers, [True, True, False, False], None) == [False, False, False, False]
    uppers[1] = 0.65
    assert undecided(lowers, uppers, [True, True, False, False], None) == [False, True, True, False]
    assert math.isfinite(cosine_upper(0.0, 0.0, 0.5, 0.1, 1.0))
    # Within the rounding allowance of τ, an unselected layer could still be selected by the full C.
    assert undecided([0.5 + 1e-8, 0.9], [0.5 + 2e-6, 0.9], [False, False], 0.5) == [True, False]
