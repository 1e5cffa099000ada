"""Reports people and machines read: JSON Schema, Markdown (file and model card), plot."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import Trio
from helpers import run_cli, tree_digest, trio_args
from safetensors.torch import load_file, save_file

from safelora_cli.card import CARD_BEGIN, CARD_END
from safelora_cli.markdown import to_markdown
from safelora_cli.report import REPORT_NAME, SCHEMA_VERSION, json_schema

V_ZERO = "model.layers.0.self_attn.q_proj"
DW_ZERO = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def degenerate_trio(llama_trio: Trio, tmp_path_factory: pytest.TempPathFactory) -> Trio:
    """llama_trio with V = 0 in one layer (aligned = base there) and B = 0 in another, and no model card."""
    root = tmp_path_factory.mktemp("degenerate")
    trio = Trio(*(Path(shutil.copytree(p, root / p.name)) for p in (llama_trio.base, llama_trio.aligned,
                                                                    llama_trio.adapter)))
    base = load_file(str(trio.base / "model.safetensors"))
    aligned = load_file(str(trio.aligned / "model.safetensors"))
    aligned[f"{V_ZERO}.weight"] = base[f"{V_ZERO}.weight"].clone()
    save_file(aligned, str(trio.aligned / "model.safetensors"), metadata={"format": "pt"})
    adapter = load_file(str(trio.adapter / "adapter_model.safetensors"))
    key = f"base_model.model.{DW_ZERO}.lora_B.weight"
    adapter[key] = torch.zeros_like(adapter[key])
    save_file(adapter, str(trio.adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (trio.adapter / "README.md").unlink()
    return trio


def validate(report: dict) -> None:  # type: ignore[type-arg]
    jsonschema.Draft202012Validator(json_schema()).validate(report)


def test_schema_is_itself_valid_and_names_the_version() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION


@pytest.mark.parametrize("extra", [[], ["--top-k", "4", "--max-selected", "1"],
                                   ["--projection", "exact", "--rank", "2", "--fail-below", "0.9"]])
def test_patch_reports_match_the_schema(extra: list[str], llama_trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--device", "cpu", *extra)
    assert result.exit_code in (0, 3), result.stderr
    validate(json.loads((out / REPORT_NAME).read_text()))


def test_inspect_report_with_degenerate_layers_matches_the_schema(degenerate_trio: Trio) -> None:
    result = run_cli("inspect", *trio_args(degenerate_trio), "--device", "cpu", "--format", "json",
                     "--threshold", "1", "--fail-below", "0.1")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    validate(report)
    undefined = {r["module"]: r for r in report["layers"] if r["cosine"] is None}
    assert set(undefined) == {V_ZERO, DW_ZERO}
    assert undefined[V_ZERO]["b_distance"] is None and not undefined[V_ZERO]["selected"]


def test_schema_rejects_what_it_should(llama_trio: Trio) -> None:
    """The schema is not a rubber stamp: a wrong type, a stray field and a missing one all fail."""
    report = json.loads(run_cli("inspect", *trio_args(llama_trio), "--format", "json").stdout)
    for broken in ({**report, "schema_version": 2}, {**report, "extra": 1},
                   {k: v for k, v in report.items() if k != "gates"},
                   {**report, "layers": [{**report["layers"][0], "cosine": "0.5"}]},
                   {**report, "layers": [{**report["layers"][0], "cosine": None}]}):  # undefined needs a reason
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_report_md_file_is_the_markdown_rendering(llama_trio: Trio, tmp_path: Path) -> None:
    md = tmp_path / "reports" / "safelora.md"  # parents are created
    out = tmp_path / "out"
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--device", "cpu", "--report-md", md,
                     "--max-selected", "0")
    assert result.exit_code == 3
    report = json.loads((out / REPORT_NAME).read_text())
    text = md.read_text()
    assert text == to_markdown(report)
    selected = report["summary"]["selected"]
    assert selected > 0
    assert f"| --max-selected | 0 | {selected} | **FAILED** |" in text
    for row in report["layers"]:
        assert f"`{row['module']}`" in text
    assert f"| base | `{llama_trio.base}` | — |" in text


def test_markdown_shows_revisions_and_undefined_reasons() -> None:
    row = {"module": "m.layers.0.q_proj", "layer_index": 0, "rank": 4, "cosine": None, "selected": False,
           "update_retained": 1.0, "alignment_cosine": None,
           "undefined_reason": "the LoRA update is zero", "v_norm": 1.0, "delta_norm": 0.0, "residual_norm": 0.0}
    report = {
        "command": "inspect", "tool": {"version": "9"}, "device": "cpu", "gates": [], "skipped_files": [],
        "settings": {"selection": {"rule": "top-k", "top_k": 3},
                     "projection": {"kind": "exact", "rank": 2, "energy": None, "svd": "auto"}},
        "inputs": {"base": {"source": "org/base", "path": "/c", "revision": "abc123"},
                   "aligned": {"source": "a|b", "path": "/d"}, "adapter": {"source": "x", "path": "/e"}},
        "summary": {"layers": 1, "selected": 0, "undefined": 1, "cosine_min": None, "cosine_median": None,
                    "cosine_max": None, "update_retained_min": None, "update_retained_max": None,
                    "threshold_sweep": [{"threshold": 0.5, "selected": 0}], "pdst": None},
        "layers": [row],
    }
    text = to_markdown(report)
    assert "| base | `org/base` | `abc123` |" in text
    assert r"| aligned | `a\|b` | — |" in text  # a pipe cannot break the table
    assert "undefined (the LoRA update is zero)" in text
    assert "top-k, select the 3 lowest cosines" in text and "rank 2" in text
    assert "No gates were set." in text


def test_model_card_gets_a_section_and_the_input_card_is_untouched(llama_trio: Trio, tmp_path: Path) -> None:
    before = (llama_trio.adapter / "README.md").read_bytes()
    out = tmp_path / "out"
    assert run_cli("patch", *trio_args(llama_trio), "--out", out, "--device", "cpu").exit_code == 0
    card = (out / "README.md").read_text()
    report = json.loads((out / REPORT_NAME).read_text())
    front, body = before.decode().split("---\n", 2)[1:]
    # The card is published: the front matter names the aligned model by its directory name, not a path.
    assert card.startswith(f"---\nbase_model: {llama_trio.aligned.name}\n")
    assert "base_model_relation: adapter\n" in card and "- safe-lora\n" in card
    assert str(llama_trio.aligned) not in card and str(llama_trio.base) not in card
    # Every other line of the input's front matter is kept, then its body, then our section.
    kept = [line for line in front.splitlines() if not line.startswith("base_model")]
    assert all(line in card.split("---\n", 2)[1].splitlines() for line in kept)
    assert card.endswith(body.strip() + f"\n\n{CARD_BEGIN}\n{to_markdown(report, public=True)}{CARD_END}\n")
    assert (llama_trio.adapter / "README.md").read_bytes() == before


def test_model_card_is_created_when_absent_and_replaced_when_repatched(degenerate_trio: Trio, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli("patch", *trio_args(degenerate_trio), "--out", first, "--device", "cpu").exit_code == 0
    card = (first / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {degenerate_trio.aligned.name}\nbase_model_relation: adapter\n"
                           "library_name: peft\n")
    assert f"# {degenerate_trio.adapter.name}, patched with Safe LoRA" in card
    assert card.count("## Safe LoRA") == 1
    result = run_cli("patch", "--base", degenerate_trio.base, "--aligned", degenerate_trio.aligned,
                     "--adapter", first, "--out", second, "--device", "cpu", "--threshold", "0.9")
    assert result.exit_code == 0, result.stderr
    again = (second / "README.md").read_text()
    assert again.count("## Safe LoRA") == 1 and again.count(CARD_BEGIN) == 1
    assert "cosine ≤ 0.9" in again and "cosine ≤ 0.5" not in again


def test_plot_is_a_png_and_deterministic(degenerate_trio: Trio, tmp_path: Path) -> None:
    pngs = [tmp_path / "one.png", tmp_path / "two.png"]
    for png in pngs:
        result = run_cli("inspect", *trio_args(degenerate_trio), "--device", "cpu", "--plot", png, "--quiet",
                         "--format", "json")
        assert result.exit_code == 0, result.stderr
    data = pngs[0].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert pngs[1].read_bytes() == data


def test_plot_draws_each_module_type_threshold_selection_and_undefined(degenerate_trio: Trio) -> None:
    """Inspect the figure's artists rather than pixels: what the reader is meant to see is there."""
    import matplotlib.pyplot as plt

    from safelora_cli import plot

    report = json.loads(run_cli("inspect", *trio_args(degenerate_trio), "--format", "json").stdout)
    drawn: list = []  # type: ignore[type-arg]
    original = plt.close
    plt.close = lambda fig=None: drawn.append(fig)  # type: ignore[assignment]
    try:
        plot.render_png(report)
    finally:
        plt.close = original  # type: ignore[assignment]
    fig = drawn[0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    selected = report["summary"]["selected"]
    assert labels == ["q_proj", "v_proj", f"selected ({selected})", "undefined cosine (2)",
                      "threshold τ = 0.5 (select cosine ≤ τ)"]
    original(fig)


def test_missing_matplotlib_is_a_one_line_usage_error_before_any_work(llama_trio: Trio, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out = tmp_path / "out"
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--plot", tmp_path / "p.png")
    assert result.exit_code == 2
    assert result.stderr == ("Error: --plot needs matplotlib, which is not installed. Install the plot extra: "
                             "pip install 'safelora-cli[plot]' (or pip install matplotlib).\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--report-md", "--plot"])
def test_side_file_inside_an_input_is_refused(option: str, llama_trio: Trio, tmp_path: Path) -> None:
    before = tree_digest(llama_trio.adapter)
    result = run_cli("inspect", *trio_args(llama_trio), option, llama_trio.adapter / "x.out")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {option} {llama_trio.adapter / 'x.out'} lies inside the adapter")
    assert tree_digest(llama_trio.adapter) == before


@pytest.mark.parametrize(("case", "extra"), [("gpt2-conv1d", ()), ("embedding", ()), ("dora", ()),
                                             ("two-named", ("--adapter-name", "second")), ("patterns", ())])
def test_variant_reports_match_the_schema(case: str, extra: tuple[str, ...], variant_cases) -> None:  # type: ignore[no-untyped-def]
    _, report = variant_cases.patched(case, *extra)
    validate(report)


def test_alignment_cosine_and_update_retained_match_the_tensors(demo_trio: Trio) -> None:
    from reference import alignment_cosine, dense_c

    report = json.loads(run_cli("inspect", *trio_args(demo_trio), "--json").stdout)
    base = load_file(str(demo_trio.base / "model.safetensors"))
    aligned = load_file(str(demo_trio.aligned / "model.safetensors"))
    lora = load_file(str(demo_trio.adapter / "adapter_model.safetensors"))
    signs = []
    for row in report["layers"]:
        a = lora[f"base_model.model.{row['module']}.lora_A.weight"]
        b = lora[f"base_model.model.{row['module']}.lora_B.weight"]
        key = row["weight_key"]
        assert row["alignment_cosine"] == pytest.approx(alignment_cosine(base[key], aligned[key], a, b), abs=1e-5)
        dw = b.double() @ a.double()
        kept = float((dense_c(base[key], aligned[key]) @ dw).norm() / dw.norm()) if row["selected"] else 1.0
        assert row["update_retained"] == pytest.approx(kept, rel=1e-4)
        signs.append(row["alignment_cosine"] < 0)
    assert any(signs) and not all(signs)  # the demo has updates on both sides of the alignment direction
