"""The demo generator: single-file and sharded trios hold the same model."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_cli

from safelora_cli.demo import TINY, write_adapter, write_models


def test_sharded_demo_models_match_the_single_file_ones(tmp_path: Path) -> None:
    reports = []
    for name, per_shard in (("single", None), ("sharded", 1)):
        root = tmp_path / name
        bases = write_models(root, TINY, layers_per_shard=per_shard)
        write_adapter(root / "adapter", TINY, bases)
        result = run_cli("inspect", "--base", root / "base", "--aligned", root / "aligned",
                         "--adapter", root / "adapter", "--format", "json", "--device", "cpu")
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads(result.stdout)["layers"])
    assert len(list((tmp_path / "sharded" / "base").glob("model-*-of-*.safetensors"))) == TINY.layers
    assert reports[0] == reports[1]


def test_demo_command_writes_a_trio_that_patches_without_aligned(tmp_path: Path) -> None:
    """The adapter's config names the aligned model where the demo put it, not where it was built."""
    demo = tmp_path / "demo"
    assert run_cli("demo", demo).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging left beside it
    result = run_cli("patch", "--base", demo / "base", "--adapter", demo / "adapter", "--out", demo / "patched", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
