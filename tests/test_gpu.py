"""CPU and GPU give the same analysis, the same patched adapter and the same subspace files.

Skipped without a CUDA device. benchmarks/gpu_check.py runs the same comparisons at larger shapes
(and tests/test_gpu_check.py keeps its steps runnable on the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import read_adapter, run_cli, trio_args

import safelora_cli

GPU = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
RULES = [["--threshold", "0.5"], ["--top-k", "3"], ["--projection", "exact", "--rank", "2"]]


def _assert_same_layers(cpu: list[dict], gpu: list[dict]) -> None:  # type: ignore[type-arg]
    assert [r["module"] for r in cpu] == [r["module"] for r in gpu]
    assert [r["selected"] for r in cpu] == [r["selected"] for r in gpu]
    for c, g in zip(cpu, gpu, strict=True):
        if c["cosine"] is None:
            assert g["cosine"] is None
        else:
            assert abs(c["cosine"] - g["cosine"]) < 1e-5, (c["module"], c["cosine"], g["cosine"])
        if c["cosine_error_bound"] is not None:
            assert abs(c["cosine_error_bound"] - g["cosine_error_bound"]) < 1e-5, c["module"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("trio_name", ["llama_trio", "sharded_trio", "demo_trio"])
def test_cpu_and_cuda_agree(trio_name: str, rule: list[str], request: pytest.FixtureRequest) -> None:
    trio: Trio = request.getfixturevalue(trio_name)
    reports = {}
    for device in ("cpu", GPU):
        result = run_cli("inspect", *trio_args(trio), "--device", device, "--format", "json", *rule)
        assert result.exit_code == 0, result.stderr
        reports[device] = json.loads(result.stdout)
    assert reports[GPU]["device"].startswith("cuda")
    _assert_same_layers(reports["cpu"]["layers"], reports[GPU]["layers"])


@pytest.mark.parametrize("rule", [{"top_k": 3}, {"threshold": 0.5, "projection": "exact", "rank": 2}])
def test_patched_adapters_agree(demo_trio: Trio, rule: dict[str, object], tmp_path: Path) -> None:
    """The projected lora_B match (relative Frobenius difference ≤ 1e-4); every other tensor is identical."""
    trio = {"base": demo_trio.base, "aligned": demo_trio.aligned, "adapter": demo_trio.adapter}
    written = {}
    for n, device in enumerate(("cpu", GPU)):
        safelora_cli.patch(**trio, out=tmp_path / f"out-{n}", device=device, **rule)  # type: ignore[arg-type]
        written[device] = read_adapter(tmp_path / f"out-{n}")[0]
    cpu, gpu = written["cpu"], written[GPU]
    assert cpu.keys() == gpu.keys()
    original = read_adapter(demo_trio.adapter)[0]
    changed = [k for k in cpu if not torch.equal(cpu[k], original[k])]
    assert changed and all(".lora_B." in k for k in changed)  # the rule projected some layers
    for key in cpu:
        if ".lora_B." in key:
            diff = torch.linalg.norm((cpu[key] - gpu[key]).double()) / torch.linalg.norm(cpu[key].double())
            assert diff <= 1e-4, key
        else:
            assert torch.equal(cpu[key], gpu[key]), key


@pytest.mark.parametrize("low_rank", [{}, {"rank": 2}])
def test_subspace_files_agree(demo_trio: Trio, low_rank: dict[str, int], tmp_path: Path) -> None:
    """Exact mode: V bit for bit; both modes: `inspect --subspace` on each device agrees within 1e-5."""
    layers = {}
    for n, device in enumerate(("cpu", GPU)):
        out = tmp_path / f"out-{n}"
        safelora_cli.subspace(base=demo_trio.base, aligned=demo_trio.aligned, adapter=demo_trio.adapter, out=out,
                              device=device, **low_rank)  # type: ignore[arg-type]
        layers[device] = safelora_cli.inspect(subspace=out, adapter=demo_trio.adapter, device=device).report["layers"]
    if not low_rank:
        files = [(tmp_path / f"out-{n}" / "model.safetensors").read_bytes() for n in (0, 1)]
        assert files[0] == files[1]
    _assert_same_layers(layers["cpu"], layers[GPU])
