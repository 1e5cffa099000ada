"""Checkpoint and adapter layouts: pickled .bin (single, sharded, preferred-against), quantized refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import read_adapter, run_cli, trio_args
from safetensors.torch import load_file, save_file

from safelora_cli.checkpoint import TensorStream, open_checkpoint

Q0 = "model.layers.0.self_attn.q_proj"


def inspect_cosines(*args: object) -> list[float | None]:
    result = run_cli("inspect", *args, "--format", "json", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    return [layer["cosine"] for layer in json.loads(result.stdout)["layers"]]


def to_bin(model_dir: Path, out: Path, shards: int = 1, legacy: bool = False) -> Path:
    """Rewrite a safetensors checkpoint as pytorch_model.bin, or `shards` .bin shards with an index."""
    out.mkdir(parents=True)
    shutil.copy(model_dir / "config.json", out / "config.json")
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors = {k: v for f in files for k, v in load_file(str(model_dir / f)).items()}
    names = sorted(tensors)
    if shards == 1:
        torch.save(tensors, out / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return out
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: tensors[k] for k in names[i::shards]}
        torch.save(part, out / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.mark.parametrize(("shards", "legacy"), [(1, False), (1, True), (3, False)],
                         ids=["single", "single-legacy-format", "sharded"])
def test_bin_checkpoints_give_the_safetensors_result(shards: int, legacy: bool, llama_trio: Trio,
                                                     tmp_path: Path) -> None:
    base = to_bin(llama_trio.base, tmp_path / "base", shards, legacy)
    aligned = to_bin(llama_trio.aligned, tmp_path / "aligned", shards, legacy)
    expected = inspect_cosines(*trio_args(llama_trio))
    assert inspect_cosines("--base", base, "--aligned", aligned, "--adapter", llama_trio.adapter) == expected


def test_safetensors_is_preferred_when_both_layouts_exist(llama_trio: Trio, tmp_path: Path) -> None:
    base = shutil.copytree(llama_trio.base, tmp_path / "base")
    zeros = {k: torch.zeros_like(v) for k, v in load_file(str(base / "model.safetensors")).items()}
    torch.save(zeros, base / "pytorch_model.bin")  # a stale pickle that would change every cosine
    expected = inspect_cosines(*trio_args(llama_trio))
    assert inspect_cosines("--base", base, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter) == expected


def test_bin_shards_are_streamed_one_at_a_time(llama_trio: Trio, tmp_path: Path) -> None:
    base = open_checkpoint(to_bin(llama_trio.base, tmp_path / "base", shards=3), "base")
    first, second = (f"model.layers.0.self_attn.{m}.weight" for m in ("q_proj", "k_proj"))
    assert base.tensors[first].file != base.tensors[second].file
    with TensorStream() as stream:
        tensor = stream.read(base, first)
        stream.read(base, second)
        assert [entry[0] for entry in stream._open.values()] == [base.tensors[second].file]
    assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()  # a copy, not the map


def adapter_as_bin(adapter: Path, out: Path, keep_safetensors: bool = False) -> Path:
    shutil.copytree(adapter, out)
    tensors, _ = read_adapter(adapter)
    torch.save(tensors, out / "adapter_model.bin")
    if not keep_safetensors:
        (out / "adapter_model.safetensors").unlink()
    return out


def test_a_bin_adapter_is_patched_into_safetensors(llama_trio: Trio, tmp_path: Path) -> None:
    adapter = adapter_as_bin(llama_trio.adapter, tmp_path / "adapter")
    expected_out, out = tmp_path / "from-safetensors", tmp_path / "from-bin"
    for source, target in ((llama_trio.adapter, expected_out), (adapter, out)):
        result = run_cli("patch", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--adapter", source,
                         "--out", target, "--device", "cpu", "--top-k", "3", "--quiet")
        assert result.exit_code == 0, result.stderr
    assert not (out / "adapter_model.bin").exists()
    assert (adapter / "adapter_model.bin").exists()  # the input is untouched
    got, metadata = read_adapter(out)
    want, _ = read_adapter(expected_out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert metadata["format"] == "pt"


def test_safetensors_adapter_is_preferred_over_a_bin(llama_trio: Trio, tmp_path: Path) -> None:
    adapter = adapter_as_bin(llama_trio.adapter, tmp_path / "adapter", keep_safetensors=True)
    tensors, _ = read_adapter(llama_trio.adapter)
    torch.save({k: -v for k, v in tensors.items()}, adapter / "adapter_model.bin")  # differs from the safetensors
    expected = inspect_cosines(*trio_args(llama_trio))
    assert inspect_cosines("--base", llama_trio.base, "--aligned", llama_trio.aligned, "--adapter", adapter) == expected


class WouldRunCode:
    """Unpickling this would create a file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["model", "adapter"])
def test_a_pickle_that_would_run_code_is_refused_without_running(which: str, llama_trio: Trio,
                                                                 tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    base, adapter = llama_trio.base, llama_trio.adapter
    if which == "model":
        base = tmp_path / "base"
        base.mkdir()
        torch.save({f"{Q0}.weight": torch.zeros(32, 32), "evil": WouldRunCode(marker)}, base / "pytorch_model.bin")
    else:
        adapter = adapter_as_bin(llama_trio.adapter, tmp_path / "adapter")
        torch.save({"evil": WouldRunCode(marker)}, adapter / "adapter_model.bin")
    result = run_cli("inspect", "--base", base, "--aligned", llama_trio.aligned, "--adapter", adapter)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "pickled objects other than tensors" in result.stderr
    assert not marker.exists()


def quantize_gptq(tensors: dict[str, torch.Tensor]) -> None:
    weight = tensors.pop(f"{Q0}.weight")
    tensors[f"{Q0}.qweight"] = torch.zeros(weight.shape[1] // 8, weight.shape[0], dtype=torch.int32)
    tensors[f"{Q0}.scales"] = torch.ones(1, weight.shape[0], dtype=torch.float16)


def quantize_fp8(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{Q0}.weight"] = tensors[f"{Q0}.weight"].float().to(torch.float8_e4m3fn)
    tensors[f"{Q0}.weight_scale"] = torch.ones(())


QUANTIZED = {
    "gptq (qweight, no weight)": (quantize_gptq, None, f"stores {Q0} as quantized tensors ({Q0}.qweight"),
    "fp8 with weight_scale": (quantize_fp8, None, f"stores {Q0}.weight as F8_E4M3"),
    "quantization_config": (None, {"quant_method": "awq", "bits": 4}, "quantization_config: awq"),
}


@pytest.mark.parametrize("case", QUANTIZED)
def test_quantized_checkpoints_are_refused_as_quantized(case: str, llama_trio: Trio, tmp_path: Path) -> None:
    edit, quant_config, message = QUANTIZED[case]
    base = shutil.copytree(llama_trio.base, tmp_path / "base")
    if edit is not None:
        tensors = load_file(str(base / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    if quant_config is not None:
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "quantization_config": quant_config}))
    result = run_cli("inspect", "--base", base, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter)
    assert result.exit_code == 1
    assert "The base model" in result.stderr and message in result.stderr
    assert "quantized checkpoints cannot be used" in result.stderr and "full-precision" in result.stderr
