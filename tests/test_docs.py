"""The manual stays true: the CLI reference is regenerated, the schema page covers the schema,
links between pages resolve, and the CI workflow in docs/ci.md is valid YAML with the gate."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest

from safelora_cli import clidoc
from safelora_cli.report import json_schema

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Pages other parts of the project write; links to them are checked once they exist.
OWNED_ELSEWHERE = {"method.md", "benchmarks.md", "inputs.md", "support.md", "../README.md"}


def test_cli_reference_matches_the_program() -> None:
    assert (DOCS / "cli.md").read_text() == clidoc.render(), "docs/cli.md is stale: run `make docs`"


def test_cli_reference_lists_every_option() -> None:
    text = clidoc.render()
    for option in ("--max-selected", "--fail-below", "--report-md", "--plot", "--json", "--top-k", "--force"):
        assert f"`{option}" in text


def _schema_fields(schema: dict, node: dict, prefix: str = "") -> set[str]:  # type: ignore[type-arg]
    """Leaf names of every property in the schema, following $ref and oneOf."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    names = set()
    for branch in node.get("oneOf", []):
        names |= _schema_fields(schema, branch, prefix)
    for name, sub in node.get("properties", {}).items():
        names.add(name)
        names |= _schema_fields(schema, sub, name)
    items = node.get("items")
    if isinstance(items, dict):
        names |= _schema_fields(schema, items, prefix)
    return names


def test_schema_page_documents_every_field() -> None:
    page = (DOCS / "report-schema.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)?)` \|", page, re.MULTILINE))
    documented |= set(re.findall(r"`inputs\.([a-z]+)`", page))
    leaves = {d.rsplit(".", 1)[-1] for d in documented} | {d.split(".", 1)[0] for d in documented}
    missing = _schema_fields(json_schema(), json_schema()) - leaves - {"name", "version"}
    assert not missing, f"fields in report_schema.json but not in docs/report-schema.md: {sorted(missing)}"
    assert "`name` (`\"safelora-cli\"`) and `version`" in page


def test_schema_page_example_is_valid() -> None:
    page = (DOCS / "report-schema.md").read_text()
    example = json.loads(page.split("```json\n", 1)[1].split("```", 1)[0])
    jsonschema.Draft202012Validator(json_schema()).validate(example)


def test_links_between_pages_resolve() -> None:
    broken = []
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith("http") or target in OWNED_ELSEWHERE and not (DOCS / target).exists():
                continue
            if not (DOCS / target).exists():
                broken.append(f"{page.name} → {target}")
    assert not broken


def test_ci_workflow_is_valid_yaml_that_gates_and_uploads() -> None:
    import yaml

    text = (DOCS / "ci.md").read_text()
    workflow = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    steps = workflow["jobs"]["safelora"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/cache@") for u in uses)
    assert sum(u.startswith("actions/upload-artifact@") for u in uses) == 2
    script = next(s["run"] for s in steps if s.get("id") == "patch")
    assert "--max-selected 20% --json" in script and "--report-md" in script and "--plot" in script
    decide = steps[-1]["run"]
    assert "3)" in decide and "*)" in decide
    assert "secrets.HF_TOKEN" in text


def test_api_page_examples_run(demo_trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                               capsys: pytest.CaptureFixture[str]) -> None:
    """docs/api.md's code blocks, run in a folder holding the demo trio as `demo/`."""
    demo = tmp_path / "demo"
    demo.mkdir()
    for name in ("base", "aligned", "adapter"):
        shutil.copytree(getattr(demo_trio, name), demo / name)
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.DOTALL)
    assert len(blocks) == 4
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "4 of 8 layers projected" in out and "gates passed: True" in out
    assert "keeps" in out and "refused: --out demo/adapter/x lies inside the adapter" in out
    assert (demo / "patched-api" / "adapter_model.safetensors").is_file()
    assert "exact 8 weights," in out and "4 layers selected, as with the two models" in out


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("command", [[], ["patch"], ["inspect"], ["demo"], ["eval"]])
def test_help_reads_cleanly(command: list[str], width: int) -> None:
    """Examples stay whole copy-pasteable lines, flags show no placeholder, markup eats nothing."""
    from typer.testing import CliRunner

    from safelora_cli.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": str(width)}, terminal_width=width)
    assert result.exit_code == 0
    text = result.stdout
    assert "<bool>" not in text and "<list" not in text and "<str>" not in text
    if command:
        import inspect as pyinspect

        found = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command[0])
        source = found.help or pyinspect.cleandoc(found.callback.__doc__ or "")
        examples = [line.strip() for line in source.splitlines() if line.startswith("    safelora")]
        assert examples
        lines = {line.strip() for line in text.splitlines()}
        for example in examples:
            assert example in lines, f"example wrapped at {width} columns: {example}"
    if command == ["patch"]:
        assert "safelora-cli[plot]" in " ".join(text.split())
