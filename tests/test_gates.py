"""Policy gates: the pure rules, and the CLI's exit code 3 with every output still written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Trio
from helpers import run_cli, trio_args

from safelora_cli.errors import UsageError
from safelora_cli.gates import (
    Gates,
    SelectedLimit,
    check_fail_below,
    check_max_selected,
    evaluate,
    parse_selected_limit,
)
from safelora_cli.report import REPORT_NAME


@pytest.mark.parametrize(("text", "value", "percent"), [("3", 3, False), ("0", 0, False), ("20%", 20, True),
                                                        (" 12.5 % ", 12.5, True), ("100%", 100, True)])
def test_limit_parses_counts_and_percentages(text: str, value: float, percent: bool) -> None:
    assert parse_selected_limit(text) == SelectedLimit(value, percent)


@pytest.mark.parametrize(("text", "message"), [("-1", "takes a count"), ("abc", "takes a count"), ("", "takes a count"),
                                               ("150%", "must lie in [0%, 100%]"), ("2.5", "whole number")])
def test_limit_rejects_nonsense(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_selected_limit(text)


@pytest.mark.parametrize(("limit", "layers", "allowed"), [("20%", 6, 1), ("30%", 10, 3), ("0%", 9, 0), ("100%", 7, 7),
                                                          ("50%", 0, 0), ("4", 2, 4)])
def test_allowed_is_the_floor_of_the_share(limit: str, layers: int, allowed: int) -> None:
    assert parse_selected_limit(limit).allowed(layers) == allowed


def test_max_selected_passes_at_the_limit_and_fails_one_above() -> None:
    limit = parse_selected_limit("2")
    at = check_max_selected(limit, [True, True, False, False])
    over = check_max_selected(limit, [True, True, True, False])
    assert (at.passed, at.observed) == (True, 2)
    assert (over.passed, over.observed) == (False, 3)
    assert "3 of 4 layers selected (75.0%), over --max-selected 2 (at most 2)" in over.message


def test_fail_below_is_strict_and_ignores_undefined_layers() -> None:
    modules = ["a", "b", "c"]
    assert check_fail_below(0.3, [0.3, None, 0.9], modules).passed
    failed = check_fail_below(0.3, [0.29, None, 0.1], modules)
    assert not failed.passed
    assert failed.observed == 0.1
    assert "2 layer(s) have a cosine below --fail-below 0.3; the lowest is 0.1000 in c" in failed.message


def test_fail_below_with_no_defined_cosine_passes_and_observes_nothing() -> None:
    result = check_fail_below(0.5, [None, None], ["a", "b"])
    assert (result.passed, result.observed) == (True, None)


def test_evaluate_runs_only_the_gates_asked_for_in_a_fixed_order() -> None:
    assert evaluate(Gates(), [0.1], [True], ["a"]) == []
    both = evaluate(Gates(parse_selected_limit("0"), 0.5), [0.1], [True], ["a"])
    assert [(g.gate, g.passed) for g in both] == [("max-selected", False), ("fail-below", False)]


def test_fail_below_outside_the_cosine_range_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--fail-below is a cosine"):
        Gates(fail_below=1.5)


def test_failed_gate_exits_3_with_outputs_written_and_json_alone_on_stdout(llama_trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / "patched"
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--device", "cpu", "--top-k", "2",
                     "--max-selected", "1", "--json", "--quiet")
    assert result.exit_code == 3
    written = json.loads((out / REPORT_NAME).read_text())
    assert json.loads(result.stdout) == written  # stdout is exactly the report, nothing else
    assert written["gates"] == [{"gate": "max-selected", "limit": "1", "observed": 2, "passed": False,
                                 "message": "2 of 6 layers selected (33.3%), over --max-selected 1 (at most 1)."}]
    assert result.stderr.splitlines() == [
        f"Error: Gate failed: {written['gates'][0]['message']} The patched adapter and its report were written "
        f"to {out}."
    ]
    assert (out / "adapter_model.safetensors").is_file()
    assert "**FAILED**" in (out / "README.md").read_text()


def test_passing_gate_exits_0_and_is_recorded(llama_trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / "patched"
    result = run_cli("patch", *trio_args(llama_trio), "--out", out, "--device", "cpu", "--top-k", "2",
                     "--max-selected", "34%")
    assert result.exit_code == 0, result.stderr
    gates = json.loads((out / REPORT_NAME).read_text())["gates"]
    assert [(g["gate"], g["limit"], g["passed"]) for g in gates] == [("max-selected", "34%", True)]


@pytest.mark.parametrize(("tau", "code"), [("1.0", 3), ("-1", 0)])
def test_inspect_fail_below(tau: str, code: int, llama_trio: Trio) -> None:
    result = run_cli("inspect", *trio_args(llama_trio), "--device", "cpu", "--format", "json", "--fail-below", tau)
    assert result.exit_code == code
    report = json.loads(result.stdout)
    assert report["gates"][0]["gate"] == "fail-below"
    assert report["gates"][0]["passed"] is (code == 0)
    assert report["gates"][0]["observed"] == report["summary"]["cosine_min"]
    if code == 3:
        assert result.stderr.startswith("Error: Gate failed: 6 layer(s) have a cosine below --fail-below 1")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["patch"], 2),  # Click's own usage error: missing required options
        (["inspect", "--base", "x", "--aligned", "y"], 2),  # missing --adapter
        (["inspect", "--no-such-option"], 2),
        (["inspect", "--base", "x", "--aligned", "y", "--adapter", "z", "--format", "yaml"], 2),
        (["inspect", "--base", "x", "--aligned", "y", "--adapter", "z", "--max-selected", "many"], 2),
        (["inspect", "--base", "x", "--aligned", "y", "--adapter", "z", "--fail-below", "abc"], 2),
        (["inspect", "--base", "x", "--aligned", "y", "--adapter", "z"], 1),  # a missing input: exit 1
        (["--version"], 0),
    ],
)
def test_exit_codes(args: list[str], code: int) -> None:
    assert run_cli(*args).exit_code == code


def test_several_adapters_gate_each_and_share_one_markdown_file(llama_trio: Trio, tmp_path: Path) -> None:
    import shutil

    second = Path(shutil.copytree(llama_trio.adapter, tmp_path / "second"))
    out, md, png = tmp_path / "out", tmp_path / "r.md", tmp_path / "p.png"
    result = run_cli("patch", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--adapter",
                     llama_trio.adapter, "--adapter", second, "--out", out, "--device", "cpu", "--top-k", "1",
                     "--max-selected", "0", "--report-md", md, "--plot", png, "--quiet")
    assert result.exit_code == 3
    assert result.stderr.startswith(f"Error: Gate failed: {llama_trio.adapter}: 1 of 6 layers selected")
    assert "(1 more gate(s) failed.)" in result.stderr
    assert md.read_text().count("## Safe LoRA") == 2
    assert sorted(p.name for p in tmp_path.glob("p-*.png")) == ["p-adapter.png", "p-second.png"]
    for name in ("adapter", "second"):
        gates = json.loads((out / name / REPORT_NAME).read_text())["gates"]
        assert [g["passed"] for g in gates] == [False]
