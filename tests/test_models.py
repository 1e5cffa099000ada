"""Every model family and LoRA variant: real PEFT adapters patched, checked against the float64
formula on weights taken by their in-memory names, and loaded back in PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import read_adapter
from reference import dense_c, patched_b
from variant_models import SPECS, Case

# (case, adapter): named adapters are patched one at a time with --adapter-name.
CASES = [(name, "second" if name == "two-named" else "default") for name in SPECS]
IDS = [name for name, _ in CASES]
_FACTORS = (".lora_A.weight", ".lora_embedding_A")


def patched_dir(variant_cases: Any, name: str, adapter_name: str) -> tuple[Case, Path, dict[str, Any]]:
    """The case, the directory holding the patched adapter's files, and the report."""
    extra = () if adapter_name == "default" else ("--adapter-name", adapter_name)
    out, report = variant_cases.patched(name, *extra)
    case = variant_cases.case(name)
    return case, (out if adapter_name == "default" else out / adapter_name), report


def saved_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Modules that have LoRA factors in an adapter file, by PEFT's key grammar."""
    return {k.removeprefix("base_model.model.").removesuffix(s) for k in tensors for s in _FACTORS if k.endswith(s)}


def b_key(tensors: dict[str, torch.Tensor], module: str) -> str:
    linear = f"base_model.model.{module}.lora_B.weight"
    return linear if linear in tensors else f"base_model.model.{module}.lora_embedding_B"


def expected_b(case: Case, module: str, lora_b: torch.Tensor) -> torch.Tensor:
    """C·B in float64 from the in-memory weights (Conv1D and embeddings: V is used transposed)."""
    w_base, w_aligned = case.base_weights[f"{module}.weight"], case.aligned_weights[f"{module}.weight"]
    if module in case.transposed:
        w_base, w_aligned = w_base.T, w_aligned.T
    return patched_b(dense_c(w_base, w_aligned), lora_b)


@pytest.mark.parametrize(("name", "adapter_name"), CASES, ids=IDS)
def test_exactly_the_saved_modules_are_projected_by_the_float64_formula(variant_cases, name: str,  # type: ignore[no-untyped-def]
                                                                      adapter_name: str) -> None:
    case, out, report = patched_dir(variant_cases, name, adapter_name)
    before, _ = read_adapter(case.subfolder(adapter_name))
    after, _ = read_adapter(out)
    assert {r["module"] for r in report["layers"]} == saved_modules(before)
    assert all(r["selected"] for r in report["layers"]), "every layer has V ≠ 0 and ΔW ≠ 0"
    for row in report["layers"]:
        key = b_key(before, row["module"])
        expected = expected_b(case, row["module"], before[key])
        torch.testing.assert_close(after[key].double(), expected, rtol=1e-4, atol=1e-6)
        assert not torch.equal(after[key], before[key])


@pytest.mark.parametrize(("name", "adapter_name"), CASES, ids=IDS)
def test_only_b_and_dora_magnitudes_change(variant_cases, name: str, adapter_name: str) -> None:  # type: ignore[no-untyped-def]
    case, out, _ = patched_dir(variant_cases, name, adapter_name)
    before, _ = read_adapter(case.subfolder(adapter_name))
    after, _ = read_adapter(out)
    assert after.keys() == before.keys()
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and after[key].shape == tensor.shape
        if not key.endswith((".lora_B.weight", ".lora_embedding_B", ".lora_magnitude_vector")):
            assert torch.equal(after[key], tensor), key


@pytest.mark.parametrize(("name", "adapter_name"), CASES, ids=IDS)
def test_reported_scaling_is_the_one_peft_uses(variant_cases, name: str, adapter_name: str) -> None:  # type: ignore[no-untyped-def]
    case, _, report = patched_dir(variant_cases, name, adapter_name)
    peft_scalings = case.scalings[adapter_name]
    for row in report["layers"]:
        assert row["scaling"] == pytest.approx(peft_scalings[row["module"]]), row["module"]


@pytest.mark.parametrize(("name", "adapter_name"), CASES, ids=IDS)
def test_patched_adapter_loads_back_in_peft_with_no_key_problems(variant_cases, name: str,  # type: ignore[no-untyped-def]
                                                                 adapter_name: str) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    case, out, _ = patched_dir(variant_cases, name, adapter_name)
    root = out.parent if adapter_name != "default" else out
    kwargs = {"subfolder": adapter_name} if adapter_name != "default" else {}
    model = PeftModel.from_pretrained(case.load_aligned(), root, **kwargs)
    load = model.load_adapter(root, adapter_name="check", **kwargs)
    assert load.missing_keys == []
    assert load.unexpected_keys == []
    written, _ = read_adapter(out)
    loaded = get_peft_model_state_dict(model, adapter_name="check")
    lora_keys = [k for k in written if ".lora_" in k]
    assert lora_keys and all(torch.equal(loaded[k], written[k]) for k in lora_keys)
