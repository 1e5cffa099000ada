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
