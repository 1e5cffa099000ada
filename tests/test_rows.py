"""Weights read in row blocks: what is held is bounded in bytes, and results do not change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import run_cli, tree_digest
from reference import dense_c
from test_bad_inputs import copy_trio, edit_tensors
from test_layouts import to_bin

from safelora_cli import checkpoint, prefetch
from safelora_cli.alignment import AlignmentMatrix
from safelora_cli.checkpoint import open_checkpoint
from safelora_cli.prefetch import Prefetcher, weight_bytes

CPU = torch.device("cpu")


def stream_everything(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int = 1000) -> None:
    """Make every weight a streamed one, in chunks of a few rows."""
    monkeypatch.setattr(prefetch, "HOLD_BYTES", 0)
    monkeypatch.setattr(prefetch, "CHUNK_BYTES", chunk_bytes)


def patch_digest(out: Path, *args: object) -> dict[str, str]:
    result = run_cli("patch", *args, "--out", out, "--device", "cpu", "--quiet", "--top-k", "3")
    assert result.exit_code == 0, result.stderr
    return tree_digest(out)


def trio_of(base: Path, aligned: Path, adapter: Path) -> list[object]:
    return ["--base", base, "--aligned", aligned, "--adapter", adapter]


@pytest.mark.parametrize("layout", ["bf16-single", "f32-sharded", "bin-sharded"])
def test_streamed_weights_give_the_bits_of_whole_ones(layout: str, llama_trio: Trio, sharded_trio: Trio,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trio = sharded_trio if layout == "f32-sharded" else llama_trio
    args = trio_of(trio.base, trio.aligned, trio.adapter)
    if layout == "bin-sharded":
        args = trio_of(to_bin(trio.base, tmp_path / "base", 3), to_bin(trio.aligned, tmp_path / "aligned", 3),
                       trio.adapter)
    whole = patch_digest(tmp_path / "whole", *args)
    stream_everything(monkeypatch)
    assert patch_digest(tmp_path / "streamed", *args) == whole


def test_transposed_weights_stream_too(variant_cases, tmp_path: Path,  # type: ignore[no-untyped-def]
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 Conv1D stores Vᵀ: its stored rows are V's columns."""
    case = variant_cases.case("gpt2-conv1d")
    args = trio_of(case.base, case.aligned, case.adapter)
    whole = patch_digest(tmp_path / "whole", *args)
    stream_everything(monkeypatch)
    assert patch_digest(tmp_path / "streamed", *args) == whole


def test_exact_projection_streams_too(llama_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*trio_of(llama_trio.base, llama_trio.aligned, llama_trio.adapter), "--projection", "exact", "--rank", "2"]
    whole = patch_digest(tmp_path / "whole", *args)
    stream_everything(monkeypatch)
    assert patch_digest(tmp_path / "streamed", *args) == whole


def _recording_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Record the rows of every row-block read and count whole-tensor reads."""
    blocks: list[int] = []
    wholes = [0]
    read_rows, read = checkpoint.TensorStream.read_rows, checkpoint.TensorStream.read

    def rows(self, model, key, start, stop, buffer=None):  # type: ignore[no-untyped-def]
        blocks.append(stop - start)
        return read_rows(self, model, key, start, stop, buffer)

    def whole(self, model, key):  # type: ignore[no-untyped-def]
        wholes[0] += 1
        return read(self, model, key)

    monkeypatch.setattr(checkpoint.TensorStream, "read_rows", rows)
    monkeypatch.setattr(checkpoint.TensorStream, "read", whole)
    return blocks, wholes


def test_wide_weights_are_read_in_blocks_within_the_budget(sharded_trio: Trio,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No read is larger than a chunk, and what is held never passes the budget (two chunks here)."""
    base, aligned = open_checkpoint(sharded_trio.base, "base"), open_checkpoint(sharded_trio.aligned, "aligned")
    keys = sorted(k for k in base.tensors if k.endswith("mlp.up_proj.weight"))  # (48, 32) float32
    per_row = weight_bytes((base, aligned), keys[0]) // 48
    blocks, wholes = _recording_reads(monkeypatch)
    peaks = []
    fetcher = Prefetcher(keys, base, aligned, CPU, budget_bytes=0, hold_bytes=0, chunk_bytes=10 * per_row)
    with fetcher as items:
        for item in items:
            matrix = AlignmentMatrix(*item.wait(), block_elements=5 * 32)
            for _ in matrix._blocks():
                peaks.append(fetcher._held)
                assert fetcher._held <= 2 * 10 * per_row
    assert wholes[0] == 0
    # The reader streams both passes of both models, even for a consumer that used only one.
    assert max(blocks) == 10 and sum(blocks) == prefetch.PASSES * 2 * 48 * len(keys)
    assert max(peaks) > 0


def streamed_alignment(trio: Trio, key: str, block_rows: int, chunk_rows: int):  # type: ignore[no-untyped-def]
    """(whole-tensor AlignmentMatrix, Prefetcher yielding the streamed one) for `key` of `trio`."""
    base, aligned = open_checkpoint(trio.base, "base"), open_checkpoint(trio.aligned, "aligned")
    rows, cols = base.tensors[key].shape
    per_row = weight_bytes((base, aligned), key) // rows
    with checkpoint.TensorStream() as stream:
        whole = AlignmentMatrix(stream.read(base, key), stream.read(aligned, key), block_elements=block_rows * cols)
    fetcher = Prefetcher([key], base, aligned, CPU, hold_bytes=0, chunk_bytes=chunk_rows * per_row)
    return whole, fetcher, block_rows * cols


