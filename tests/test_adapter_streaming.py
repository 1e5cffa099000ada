"""The adapter's tensors are read from its file when used: loading reads no tensor data, the
patched file is written tensor by tensor (untouched ones copied as bytes), and top-K holds at
most K projected B's, with the same selections and outputs as holding them all."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import run_cli, trio_args
from safetensors.torch import load_file, save_file

from safelora_cli import adapter_tensors, analysis, writer
from safelora_cli.adapter import load_adapter
from safelora_cli.analysis import Job
from safelora_cli.config import SelectionRule
from safelora_cli.errors import InputError
from safelora_cli.pairing import LayerPlan
from safelora_cli.projection import LayerMath
from safelora_cli.report import REPORT_NAME
from safelora_cli.safetensors_io import write_safetensors
from safelora_cli.selection import select

WEIGHTS = "adapter_model.safetensors"


def _copy(trio: Trio, root: Path) -> Trio:
    for name in ("base", "aligned", "adapter"):
        shutil.copytree(getattr(trio, name), root / name)
    return Trio(root / "base", root / "aligned", root / "adapter")


def _header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _old_write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The writer as it was before streaming: every tensor in memory, laid out in name order."""
    from safelora_cli.safetensors_io import _DTYPE_NAMES, _header_shape

    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        tensor, name = tensors[key], _DTYPE_NAMES[tensors[key].dtype]
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": name, "shape": _header_shape(tensor, name), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    data = b"".join(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k in sorted(tensors))
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def test_loading_reads_no_tensor_data_and_each_access_reads_the_file(llama_trio: Trio,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = adapter_tensors.read_stored
    monkeypatch.setattr(adapter_tensors, "read_stored", lambda stored: reads.append(stored.key) or real(stored))
    adapter = load_adapter(llama_trio.adapter)
    key = adapter.modules[0].b_key
    stored = load_file(str(llama_trio.adapter / WEIGHTS))
    assert key in adapter.tensors and "missing" not in adapter.tensors and len(adapter.tensors) == len(stored)
    assert adapter.tensors.shape(key) == tuple(stored[key].shape) and adapter.tensors.dtype(key) == "F32"
    assert reads == []
    first, second = adapter.tensors[key], adapter.tensors[key]
    assert reads == [key, key]  # nothing cached
    assert torch.equal(first, stored[key])
    assert first.data_ptr() != second.data_ptr()


def test_a_garbled_data_region_loads_and_fails_at_the_layer_naming_the_tensor(llama_trio: Trio,
                                                                              tmp_path: Path) -> None:
    trio = _copy(llama_trio, tmp_path / "in")
    file = trio.adapter / WEIGHTS
    raw = bytearray(file.read_bytes())
    end = _header_end(file)
    raw[end:] = b"\xff" * (len(raw) - end)  # every float32 factor is NaN
    file.write_bytes(bytes(raw))
    adapter = load_adapter(trio.adapter)  # the header is intact: loading succeeds
    assert len(adapter.modules) == 6
    result = run_cli("patch", *trio_args(trio), "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: base_model.model.model.layers.0.self_attn.") and "lora_A.weight in the " \
        "adapter" in lines[0] and "contains NaN or Inf values" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_file_cut_short_after_loading_names_the_tensor_when_it_is_read(llama_trio: Trio, tmp_path: Path) -> None:
    trio = _copy(llama_trio, tmp_path / "in")
    adapter = load_adapter(trio.adapter)
    file = trio.adapter / WEIGHTS
    file.write_bytes(file.read_bytes()[: _header_end(file)])
    key = sorted(adapter.tensors)[-1]
    with pytest.raises(InputError, match=f"Cannot read tensor {key} from .*the file ends early"):
        adapter.tensors[key]


def test_one_nan_in_a_factor_is_one_line_naming_it(llama_trio: Trio, tmp_path: Path) -> None:
    trio = _copy(llama_trio, tmp_path / "in")
    tensors = load_file(str(trio.adapter / WEIGHTS))
    key = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    save_file(tensors, str(trio.adapter / WEIGHTS), metadata={"format": "pt"})
    result = run_cli("patch", *trio_args(trio), "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {key} in the adapter {trio.adapter} contains NaN or Inf values.")
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1


def _with_untouched(trio: Trio, root: Path) -> Trio:
    """A copy whose adapter also holds untouched tensors of several dtypes and shapes (incl. empty)."""
    trio = _copy(trio, root)
    file = trio.adapter / WEIGHTS
    tensors = load_file(str(file))
    gen = torch.Generator().manual_seed(3)
    tensors["base_model.model.lm_head.weight"] = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    tensors["base_model.model.extra.mask"] = torch.rand(5, 3, generator=gen) > 0.5
    tensors["base_model.model.extra.count"] = torch.arange(7, dtype=torch.int64)
    tensors["base_model.model.extra.empty"] = torch.zeros(0, 4, dtype=torch.float16)
    save_file(tensors, str(file), metadata={"format": "pt", "note": "kept"})
    return trio


@pytest.mark.parametrize("legacy", [False, True])
def test_the_written_file_is_byte_identical_to_the_whole_in_memory_writer(llama_trio: Trio, tmp_path: Path,
                                                                         legacy: bool) -> None:
    trio = _with_untouched(llama_trio, tmp_path / "in")
    if legacy:
        tensors = {k: v.clone() for k, v in load_file(str(trio.adapter / WEIGHTS)).items()}
        torch.save(tensors, trio.adapter / "adapter_model.bin")
        (trio.adapter / WEIGHTS).unlink()
    result = run_cli("patch", *trio_args(trio), "--out", tmp_path / "out", "--device", "cpu", "--top-k", "3")
    assert result.exit_code == 0, result.stderr
    written = (tmp_path / "out" / WEIGHTS).read_bytes()
    adapter = load_adapter(trio.adapter)
    out_tensors = load_file(str(tmp_path / "out" / WEIGHTS))
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    patched = {k: out_tensors[k] for k in out_tensors if not torch.equal(out_tensors[k], adapter.tensors[k])}
    assert len(patched) == 3 == sum(r["selected"] for r in report["layers"])
    whole = {k: patched.get(k, adapter.tensors[k]) for k in adapter.tensors}
    metadata = {**adapter.metadata, "format": "pt", writer.PROVENANCE_KEY: json.loads(written[8:_header_end(
        tmp_path / "out" / WEIGHTS)])["__metadata__"][writer.PROVENANCE_KEY]}
    _old_write(tmp_path / "old.safetensors", whole, metadata)
    assert written == (tmp_path / "old.safetensors").read_bytes()


def test_streamed_write_copies_chunks_and_matches_tensors_given_whole(llama_trio: Trio, tmp_path: Path) -> None:
    trio = _with_untouched(llama_trio, tmp_path / "in")
    adapter = load_adapter(trio.adapter)
    planned = {k: adapter.tensors.source(k) for k in adapter.tensors}
    write_safetensors(tmp_path / "streamed.safetensors", planned, {"format": "pt"}, chunk=24)  # many chunks
    _old_write(tmp_path / "old.safetensors", {k: adapter.tensors[k] for k in adapter.tensors}, {"format": "pt"})
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()
    writer._verify(tmp_path / "streamed.safetensors", planned)
    bad = dict(planned)
    key = adapter.modules[0].a_key
    bad[key] = adapter.tensors[key] + 1
    with pytest.raises(RuntimeError, match=f"verification failed: {key}"):
        writer._verify(tmp_path / "streamed.safetensors", bad)


# --- top-K: at most K C·B's held, the same selection


def _job(cosines: list[float | None]) -> Job:
    plans = [LayerPlan(f"m{i}", i, f"a{i}", f"b{i}", f"w{i}", (2, 2), 1, 1.0) for i in range(len(cosines))]
    return Job(adapter=None, plans=plans)  # type: ignore[arg-type]


@pytest.mark.parametrize("top_k", [0, 1, 3, 7, 12, 13, 40])
def test_top_k_retention_keeps_exactly_the_layers_select_takes_in_any_order(top_k: int) -> None:
    rng = random.Random(top_k)
    for _ in range(30):
        cosines: list[float | None] = [rng.choice([0.1, 0.2, 0.2, 0.5, None]) for _ in range(13)]  # many ties
        job = _job(cosines)
        for i in rng.sample(range(len(cosines)), len(cosines)):  # the disk order, not the layer order
            b = None if cosines[i] is None else torch.full((2, 1), float(i))
            job.maths[i] = LayerMath(cosines[i], None, 1.0, 1.0, 1.0, 0.0, b)
            analysis._retain_top_k(job, i, top_k)
            assert sum(m.projected_b is not None for m in job.maths.values()) <= top_k
        held = [job.maths[i].projected_b is not None for i in range(len(cosines))]
        assert held == select(cosines, SelectionRule(threshold=None, top_k=top_k))
        assert all(job.maths[i].projected_b[0, 0] == i for i in range(len(cosines)) if held[i])  # type: ignore[index]


def _tied(trio: Trio, root: Path) -> Trio:
    """Every layer a copy of layer 0 (weights and factors): the cosines of a module tie exactly."""
    trio = _copy(trio, root)
    for model in (trio.base, trio.aligned):
        tensors = load_file(str(model / "model.safetensors"))
        for key in [k for k in tensors if ".layers." in k]:
            tensors[key] = tensors[key.replace(f".layers.{key.split('.')[2]}.", ".layers.0.")].clone()
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    tensors = load_file(str(trio.adapter / WEIGHTS))
    for key in tensors:
        tensors[key] = tensors[key.replace(f".layers.{key.split('.')[4]}.", ".layers.0.")].clone()
    save_file(tensors, str(trio.adapter / WEIGHTS), metadata={"format": "pt"})
    return trio


def _outcome(trio: Trio, out: Path, top_k: int) -> tuple[bytes, list[tuple[str, bool, float]]]:
    result = run_cli("patch", *trio_args(trio), "--out", out, "--device", "cpu", "--top-k", top_k, "--quiet")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / REPORT_NAME).read_text())
    return (out / WEIGHTS).read_bytes(), [(r["module"], r["selected"], r["cosine"]) for r in report["layers"]]


