"""The Python API: `safelora_cli.patch` / `inspect` return what the CLI prints, raise, never exit or print."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import Trio
from helpers import run_cli, tree_digest, trio_args

import safelora_cli
from safelora_cli.errors import InputError, OutputError, SafeLoraError, UsageError

PACKAGE = Path(safelora_cli.__file__).parent


def _without_paths(report: dict) -> dict:  # type: ignore[type-arg]
    return {**report, "inputs": {k: {**v, "path": None} for k, v in report["inputs"].items()}}


def test_patch_report_is_what_the_cli_prints(demo_trio: Trio, tmp_path: Path) -> None:
    result = safelora_cli.patch(base=demo_trio.base, aligned=demo_trio.aligned, adapter=demo_trio.adapter,
                                out=tmp_path / "api", device="cpu")
    cli = run_cli("patch", *trio_args(demo_trio), "--out", tmp_path / "cli", "--device", "cpu", "--json", "-q")
    assert cli.exit_code == 0, cli.stderr
    assert json.loads(cli.stdout) == result.report
    assert result.outputs == [tmp_path / "api"]
    assert json.loads((tmp_path / "api" / "safelora_report.json").read_text()) == result.report
    assert result.passed and result.failed_gates == []


def test_inspect_takes_strings_or_paths_and_one_or_several_adapters(demo_trio: Trio) -> None:
    one = safelora_cli.inspect(base=str(demo_trio.base), aligned=str(demo_trio.aligned), adapter=str(demo_trio.adapter))
    listed = safelora_cli.inspect(base=demo_trio.base, aligned=demo_trio.aligned, adapter=[demo_trio.adapter])
    assert one.reports == listed.reports and one.outputs == [] and one.command == "inspect"
    cli = run_cli("inspect", *trio_args(demo_trio), "--json")
    assert json.loads(cli.stdout) == one.json_document()


def test_gate_verdicts_are_data_not_an_exit(demo_trio: Trio, tmp_path: Path) -> None:
    result = safelora_cli.patch(base=demo_trio.base, aligned=demo_trio.aligned, adapter=demo_trio.adapter,
                                out=tmp_path / "out", max_selected="10%", fail_below=0.0)
    assert not result.passed
    assert [g.gate for g in result.failed_gates] == ["max-selected"]
    assert "over --max-selected 10%" in result.failed_gates[0].message
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # written all the same, as with the CLI


def test_user_errors_raise_the_package_exceptions(demo_trio: Trio, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not both"):
        safelora_cli.inspect(base=demo_trio.base, adapter=demo_trio.adapter, threshold=0.3, top_k=2)
    with pytest.raises(InputError, match="does not exist"):
        safelora_cli.inspect(base=tmp_path / "nope", aligned=demo_trio.aligned, adapter=demo_trio.adapter)
    with pytest.raises(OutputError, match="lies inside the adapter"):
        safelora_cli.patch(base=demo_trio.base, aligned=demo_trio.aligned, adapter=demo_trio.adapter,
                           out=demo_trio.adapter / "safe")
    with pytest.raises(UsageError, match="projection"):
        safelora_cli.inspect(base=demo_trio.base, adapter=demo_trio.adapter, projection="dense")
    assert issubclass(UsageError, SafeLoraError) and safelora_cli.SafeLoraError is SafeLoraError


def test_the_api_prints_nothing_and_reports_through_callbacks(demo_trio: Trio, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    progress: list[tuple[int, int]] = []
    warnings: list[str] = []
    result = safelora_cli.inspect(base=demo_trio.base, aligned=demo_trio.aligned, adapter=demo_trio.adapter, top_k=99,
                                  on_progress=lambda done, total: progress.append((done, total)),
                                  on_warning=warnings.append)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert progress[-1] == (8, 8) and [d for d, _ in progress] == list(range(1, 9))
    assert warnings == result.warnings and "top-k 99" in warnings[0]
    assert result.report["summary"]["selected"] == 8


def test_inputs_stay_unchanged_through_the_api(demo_trio: Trio, tmp_path: Path) -> None:
    roots = (demo_trio.base, demo_trio.aligned, demo_trio.adapter)
    before = [tree_digest(r) for r in roots]
    safelora_cli.patch(base=demo_trio.base, aligned=demo_trio.aligned, adapter=demo_trio.adapter, out=tmp_path / "o",
                       report_md=tmp_path / "r.md", top_k=3)
    assert [tree_digest(r) for r in roots] == before
    assert (tmp_path / "r.md").read_text().startswith("## Safe LoRA")


def _imports(module: Path) -> set[str]:
    """safelora_cli modules imported by `module`, at any depth of the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("safelora_cli"):
            if node.module == "safelora_cli":
                found |= {f"safelora_cli.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("safelora_cli.")}
    return found


def test_the_import_graph_has_no_cycle() -> None:
    graph = {f"safelora_cli.{p.stem}": _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    # The package's __init__ only re-exports the API lazily; the graph is over its modules.
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " → ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    # The analysis never reaches the writer or the report.
    reach, todo = set(), ["safelora_cli.analysis"]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in reach:
                reach.add(nxt)
                todo.append(nxt)
    assert not reach & {"safelora_cli.writer", "safelora_cli.report", "safelora_cli.pipeline"}


@pytest.mark.parametrize(("argument", "value"), [
    ("threshold", True), ("threshold", "0.5"), ("fail_below", True), ("top_k", 2.5), ("top_k", True),
    ("rank", True), ("force", "no"), ("adapter", 1), ("adapter", []), ("key_map", Path("x")), ("key_map", ["a=b", 1]),
    ("out", 3), ("out", None), ("report_md", ["r.md"]), ("on_progress", 1), ("device", 0), ("max_selected", 2.5),
])
def test_arguments_of_the_wrong_type_are_usage_errors(demo_trio: Trio, tmp_path: Path, argument: str,
                                                      value: object) -> None:
    kwargs: dict[str, object] = {"base": demo_trio.base, "aligned": demo_trio.aligned, "adapter": demo_trio.adapter,
                                 "out": tmp_path / "out", argument: value}
    with pytest.raises(UsageError, match=argument):
        safelora_cli.patch(**kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
