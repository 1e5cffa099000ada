"""LoRA variants and checkpoint naming: DoRA semantics, untouched tensors, which modules are
patched, named adapters, name candidates, --key-map and the refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import read_adapter, run_cli, tree_digest
from safetensors.torch import load_file, save_file
from test_models import expected_b, patched_dir

from safelora_cli.adapter import _pattern_value
from safelora_cli.errors import PairingError
from safelora_cli.naming import name_candidates, resolve_key
from safelora_cli.report import REPORT_NAME


def cli_args(case: Any, *extra: object) -> list[object]:
    return ["--base", case.base, "--aligned", case.aligned, "--adapter", case.adapter, "--device", "cpu", *extra]


def modules_of(report: dict[str, Any]) -> set[str]:
    return {r["module"] for r in report["layers"]}


# --- DoRA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dora", "dora-embedding"])
def test_projected_dora_layer_applies_exactly_w_aligned_plus_s_cba_in_peft(variant_cases, name: str) -> None:  # type: ignore[no-untyped-def]
    """The documented semantics, as PEFT computes it: m is reset so the layer is W_aligned + s·(C·B)·A."""
    from peft import PeftModel

    case, out, report = patched_dir(variant_cases, name, "default")
    before, _ = read_adapter(case.adapter)
    merged = PeftModel.from_pretrained(case.load_aligned(), out).merge_and_unload()
    for row in report["layers"]:
        module, prefix = row["module"], f"base_model.model.{row['module']}"
        embedding = module in case.transposed
        a = before[f"{prefix}.lora_embedding_A" if embedding else f"{prefix}.lora_A.weight"].double()
        b = before[f"{prefix}.lora_embedding_B" if embedding else f"{prefix}.lora_B.weight"]
        update = row["scaling"] * (expected_b(case, module, b) @ a)
        expected = case.aligned_weights[f"{module}.weight"].double() + (update.T if embedding else update)
        torch.testing.assert_close(merged.get_submodule(module).weight.double(), expected, rtol=1e-5, atol=1e-5)


def test_dora_magnitudes_of_unprojected_layers_are_kept(variant_cases) -> None:  # type: ignore[no-untyped-def]
    case = variant_cases.case("dora")
    out, report = variant_cases.patched("dora", "--top-k", "1")
    before, _ = read_adapter(case.adapter)
    after, _ = read_adapter(out)
    projected = {r["module"] for r in report["layers"] if r["selected"]}
    assert len(projected) == 1
    for row in report["layers"]:
        key = f"base_model.model.{row['module']}.lora_magnitude_vector"
        assert torch.equal(after[key], before[key]) != (row["module"] in projected), row["module"]


# --- tensors that are not B·A -------------------------------------------------------------------

def test_lora_bias_is_left_untouched_and_reported(variant_cases) -> None:  # type: ignore[no-untyped-def]
    case, out, report = patched_dir(variant_cases, "lora-bias", "default")
    before, _ = read_adapter(case.adapter)
    biases = sorted(k for k in before if k.endswith(".lora_B.bias"))
    assert len(biases) == 2 and report["untouched_tensors"] == biases
    after, _ = read_adapter(out)
    assert all(torch.equal(after[k], before[k]) for k in biases)


def test_modules_to_save_are_copied_and_not_patched(variant_cases) -> None:  # type: ignore[no-untyped-def]
    _, _, report = patched_dir(variant_cases, "modules-to-save", "default")
    assert "base_model.model.lm_head.weight" in report["untouched_tensors"]
    assert all("lm_head" not in m for m in modules_of(report))


def test_embedding_base_layer_copies_are_untouched(variant_cases) -> None:  # type: ignore[no-untyped-def]
    _, _, report = patched_dir(variant_cases, "embedding", "default")
    assert report["untouched_tensors"] == ["base_model.model.model.embed_tokens.base_layer.weight"]


# --- which modules: exactly those saved --------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("layers-to-transform", {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}),
        ("regex-exclude", {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                           "model.layers.1.mlp.up_proj"}),
        ("all-linear", {f"model.layers.{i}.{m}" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}),
    ],
)
def test_config_selectors_patch_exactly_the_modules_peft_adapted(variant_cases, name: str, expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    _, _, report = patched_dir(variant_cases, name, "default")
    assert modules_of(report) == expected


def test_rank_pattern_ranks_come_from_the_tensors(variant_cases) -> None:  # type: ignore[no-untyped-def]
    _, _, report = patched_dir(variant_cases, "patterns", "default")
    ranks = {r["module"]: r["rank"] for r in report["layers"]}
    assert ranks["model.layers.0.self_attn.v_proj"] == 2
    assert ranks["model.layers.1.mlp.up_proj"] == 6
    assert ranks["model.layers.0.mlp.up_proj"] == 4


@pytest.mark.parametrize(
    ("patterns", "module"),
    [
        ({"q_proj": 1, "layers.0.self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj"),  # first match wins
        ({"layers.0.self_attn.q_proj": 2, "q_proj": 1}, "model.layers.0.self_attn.q_proj"),
        ({"proj": 1}, "model.layers.0.self_attn.q_proj"),  # must match whole components
        ({r"layers\.1\..*": 3}, "model.layers.1.mlp.up_proj"),
        ({"up_proj": 3}, "model.layers.1.mlp.up_proj.extra"),
    ],
)
def test_pattern_rule_is_pefts(patterns: dict[str, int], module: str) -> None:
    from peft.utils.other import get_pattern_key

    peft_value = patterns.get(get_pattern_key(list(patterns), module), -1)
    assert _pattern_value(patterns, module, -1) == peft_value


# --- model-specific names -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "module", "weight_key"),
    [
        ("llava", "model.language_model.layers.0.self_attn.q_proj",
         "language_model.model.layers.0.self_attn.q_proj.weight"),
        ("llava", "model.vision_tower.encoder.layers.0.self_attn.v_proj",
         "vision_tower.encoder.layers.0.self_attn.v_proj.weight"),
        ("llava", "lm_head", "language_model.lm_head.weight"),
        ("qwen2-vl", "model.language_model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.v_proj.weight"),
        ("gemma-tied-lm-head", "lm_head", "model.embed_tokens.weight"),
        ("tied-embedding-llama", "lm_head", "model.embed_tokens.weight"),
        ("gpt2-conv1d", "transformer.h.1.mlp.c_proj", "transformer.h.1.mlp.c_proj.weight"),
    ],
)
def test_checkpoint_names_differing_from_module_names_are_found(variant_cases, name: str, module: str,  # type: ignore[no-untyped-def]
                                                                weight_key: str) -> None:
    _, _, report = patched_dir(variant_cases, name, "default")
    assert {r["module"]: r["weight_key"] for r in report["layers"]}[module] == weight_key


def rename_checkpoint(src: Path, dst: Path, rename: Any) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_gpt2_checkpoint_without_transformer_prefix(variant_cases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Older GPT-2 saves have `h.0.attn.c_attn.weight`; the adapter says `transformer.h.0.attn.c_attn`."""
    case = variant_cases.case("gpt2-conv1d")
    strip = lambda k: k.removeprefix("transformer.")  # noqa: E731
    base, aligned = (rename_checkpoint(p, tmp_path / p.name, strip) for p in (case.base, case.aligned))
    out = tmp_path / "out"
    result = run_cli("patch", "--base", base, "--aligned", aligned, "--adapter", case.adapter, "--out", out,
                     "--device", "cpu", "--threshold", "1", "--quiet")
    assert result.exit_code == 0, result.stderr
    reference_out, _ = variant_cases.patched("gpt2-conv1d")
    assert read_adapter(out)[0].keys() == read_adapter(reference_out)[0].keys()
    assert all(torch.equal(v, read_adapter(reference_out)[0][k]) for k, v in read_adapter(out)[0].items())


