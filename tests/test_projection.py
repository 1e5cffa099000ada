"""The fast projection against the direct float64 formula, on every shape class."""

from __future__ import annotations

import math

import pytest
import torch
from reference import alignment_cosine, cosine, dense_c, patched_b, truncated_projector

from safelora_cli.alignment import AlignmentMatrix
from safelora_cli.config import Projection, ProjectionSettings, SvdMethod
from safelora_cli.projection import UNDEFINED_DW_ZERO, UNDEFINED_V_ZERO, LayerMath, layer_math, project

CPU = torch.device("cpu")


def analyze_layer(w_base: torch.Tensor, w_aligned: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  settings: ProjectionSettings, device: torch.device, transposed: bool = False) -> LayerMath:
    """The whole fast method for one layer, as the pipeline runs it."""
    alignment = AlignmentMatrix(w_base.to(device), w_aligned.to(device), transposed)
    projected = project(alignment, settings, [lora_b.to(device=device, dtype=torch.float32)])
    cb = projected.cbs[0] if projected.cbs is not None else None
    vtb = projected.vtbs[0] if projected.vtbs is not None else None
    return layer_math(projected, lora_a, lora_b, cb, vtb)
APPROX = ProjectionSettings()
SHAPES = {"square": (48, 48), "tall": (96, 32), "wide": (24, 80)}


def layer(out: int, inp: int, r: int, seed: int, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    w_base = torch.randn(out, inp, generator=gen).to(dtype)
    w_aligned = (w_base.float() + 0.1 * torch.randn(out, inp, generator=gen)).to(dtype)
    lora_a = torch.randn(r, inp, generator=gen)
    lora_b = torch.randn(out, r, generator=gen)
    return w_base, w_aligned, lora_a, lora_b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 4, 16])
def test_cosine_matches_direct_formula(shape: str, r: int) -> None:
    w_base, w_aligned, a, b = layer(*SHAPES[shape], r, seed=r)
    result = analyze_layer(w_base, w_aligned, a, b, APPROX, CPU)
    expected = cosine(dense_c(w_base, w_aligned), a, b)
    assert result.cosine == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 8])
def test_projected_b_is_c_times_b(shape: str, r: int) -> None:
    w_base, w_aligned, a, b = layer(*SHAPES[shape], r, seed=10 + r)
    result = analyze_layer(w_base, w_aligned, a, b, APPROX, CPU)
    expected = patched_b(dense_c(w_base, w_aligned), b)
    assert result.projected_b is not None
    torch.testing.assert_close(result.projected_b.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_norms_match_dense_matrices(shape: str) -> None:
    w_base, w_aligned, a, b = layer(*SHAPES[shape], 4, seed=3)
    result = analyze_layer(w_base, w_aligned, a, b, APPROX, CPU)
    c = dense_c(w_base, w_aligned)
    dw = b.double() @ a.double()
    v = w_aligned.double() - w_base.double()
    assert result.v_norm == pytest.approx(float(v.norm()), rel=1e-5)
    assert result.delta_norm == pytest.approx(float(dw.norm()), rel=1e-6)
    assert result.residual_norm == pytest.approx(float((dw - c @ dw).norm()), rel=1e-5)
    assert result.b_distance == pytest.approx(float((b.double() - c @ b.double()).norm()), rel=1e-5)


def test_bfloat16_weights_are_upcast_before_subtracting() -> None:
    w_base, w_aligned, a, b = layer(40, 24, 4, seed=4, dtype=torch.bfloat16)
    result = analyze_layer(w_base, w_aligned, a, b, APPROX, CPU)
    assert result.cosine == pytest.approx(cosine(dense_c(w_base, w_aligned), a, b), abs=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 5])
def test_exact_projection_with_rank(shape: str, k: int) -> None:
    w_base, w_aligned, a, b = layer(*SHAPES[shape], 4, seed=20 + k)
    settings = ProjectionSettings(Projection.EXACT, rank=k, svd=SvdMethod.FULL)
    result = analyze_layer(w_base, w_aligned, a, b, settings, CPU)
    p = truncated_projector(w_base, w_aligned, k)
    assert result.subspace_rank == k
    assert result.cosine == pytest.approx(cosine(p, a, b), abs=1e-5)
    torch.testing.assert_close(result.projected_b.double(), p @ b.double(), rtol=1e-4, atol=1e-5)  # type: ignore[union-attr]


