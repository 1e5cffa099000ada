"""The streaming pass: bounded read-ahead, errors from the reader thread, many adapters in one pass."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import Trio, save_llama_pair
from helpers import run_cli, tree_digest

from safelora_cli import checkpoint
from safelora_cli.checkpoint import open_checkpoint
from safelora_cli.errors import InputError
from safelora_cli.prefetch import Prefetcher, weight_bytes


@pytest.fixture(scope="session")
def three_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """Three PEFT adapters of one aligned model, with different targets and ranks."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("multi")
    model = save_llama_pair(root, torch.bfloat16, shard="30KB", seed=11)
    specs = {"qv": (["q_proj", "v_proj"], 4), "mlp": (["up_proj", "down_proj", "o_proj"], 2), "all": ("all-linear", 8)}
    paths = []
    for seed, (name, (targets, r)) in enumerate(specs.items()):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(root / name)
        model = peft_model.unload()
        paths.append(root / name)
    return root / "base", root / "aligned", paths


def test_many_adapters_in_one_pass_equal_single_runs(three_adapters, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, aligned, adapters = three_adapters
    together = tmp_path / "together"
    args = ["--base", base, "--aligned", aligned, "--device", "cpu", "--top-k", "4"]
    result = run_cli("patch", *args, *[x for a in adapters for x in ("--adapter", a)], "--out", together)
    assert result.exit_code == 0, result.stderr
    for adapter in adapters:
        alone = tmp_path / f"alone-{adapter.name}"
        assert run_cli("patch", *args, "--adapter", adapter, "--out", alone).exit_code == 0
        assert tree_digest(together / adapter.name) == tree_digest(alone)


def test_adapters_with_the_same_name_are_refused(three_adapters, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, aligned, adapters = three_adapters
    result = run_cli("patch", "--base", base, "--aligned", aligned, "--adapter", adapters[0],
                     "--adapter", f"{adapters[0]}/", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "end in the same name (qv)" in result.stderr
    assert not (tmp_path / "out").exists()


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch TensorStream.read to count reads; returns the live counter list [reads]."""
    counter = [0]
    original = checkpoint.TensorStream.read

    def read(self, model, key):  # type: ignore[no-untyped-def]
        counter[0] += 1
        return original(self, model, key)

    monkeypatch.setattr(checkpoint.TensorStream, "read", read)
    return counter


@pytest.mark.parametrize(("budget_modules", "held_modules"), [(0, 2), (2, 2), (3, 3)])
def test_read_ahead_is_bounded_in_bytes(budget_modules: int, held_modules: int, sharded_trio: Trio,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """At most the budget is held, and never less than two modules (one read, one computed)."""
    base, aligned = open_checkpoint(sharded_trio.base, "base"), open_checkpoint(sharded_trio.aligned, "aligned")
    keys = sorted(k for k in base.tensors if k.endswith("q_proj.weight"))  # all the same size
    size = weight_bytes((base, aligned), keys[0])
    reads = _counting_reads(monkeypatch)
    held = []
    with Prefetcher(keys, base, aligned, torch.device("cpu"), budget_bytes=budget_modules * size) as items:
        for consumed, _item in enumerate(items):
            time.sleep(0.05)  # a slow consumer: the reader would run away if it could
            held.append(reads[0] // 2 - consumed)  # read and not yet released, this one included
    assert max(held) == held_modules
    assert reads[0] == 2 * len(keys)


def test_every_key_is_read_in_order_under_a_tiny_budget(sharded_trio: Trio) -> None:
    base, aligned = open_checkpoint(sharded_trio.base, "base"), open_checkpoint(sharded_trio.aligned, "aligned")
    keys = sorted(k for k in base.tensors if k.endswith("proj.weight"))
    with Prefetcher(keys, base, aligned, torch.device("cpu"), budget_bytes=1) as items:
        assert [item.key for item in items] == keys


def test_reader_errors_reach_the_caller(sharded_trio: Trio, tmp_path: Path) -> None:
    base = open_checkpoint(sharded_trio.base, "base")
    aligned = open_checkpoint(sharded_trio.aligned, "aligned")
    keys = sorted(k for k in base.tensors if k.endswith("proj.weight"))
    victim = aligned.tensors[keys[-1]].file
    original = victim.read_bytes()
    try:
        victim.write_bytes(b"\x00" * 16)  # damaged after indexing, before reading
        with pytest.raises(InputError, match="not a readable safetensors file"), \
                Prefetcher(keys, base, aligned, torch.device("cpu")) as items:
            for _ in items:
                pass
    finally:
        victim.write_bytes(original)


def test_leaving_early_stops_the_reader(sharded_trio: Trio) -> None:
    base = open_checkpoint(sharded_trio.base, "base")
    aligned = open_checkpoint(sharded_trio.aligned, "aligned")
    keys = [k for k in base.tensors if k.endswith("proj.weight")]
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="consumer failed"), \
            Prefetcher(keys, base, aligned, torch.device("cpu"), budget_bytes=1) as items:
        for _ in items:
            raise RuntimeError("consumer failed")
    assert threading.active_count() == before


def test_help_does_not_import_torch() -> None:
    code = "import sys, safelora_cli.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_json_with_several_adapters_is_a_list_of_their_reports(three_adapters, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    import jsonschema

    from safelora_cli.report import REPORT_NAME, json_schema

    base, aligned, adapters = three_adapters
    out = tmp_path / "out"
    result = run_cli("patch", "--base", base, "--aligned", aligned, "--adapter", adapters[0],
                     "--adapter", adapters[1], "--out", out, "--device", "cpu", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [r["inputs"]["adapter"]["source"] for r in reports] == [str(a) for a in adapters[:2]]
    for report, adapter in zip(reports, adapters[:2], strict=True):
        jsonschema.validate(report, json_schema())
        assert report == json.loads((out / adapter.name / REPORT_NAME).read_text())
