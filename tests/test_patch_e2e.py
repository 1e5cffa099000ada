"""End to end: PEFT writes the adapter, the CLI patches it, PEFT loads the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import read_adapter, run_cli, tree_digest, trio_args
from reference import dense_c, patched_b
from safetensors import safe_open

from safelora_cli.report import REPORT_NAME, SCHEMA_VERSION


def load_weight(model_dir: Path, key: str) -> torch.Tensor:
    index = model_dir / "model.safetensors.index.json"
    file = model_dir / (json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors")
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def patch(trio, out: Path, *extra: object):  # type: ignore[no-untyped-def]
    result = run_cli("patch", *trio_args(trio), "--out", out, "--device", "cpu", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads((out / REPORT_NAME).read_text())


@pytest.mark.parametrize("trio_name", ["llama_trio", "sharded_trio"])
def test_patched_adapter_loads_in_peft_with_no_key_problems(trio_name: str, request, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    trio = request.getfixturevalue(trio_name)
    out = tmp_path / "patched"
    patch(trio, out, "--top-k", "3")
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(trio.aligned), out)
    load = model.load_adapter(out, adapter_name="check")
    assert load.missing_keys == []
    assert load.unexpected_keys == []
    patched, _ = read_adapter(out)
    loaded = {k: v for k, v in model.state_dict().items() if ".check." in k}
    for key, tensor in patched.items():
        in_memory = key.replace(".weight", ".check.weight")
        assert torch.equal(loaded[in_memory], tensor), key


@pytest.mark.parametrize("trio_name", ["llama_trio", "sharded_trio"])
def test_selected_b_is_the_float64_formula_and_the_rest_is_untouched(trio_name: str, request, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    trio = request.getfixturevalue(trio_name)
    out = tmp_path / "patched"
    report = patch(trio, out, "--top-k", "3")
    original, _ = read_adapter(trio.adapter)
    patched, _ = read_adapter(out)
    assert patched.keys() == original.keys()
    selected = {r["module"] for r in report["layers"] if r["selected"]}
    assert len(selected) == 3
    for key, before in original.items():
        after = patched[key]
        assert after.dtype == before.dtype and after.shape == before.shape
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if module in selected and ".lora_B." in key:
            weight = f"{module}.weight"
            c = dense_c(load_weight(trio.base, weight), load_weight(trio.aligned, weight))
            torch.testing.assert_close(after.double(), patched_b(c, before), rtol=1e-4, atol=1e-6)
            assert not torch.equal(after, before)
        else:
            assert torch.equal(after, before), key


def test_other_files_are_copied_byte_for_byte(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "patched"
    patch(llama_trio, out)
    source, copied = tree_digest(llama_trio.adapter), tree_digest(out)
    assert copied.keys() == source.keys() | {REPORT_NAME}
    for name in source.keys() - {"adapter_model.safetensors", "README.md"}:
        assert copied[name] == source[name], name
    # The model card is the input's, followed by the Safe LoRA section.
    body = (llama_trio.adapter / "README.md").read_text().split("---\n", 2)[2]
    assert body.strip() in (out / "README.md").read_text()


def test_inputs_are_never_modified(sharded_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    roots = (sharded_trio.base, sharded_trio.aligned, sharded_trio.adapter)
    before = [tree_digest(r) for r in roots]
    patch(sharded_trio, tmp_path / "patched", "--threshold", "1.0")
    assert run_cli("inspect", *trio_args(sharded_trio), "--format", "json").exit_code == 0
    assert [tree_digest(r) for r in roots] == before


def test_provenance_is_recorded_in_safetensors_metadata(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "patched"
    patch(llama_trio, out, "--threshold", "0.9")
    _, metadata = read_adapter(out)
    assert metadata["format"] == "pt"
    record = json.loads(metadata["safelora"])
    assert record["settings"]["selection"] == {"rule": "threshold", "threshold": 0.9}
    assert record["adapter"] == str(llama_trio.adapter)
    assert record["tool"].startswith("safelora-cli ")


def test_report_has_every_layer_and_field(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = patch(llama_trio, tmp_path / "patched")
    assert report["schema_version"] == SCHEMA_VERSION
    assert report["command"] == "patch"
    assert len(report["layers"]) == 3 * 2  # 3 layers × q/v
    row = report["layers"][0]
    for field in ("module", "layer_index", "cosine", "selected", "v_norm", "delta_norm", "residual_norm"):
        assert field in row
    assert report["summary"]["selected"] == sum(r["selected"] for r in report["layers"])
    assert 0.0 < report["summary"]["pdst"] <= 1.0


def test_two_runs_give_identical_bytes(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    patch(llama_trio, tmp_path / "one")
    patch(llama_trio, tmp_path / "two")
    one, two = tree_digest(tmp_path / "one"), tree_digest(tmp_path / "two")
    assert one.keys() == two.keys()
    assert one["adapter_model.safetensors"] == two["adapter_model.safetensors"]


def test_demo_trio_projects_the_unaligned_layers(demo_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The demo's odd layers update outside V's span (low cosine), even layers inside it."""
    report = patch(demo_trio, tmp_path / "patched")
    for row in report["layers"]:
        assert row["selected"] == (row["layer_index"] % 2 == 1), row


def test_force_replaces_an_earlier_patched_adapter(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "patched"
    patch(llama_trio, out)
    patch(llama_trio, out, "--force", "--threshold", "0.9")
    assert json.loads((out / REPORT_NAME).read_text())["settings"]["selection"]["threshold"] == 0.9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_replaces_an_empty_directory(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "patched"
    out.mkdir()
    patch(llama_trio, out, "--force")
    assert (out / "adapter_model.safetensors").is_file()


def test_force_refuses_a_patched_adapter_that_was_added_to(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "patched"
    patch(llama_trio, out)
    (out / "merged-notes.txt").write_text("added later")
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--force")
    assert result.exit_code == 1 and "files added since" in result.stderr
    assert (out / "merged-notes.txt").read_text() == "added later"


def test_force_refuses_a_forged_report(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "safelora_report.json").write_text(json.dumps({"command": "patch", "tool": {"name": "safelora-cli"}}))
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--force")
    assert result.exit_code == 1 and (out / "thesis.tex").read_text() == "years of work"


def test_force_refuses_a_directory_it_did_not_write(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--force")
    assert result.exit_code == 1
    assert "is not a patched adapter left as safelora patch wrote it" in result.stderr
    assert (out / "notes.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_json_flag_prints_only_the_report_on_stdout(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "patched"
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads((out / REPORT_NAME).read_text())


def test_outputs_get_ordinary_permissions_not_the_private_staging_ones(llama_trio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The output is staged in a private temporary directory; after the rename it must be like any new one."""
    out, report_md = tmp_path / "patched", tmp_path / "report.md"
    patch(llama_trio, out, "--report-md", report_md)
    reference = tmp_path / "reference"
    reference.mkdir()
    assert out.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    plain_file = (llama_trio.adapter / "adapter_config.json").stat().st_mode & 0o777
    for written in [report_md, *sorted(p for p in out.iterdir() if p.is_file())]:
        assert written.stat().st_mode & 0o777 == plain_file, written.name