def test_randomized_svd_finds_a_clear_subspace() -> None:
    """With a spectral gap the randomized SVD spans the same top-k space as the full one."""
    gen = torch.Generator().manual_seed(7)
    out, inp, k = 200, 160, 6
    u = torch.linalg.qr(torch.randn(out, k, generator=gen))[0]
    w_base = torch.randn(out, inp, generator=gen)
    v = u @ torch.randn(k, inp, generator=gen) * 10 + 1e-3 * torch.randn(out, inp, generator=gen)
    a, b = torch.randn(4, inp, generator=gen), torch.randn(out, 4, generator=gen)
    settings = ProjectionSettings(Projection.EXACT, rank=k, svd=SvdMethod.RANDOMIZED)
    result = analyze_layer(w_base, w_base + v, a, b, settings, CPU)
    assert result.cosine == pytest.approx(cosine(truncated_projector(w_base, w_base + v, k), a, b), abs=1e-4)


def test_energy_picks_the_fewest_directions() -> None:
    """σ² = 9, 4, 1 (+ zeros): 0.6 of the energy needs 1 direction, 0.95 needs 3."""
    out, inp = 10, 8
    w_base = torch.zeros(out, inp)
    v = torch.zeros(out, inp)
    v[0, 0], v[1, 1], v[2, 2] = 3.0, 2.0, 1.0
    a, b = torch.randn(2, inp), torch.randn(out, 2)
    ranks = {
        e: analyze_layer(w_base, v, a, b, ProjectionSettings(Projection.EXACT, energy=e), CPU).subspace_rank
        for e in (0.6, 9 / 14, 0.9, 0.95, 1.0)
    }
    assert ranks == {0.6: 1, 9 / 14: 1, 0.9: 2, 0.95: 3, 1.0: 3}


def test_rank_larger_than_v_rank_is_capped() -> None:
    w_base = torch.zeros(6, 5)
    v = torch.zeros(6, 5)
    v[0, 0] = 1.0
    a, b = torch.randn(2, 5), torch.randn(6, 2)
    settings = ProjectionSettings(Projection.EXACT, rank=4, svd=SvdMethod.FULL)
    assert analyze_layer(w_base, v, a, b, settings, CPU).subspace_rank == 1


def test_identical_models_give_undefined_cosine() -> None:
    w, _, a, b = layer(16, 12, 2, seed=5)
    result = analyze_layer(w, w.clone(), a, b, APPROX, CPU)
    assert result.cosine is None
    assert result.undefined_reason == UNDEFINED_V_ZERO
    assert result.projected_b is None


def test_zero_lora_b_gives_undefined_cosine() -> None:
    w_base, w_aligned, a, b = layer(16, 12, 2, seed=6)
    result = analyze_layer(w_base, w_aligned, a, torch.zeros_like(b), APPROX, CPU)
    assert result.cosine is None
    assert result.undefined_reason == UNDEFINED_DW_ZERO
    assert result.projected_b is None


def test_update_orthogonal_to_alignment_has_cosine_zero() -> None:
    """ΔW with rows outside V's column space: CΔW = 0, so the limit cosine 0 (fully unaligned)."""
    w_base = torch.zeros(6, 4)
    v = torch.zeros(6, 4)
    v[:2] = torch.randn(2, 4)
    b = torch.zeros(6, 2)
    b[3:5] = torch.randn(2, 2)
    result = analyze_layer(w_base, v, torch.randn(2, 4), b, APPROX, CPU)
    assert result.cosine == 0.0
    assert not math.isnan(result.residual_norm)