@pytest.mark.parametrize("transposed", [False, True])
def test_blocks_of_a_streamed_weight_give_the_bits_of_whole_ones(sharded_trio: Trio, transposed: bool) -> None:
    """Several blocks per chunk, a ragged last chunk; every pass after the second reads again."""
    key = "model.layers.1.mlp.down_proj.weight"  # (32, 48)
    whole, fetcher, block_elements = streamed_alignment(sharded_trio, key, block_rows=3, chunk_rows=9)
    b = torch.randn(48 if transposed else 32, 2, generator=torch.Generator().manual_seed(3))
    reference = AlignmentMatrix(whole._source.base, whole._source.aligned, transposed, block_elements)
    expected = reference.paper_project([b])
    with fetcher as items:
        for item in items:
            matrix = AlignmentMatrix(*item.wait(), transposed, block_elements=block_elements)
            got = matrix.paper_project([b])
            assert expected is not None and got is not None
            assert torch.equal(got[0], expected[0])
            assert torch.equal(matrix.dense(), reference.dense())  # a third pass: read again in this thread
            assert matrix.nonfinite_weight() is None  # and a fourth


def test_an_abandoned_pass_does_not_disturb_the_next_weight(sharded_trio: Trio) -> None:
    """Only ‖V‖ of the first weight is asked for: its second pass is skipped, the next one is intact."""
    base, aligned = open_checkpoint(sharded_trio.base, "base"), open_checkpoint(sharded_trio.aligned, "aligned")
    keys = [f"model.layers.{i}.mlp.gate_proj.weight" for i in range(3)]
    with checkpoint.TensorStream() as stream:
        expected = [AlignmentMatrix(stream.read(base, k), stream.read(aligned, k)).dense() for k in keys]
    per_row = weight_bytes((base, aligned), keys[0]) // 48
    with Prefetcher(keys, base, aligned, CPU, hold_bytes=0, chunk_bytes=7 * per_row) as items:
        for i, item in enumerate(items):
            matrix = AlignmentMatrix(*item.wait(), block_elements=7 * 32)
            if i == 0:
                assert matrix.norm() == pytest.approx(float(expected[0].norm()), rel=1e-6)
                continue
            assert torch.equal(matrix.dense(), expected[i])


def test_a_finite_v_of_huge_entries_is_projected() -> None:
    """Entries of 1e19: ‖V‖² overflows float32 and so does V·(Vᵀ·B), yet V is finite."""
    gen = torch.Generator().manual_seed(5)
    w_base = torch.randn(30, 22, generator=gen) * 1e19
    w_aligned = w_base + torch.randn(30, 22, generator=gen) * 1e19
    b = torch.randn(30, 3, generator=gen)
    for block_rows in (4, 30):
        matrix = AlignmentMatrix(w_base, w_aligned, block_elements=block_rows * 22)
        cbs = matrix.paper_project([b])
        v64 = w_aligned.double() - w_base.double()
        assert matrix.norm() == pytest.approx(float(v64.norm()), rel=1e-6)
        assert cbs is not None
        torch.testing.assert_close(cbs[0].double(), dense_c(w_base, w_aligned) @ b.double(), rtol=1e-5, atol=0)


def test_a_v_that_really_overflows_is_not_projected() -> None:
    w_base = torch.full((6, 4), -3e38)
    w_aligned = torch.full((6, 4), 3e38)  # finite weights, V = 6e38 is not a float32
    matrix = AlignmentMatrix(w_base, w_aligned)
    assert matrix.paper_project([torch.ones(6, 1)]) is None
    assert not math.isfinite(matrix.norm())
    assert matrix.nonfinite_weight() is None


def test_huge_alignment_is_patched_end_to_end(llama_trio: Trio, tmp_path: Path) -> None:
    """Formerly reported as 'W_aligned − W_base overflows float32'."""
    trio = copy_trio(llama_trio, tmp_path)
    key = "model.layers.1.self_attn.v_proj.weight"

    def enlarge(t: dict[str, torch.Tensor]) -> None:
        t[key] = (t[key].float() + 1e19).to(t[key].dtype)

    edit_tensors(trio.aligned / "model.safetensors", enlarge)
    result = run_cli("patch", *trio_of(trio.base, trio.aligned, trio.adapter), "--out", tmp_path / "out",
                     "--device", "cpu", "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    layer = next(r for r in json.loads(result.stdout)["layers"] if r["module"] == key.removesuffix(".weight"))
    assert layer["v_norm"] > 1e19 and math.isfinite(layer["v_norm"]) and layer["cosine"] is not None


@pytest.mark.parametrize("which", ["base", "aligned"])
def test_nan_in_a_streamed_weight_names_its_model(which: str, llama_trio: Trio, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    trio = copy_trio(llama_trio, tmp_path)
    key = "model.layers.2.self_attn.q_proj.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key][-1, -1] = float("nan")

    edit_tensors((trio.base if which == "base" else trio.aligned) / "model.safetensors", poison)
    stream_everything(monkeypatch)
    result = run_cli("patch", *trio_of(trio.base, trio.aligned, trio.adapter), "--out", tmp_path / "out",
                     "--device", "cpu")
    assert result.exit_code == 1
    assert f"{key} in the {which} model" in result.stderr
    assert not (tmp_path / "out").exists()
