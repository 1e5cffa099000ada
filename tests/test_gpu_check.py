"""benchmarks/gpu_check.py stays runnable without a GPU: its comparison steps run against the current
API on the CPU, and its checks see the differences they are there to catch.

The script is meant to run once, on a lent GPU machine, with no time to fix it there; an API change
that breaks it must fail here first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import Trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_render  # noqa: E402
import gpu_steps  # noqa: E402


def _layer(module: str, cosine: float | None, selected: bool, bound: float | None = None) -> dict[str, object]:
    return {"module": module, "cosine": cosine, "selected": selected, "cosine_error_bound": bound}


def _report(*layers: dict[str, object]) -> dict[str, object]:
    return {"device": "cpu", "layers": list(layers)}


def test_patch_agreement_step_runs_and_passes_on_the_cpu(demo_trio: Trio, tmp_path: Path) -> None:
    found = gpu_steps.agreement(demo_trio.base.parent, tmp_path, ("cpu", "cpu"), 1e-5, 1e-4)
    assert set(found) == set(gpu_steps.RULES)
    for name, r in found.items():
        assert r["ok"], (name, r)
        assert r["layers"] == 8 and r["same_tensor_keys"] and r["other_tensors_identical"]
    assert found["top-k 5"]["selected"] == 5


def test_subspace_agreement_step_runs_and_passes_on_the_cpu(demo_trio: Trio, tmp_path: Path) -> None:
    found = gpu_steps.subspace_agreement(demo_trio.base.parent, tmp_path, ("cpu", "cpu"), 1e-5)
    assert set(found) == {"exact", "rank 8"}
    assert all(r["ok"] and r["same_selection"] for r in found.values()), found
    assert found["exact"]["tensors_identical"] and found["exact"]["file_bytes_identical"]
    assert found["rank 8"]["file_mb"] < found["exact"]["file_mb"]


def test_compare_layers_sees_cosine_bound_and_selection_differences() -> None:
    first = _report(_layer("a", 0.3, True, 0.01), _layer("b", 0.9, False, 0.02), _layer("c", None, False))
    same = gpu_steps._compare_layers(first, first)
    assert same["max_cosine_diff"] == 0 and same["same_selection"] and not same["undefined_mismatch"]
    other = _report(_layer("a", 0.3 + 2e-5, True, 0.01), _layer("b", 0.9, True, 0.02 + 3e-5), _layer("c", 0.1, False))
    found = gpu_steps._compare_layers(first, other)
    assert found["max_cosine_diff"] == pytest.approx(2e-5)
    assert found["max_bound_diff"] == pytest.approx(3e-5)
    assert not found["same_selection"] and found["undefined_mismatch"] == 1


def test_same_bytes_sees_one_bit_and_signed_zeros() -> None:
    x = torch.randn(4, 3)
    assert gpu_steps._same_bytes({"w": x}, {"w": x.clone()})
    flipped = x.clone()
    flipped.view(torch.int32)[1, 2] ^= 1
    assert not gpu_steps._same_bytes({"w": x}, {"w": flipped})
    assert not gpu_steps._same_bytes({"w": torch.zeros(2)}, {"w": -torch.zeros(2)})  # torch.equal calls these equal
    assert not gpu_steps._same_bytes({"w": x}, {"v": x})


def _row(wall: float) -> dict[str, float]:
    return {"runs": 1, "wall_s_median": wall, "wall_s_min": wall, "wall_s_max": wall, "peak_rss_gb_median": 1.0,
            "peak_anon_gb_median": 0.5, "peak_anon_gb_max": 0.5}


def test_markdown_states_targets_met_or_missed_and_a_failed_agreement() -> None:
    result = {
        "rehearse": False, "device": "cuda", "repeat": 1, "steps": ["speed"], "generated": {}, "skipped": [],
        "environment": {"torch": "x", "safelora_cli": "y", "gpu": "Some GPU", "gpu_memory_gb": 1, "capability": "9.0"},
        "machine": {"nproc": "1", "cpu": "c", "ram": "1 GiB"}, "date": "d", "total_s": 1.0, "agreement_ok": False,
        "trios": {"speed": "the speed trio", "agree": "the small trio"}, "agreement_devices": ["cpu", "cuda"],
        "agreement": {"top-k 5": {"layers": 4, "selected": 2, "max_cosine_diff": 3e-5, "same_selection": True,
                                  "same_tensor_keys": True, "max_rel_b_diff": 0.0, "other_tensors_identical": True,
                                  "seconds": [1.0, 1.0], "ok": False}},
        "extra": {"needed_gb": 1.0, "model_gb": 1.0},
        "rows": {"a warm": _row(10.0), "b warm": _row(13.0), "a cold": _row(20.0), "b cold": _row(20.5)},
    }
    text = gpu_render.markdown(result)
    assert "(b)/(a) wall time, warm: 1.30× (target ≤ 1.25×: missed)" in text
    assert "(b)/(a) wall time, cold: 1.02× (target ≤ 1.05×: met)" in text
    assert "| top-k 5 | 4 | 2 | 3.0e-05 | yes | 0.0e+00 | yes | 1.00 / 1.00 | **no** |" in text
    assert text.rstrip().endswith("CPU vs cuda): **FAILED**.")