def test_update_inside_alignment_space_has_cosine_one() -> None:
    """When V's singular values are equal, C acts as a multiple of the identity on its span."""
    w_base = torch.zeros(8, 8)
    v = torch.eye(8)
    v[4:] = 0
    b = torch.zeros(8, 3)
    b[:4] = torch.randn(4, 3)
    result = analyze_layer(w_base, v, torch.randn(3, 8), b, APPROX, CPU)
    assert result.cosine == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_blockwise_v_matches_the_dense_formula(transposed: bool, block_rows: int) -> None:
    """Blocks of stored rows (with a ragged last block), in both storage layouts."""
    out, inp = 30, 22
    w_base, w_aligned, _, b = layer(out, inp, 3, seed=40)
    stored = (w_base.T.contiguous(), w_aligned.T.contiguous()) if transposed else (w_base, w_aligned)
    cols = stored[0].shape[1]
    alignment = AlignmentMatrix(*stored, transposed=transposed, block_elements=block_rows * cols)
    b2 = torch.randn(out, 5)
    cbs = alignment.paper_project([b, b2])
    assert cbs is not None
    c = dense_c(w_base, w_aligned)
    torch.testing.assert_close(cbs[0].double(), c @ b.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cbs[1].double(), c @ b2.double(), rtol=1e-5, atol=1e-6)
    assert alignment.norm() == pytest.approx(float((w_aligned.double() - w_base.double()).norm()), rel=1e-6)
    torch.testing.assert_close(alignment.dense().double(), w_aligned.double() - w_base.double())


def test_blockwise_results_do_not_depend_on_other_adapters() -> None:
    """Patching several adapters in one pass must give the bits each would get alone."""
    w_base, w_aligned, _, b = layer(64, 40, 4, seed=41)
    alone = AlignmentMatrix(w_base, w_aligned, block_elements=9 * 40).paper_project([b])
    together = AlignmentMatrix(w_base, w_aligned, block_elements=9 * 40).paper_project([torch.randn(64, 16), b])
    assert alone is not None and together is not None
    assert torch.equal(alone[0], together[1])


@pytest.mark.parametrize("poison", [0.0, float("nan"), float("inf")])
def test_no_projection_without_a_finite_nonzero_v(poison: float) -> None:
    w_base = torch.ones(12, 6)
    w_aligned = w_base.clone()
    w_aligned[3, 2] += poison
    alignment = AlignmentMatrix(w_base, w_aligned, block_elements=4 * 6)
    assert alignment.paper_project([torch.randn(12, 2)]) is None
    assert (alignment.norm() == 0.0) if poison == 0.0 else not math.isfinite(alignment.norm())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("settings", [APPROX, ProjectionSettings(Projection.EXACT, rank=4)], ids=["approx", "exact"])
def test_alignment_cosine_matches_direct_formula(shape: str, settings: ProjectionSettings) -> None:
    w_base, w_aligned, a, b = layer(*SHAPES[shape], 4, seed=11)
    result = analyze_layer(w_base, w_aligned, a, b, settings, CPU)
    assert result.alignment_cosine == pytest.approx(alignment_cosine(w_base, w_aligned, a, b), abs=1e-6)


def test_alignment_cosine_of_transposed_storage_matches_direct_formula() -> None:
    w_base, w_aligned, a, b = layer(40, 24, 4, seed=12)  # ΔW is (40, 24); stored weights are (24, 40)
    result = analyze_layer(w_base.T.contiguous(), w_aligned.T.contiguous(), a, b, APPROX, CPU, transposed=True)
    assert result.alignment_cosine == pytest.approx(alignment_cosine(w_base, w_aligned, a, b), abs=1e-6)


def test_the_sign_the_cosine_cannot_see() -> None:
    """ΔW = V and ΔW = −V have the same cosine (C is PSD); the alignment cosine tells them apart."""
    gen = torch.Generator().manual_seed(13)
    w_base = torch.randn(32, 32, generator=gen)
    u, v = torch.randn(32, 2, generator=gen), torch.randn(2, 32, generator=gen)
    w_aligned = w_base + u @ v
    forward = analyze_layer(w_base, w_aligned, v, u, APPROX, CPU)
    backward = analyze_layer(w_base, w_aligned, v, -u, APPROX, CPU)
    assert forward.cosine == pytest.approx(backward.cosine, abs=1e-6)
    assert forward.alignment_cosine == pytest.approx(1.0, abs=1e-5)
    assert backward.alignment_cosine == pytest.approx(-1.0, abs=1e-5)

