"""Bad input: one clear 'Error:' line, a non-zero exit code, and nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import run_cli, tree_digest
from safetensors.torch import load_file, save_file


def copy_trio(trio: Trio, root: Path) -> Trio:
    copies = [shutil.copytree(p, root / p.name) for p in (trio.base, trio.aligned, trio.adapter)]
    return Trio(*copies)


def set_adapter_config(trio: Trio, **changes: object) -> None:
    path = trio.adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(file: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def nan_in_aligned(trio: Trio) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")

    edit_tensors(trio.aligned / "model.safetensors", poison)


def inf_in_lora_b(trio: Trio) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][1, 1] = float("inf")

    edit_tensors(trio.adapter / "adapter_model.safetensors", poison)


def drop_from_base(trio: Trio) -> None:
    edit_tensors(trio.base / "model.safetensors", lambda t: t.pop("model.layers.2.self_attn.q_proj.weight"))


def reshape_aligned(trio: Trio) -> None:
    def grow(t: dict[str, torch.Tensor]) -> None:
        key = "model.layers.0.self_attn.q_proj.weight"
        t[key] = torch.cat([t[key], t[key][:1]])

    edit_tensors(trio.aligned / "model.safetensors", grow)


def truncate_base(trio: Trio) -> None:
    file = trio.base / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


CASES: dict[str, tuple[Callable[[Trio], None], str]] = {
    "non-LoRA adapter": (lambda t: set_adapter_config(t, peft_type="IA3"), "only LoRA adapters"),
    "DoRA adapter": (lambda t: set_adapter_config(t, use_dora=True), "DoRA adapter"),
    "config not JSON": (lambda t: (t.adapter / "adapter_config.json").write_text("{not json"), "is not valid JSON"),
    "no adapter weights": (
        lambda t: (t.adapter / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"
    ),
    "NaN in aligned weight": (nan_in_aligned, "model.layers.1.self_attn.v_proj.weight in the aligned model"),
    "Inf in lora_B": (inf_in_lora_b, "q_proj.lora_B.weight in the adapter"),
    "module missing from base": (drop_from_base, "no weight in the base model: model.layers.2.self_attn.q_proj"),
    "base/aligned shape mismatch": (reshape_aligned, "Shapes disagree"),
    "truncated base": (truncate_base, "is truncated"),
    "empty base directory": (lambda t: [p.unlink() for p in t.base.iterdir()], "directory"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clean_error(case: str, llama_trio: Trio, tmp_path: Path) -> None:
    mutate, expected = CASES[case]
    trio = copy_trio(llama_trio, tmp_path / "in")
    mutate(trio)
    out = tmp_path / "out"
    before = tree_digest(tmp_path / "in")
    result = run_cli("patch", "--base", trio.base, "--aligned", trio.aligned, "--adapter", trio.adapter,
                     "--out", out, "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert len(result.stderr.splitlines()) == 1
    assert expected in result.stderr
    assert result.stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert tree_digest(tmp_path / "in") == before


@pytest.mark.parametrize("which", ["--base", "--aligned", "--adapter"])
def test_missing_path(which: str, llama_trio: Trio, tmp_path: Path) -> None:
    paths = {"--base": llama_trio.base, "--aligned": llama_trio.aligned, "--adapter": llama_trio.adapter}
    paths[which] = tmp_path / "nowhere"
    result = run_cli("inspect", *[x for kv in paths.items() for x in kv])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: The {which[2:]} path")
    assert "does not exist" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold", "0.3", "--top-k", "2"], "not both"),
        (["--top-k", "-1"], "top-k must be 0 or more"),
        (["--threshold", "2"], "must lie in [-1, 1]"),
        (["--projection", "exact"], "needs exactly one of rank K or energy E"),
        (["--rank", "4"], "only apply with projection exact"),
        (["--projection", "exact", "--energy", "1.5"], "energy is a fraction"),
    ],
)
def test_contradictory_options_are_usage_errors(flags: list[str], message: str, llama_trio: Trio) -> None:
    result = run_cli("inspect", "--base", llama_trio.base, "--aligned", llama_trio.aligned,
                     "--adapter", llama_trio.adapter, *flags)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ")
    assert message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu(llama_trio: Trio) -> None:
    result = run_cli("inspect", "--base", llama_trio.base, "--aligned", llama_trio.aligned,
                     "--adapter", llama_trio.adapter, "--device", "cuda")
    assert result.exit_code == 1
    assert "no CUDA device is available" in result.stderr
