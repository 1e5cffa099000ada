"""CPU and GPU give the same analysis (cosines within 1e-5, the same selection)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Trio
from helpers import run_cli, trio_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("rule", [["--threshold", "0.5"], ["--top-k", "3"], ["--projection", "exact", "--rank", "2"]])
@pytest.mark.parametrize("trio_name", ["llama_trio", "sharded_trio", "demo_trio"])
def test_cpu_and_cuda_agree(trio_name: str, rule: list[str], request: pytest.FixtureRequest) -> None:
    trio: Trio = request.getfixturevalue(trio_name)
    reports = {}
    for device in ("cpu", "cuda"):
        result = run_cli("inspect", *trio_args(trio), "--device", device, "--format", "json", *rule)
        assert result.exit_code == 0, result.stderr
        reports[device] = json.loads(result.stdout)
    cpu, gpu = reports["cpu"]["layers"], reports["cuda"]["layers"]
    assert reports["cuda"]["device"].startswith("cuda")
    assert [r["module"] for r in cpu] == [r["module"] for r in gpu]
    assert [r["selected"] for r in cpu] == [r["selected"] for r in gpu]
    for c, g in zip(cpu, gpu, strict=True):
        if c["cosine"] is None:
            assert g["cosine"] is None
        else:
            assert abs(c["cosine"] - g["cosine"]) < 1e-5, (c["module"], c["cosine"], g["cosine"])