@pytest.mark.parametrize("top_k", [0, 1, 2, 4, 6, 9])
def test_top_k_outputs_are_those_of_holding_every_c_b_also_with_ties(llama_trio: Trio, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     top_k: int) -> None:
    trio = _tied(llama_trio, tmp_path / "in")
    streamed = _outcome(trio, tmp_path / "streamed", top_k)
    cosines = [c for _, _, c in streamed[1]]
    assert len(set(cosines)) == 2 and len(cosines) == 6  # q_proj's three tie, and v_proj's three
    with monkeypatch.context() as patched:
        patched.setattr(analysis, "_retain_top_k", lambda *args: None)  # hold every C·B, as before
        whole = _outcome(trio, tmp_path / "whole", top_k)
    assert streamed == whole
    assert sum(selected for _, selected, _ in streamed[1]) == min(top_k, 6)


# --- DoRA: magnitudes from row blocks of W_aligned


@pytest.mark.parametrize("transposed", [False, True])
def test_dora_magnitudes_from_row_blocks_equal_the_whole_weight_formula(llama_trio: Trio, transposed: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from safelora_cli import dora
    from safelora_cli.checkpoint import open_checkpoint

    key = "model.layers.1.mlp.down_proj.weight"  # stored (32, 48)
    aligned = open_checkpoint(llama_trio.aligned, "aligned")
    weight = load_file(str(llama_trio.aligned / "model.safetensors"))[key].float()
    w = weight.T if transposed else weight  # as B·A is laid out
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, w.shape[1], generator=gen), torch.randn(w.shape[0], 4, generator=gen)
    plan = LayerPlan("m", 1, "a", "b", key, tuple(w.shape), 4, 0.5, transposed=transposed, magnitude_key="m")
    tensors = {"a": a, "m": torch.zeros(w.shape[0], dtype=torch.float64)}
    monkeypatch.setattr(dora, "CHUNK_BYTES", 5 * weight.shape[1] * 2)  # 5 rows a block: 7 blocks, the last short
    reads: list[tuple[int, int]] = []
    real = dora.TensorStream.read_rows
    monkeypatch.setattr(dora.TensorStream, "read_rows",
                        lambda self, ckpt, k, start, stop, buffer=None: reads.append((start, stop))
                        or real(self, ckpt, k, start, stop, buffer))
    got = dora.recompute_magnitudes([(plan, b)], tensors, aligned, torch.device("cpu"))["m"]
    assert reads == [(s, s + 5) for s in range(0, weight.shape[0], 5)]
    assert got.dtype == torch.float64
    expected = torch.linalg.vector_norm(w.double() + 0.5 * (b.double() @ a.double()), dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