def test_key_map_renames_modules_before_lookup(variant_cases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    case = variant_cases.case("llama")
    rename = lambda k: re.sub(r"^model\.", "backbone.", k)  # noqa: E731
    base, aligned = (rename_checkpoint(p, tmp_path / p.name, rename) for p in (case.base, case.aligned))
    args = ["--base", base, "--aligned", aligned, "--adapter", case.adapter, "--device", "cpu", "--threshold", "1"]
    failed = run_cli("inspect", *args)
    assert failed.exit_code == 1
    assert "names tried for model.layers.0.self_attn.q_proj: model.layers.0.self_attn.q_proj.weight, " \
           "layers.0.self_attn.q_proj.weight" in failed.stderr
    mapped = run_cli("inspect", *args, "--format", "json", "--key-map", r"^model\.=backbone.")
    assert mapped.exit_code == 0, mapped.stderr
    layers = json.loads(mapped.stdout)["layers"]
    assert layers[0]["weight_key"] == "backbone.layers.0.self_attn.q_proj.weight"
    _, reference = variant_cases.patched("llama")
    assert [r["cosine"] for r in layers] == [r["cosine"] for r in reference["layers"]]


def test_name_candidates_order() -> None:
    assert name_candidates("model.language_model.layers.0.q_proj") == [
        "model.language_model.layers.0.q_proj.weight",
        "language_model.model.layers.0.q_proj.weight",
        "model.layers.0.q_proj.weight",
        "language_model.layers.0.q_proj.weight",
    ]
    assert name_candidates("transformer.h.0.attn.c_attn") == ["transformer.h.0.attn.c_attn.weight",
                                                              "h.0.attn.c_attn.weight"]


def test_two_present_candidates_are_ambiguous(tmp_path: Path) -> None:
    keys = {"transformer.h.0.attn.c_attn.weight", "h.0.attn.c_attn.weight"}
    with pytest.raises(PairingError, match=r"ambiguous in the base model: it holds transformer\.h\.0.*h\.0\.attn"):
        resolve_key("transformer.h.0.attn.c_attn", keys, tmp_path, "base")


def test_base_and_aligned_in_different_layouts_is_an_error() -> None:
    from test_pairing import make_adapter, make_checkpoint

    from safelora_cli.pairing import pair_layers

    adapter = make_adapter({"transformer.h.0.attn.c_attn": (8, 6, 2)})
    base = make_checkpoint("base", {"transformer.h.0.attn.c_attn.weight": (8, 6)})
    aligned = make_checkpoint("aligned", {"h.0.attn.c_attn.weight": (8, 6)})
    with pytest.raises(PairingError, match="stored as transformer.h.0.attn.c_attn.weight in the base model but "
                                           "as h.0.attn.c_attn.weight in the aligned"):
        pair_layers(adapter, base, aligned)


@pytest.mark.parametrize(("config", "found"), [(None, None), ({"tie_word_embeddings": False}, None),
                                               ({"tie_word_embeddings": True}, "model.embed_tokens.weight"),
                                               ({"text_config": {"tie_word_embeddings": True}},
                                                "model.embed_tokens.weight")])
def test_lm_head_uses_the_embedding_only_when_the_config_ties_them(tmp_path: Path, config: Any, found: Any) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    resolution = resolve_key("lm_head", {"model.embed_tokens.weight"}, tmp_path, "base")
    assert resolution.key == found


# --- named adapters -----------------------------------------------------------------------------

def test_directory_of_named_adapters_lists_them(variant_cases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    case = variant_cases.case("two-named")
    result = run_cli("patch", *cli_args(case), "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "holds the named adapters first, second" in result.stderr and "--adapter-name" in result.stderr
    unknown = run_cli("patch", *cli_args(case, "--adapter-name", "third"), "--out", tmp_path / "out")
    assert unknown.exit_code == 1 and "no adapter named 'third'; found: first, second" in unknown.stderr
    assert not (tmp_path / "out").exists()


def test_named_adapter_output_mirrors_the_input_layout(variant_cases) -> None:  # type: ignore[no-untyped-def]
    case = variant_cases.case("two-named")
    before = tree_digest(case.adapter)
    out, report = variant_cases.patched("two-named", "--adapter-name", "second")
    after = tree_digest(out)
    assert after.keys() == before.keys() | {REPORT_NAME}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"second/adapter_model.safetensors", "README.md"}  # README: the Safe LoRA section
    assert report["settings"]["adapter_name"] == "second"
    assert tree_digest(case.adapter) == before


def test_named_adapter_run_warns_that_the_others_are_not_patched(variant_cases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import safelora_cli

    case = variant_cases.case("two-named")
    result = safelora_cli.patch(base=case.base, aligned=case.aligned, adapter=case.adapter, adapter_name="second",
                                out=tmp_path / "out", device="cpu")
    assert any("only 'second' is patched" in w and "first" in w for w in result.warnings)


# --- refusals and broken adapters ---------------------------------------------------------------

def copy_adapter(case: Any, tmp_path: Path, **config_changes: Any) -> Any:
    adapter = shutil.copytree(case.adapter, tmp_path / "adapter")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return type(case)(**{**case.__dict__, "adapter": adapter})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target_parameters": ["mlp.experts.gate_up_proj"]},
         "adapts parameters directly (target_parameters: ['mlp.experts.gate_up_proj'])"),
        ({"r": 8}, "has rank 4 but adapter_config.json gives it r = 8 (r / rank_pattern); PEFT could not load"),
        ({"rank_pattern": {"v_proj": 2}}, "v_proj has rank 4 but adapter_config.json gives it r = 2"),
        ({"use_dora": True}, "is a DoRA adapter (use_dora: true) but model.layers.0.self_attn.q_proj has no"),
    ],
)
def test_refused_adapters_say_why(variant_cases, tmp_path: Path, changes: dict[str, Any], message: str) -> None:  # type: ignore[no-untyped-def]
    case = copy_adapter(variant_cases.case("llama"), tmp_path, **changes)
    result = run_cli("patch", *cli_args(case), "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.startswith("Error: ")
    assert not (tmp_path / "out").exists()


def test_tied_embedding_and_lm_head_factors_are_refused(variant_cases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """PEFT's ensure_weight_tying shares factors between the tied embedding and lm_head."""
    from peft import LoraConfig, get_peft_model

    case = variant_cases.case("tied-embedding-llama")
    config = LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"], init_lora_weights=False,
                        ensure_weight_tying=True)
    get_peft_model(case.load_aligned(), config).save_pretrained(tmp_path / "adapter")
    result = run_cli("inspect", *cli_args(type(case)(**{**case.__dict__, "adapter": tmp_path / "adapter"})))
    assert result.exit_code == 1
    assert "ties the LoRA factors of lm_head to those of model.embed_tokens (ensure_weight_tying: true)" \
        in result.stderr


@pytest.mark.parametrize("spec", ["no-equals-sign", "=nothing", "(unclosed=x", r"a=\9"])
def test_malformed_key_map_is_a_usage_error(variant_cases, spec: str) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("inspect", *cli_args(variant_cases.case("llama"), "--key-map", spec))
    assert result.exit_code == 2
    assert f"--key-map {spec!r}" in result.stderr
