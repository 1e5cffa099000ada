"""The report as a self-contained Markdown section: `--report-md`, `inspect --format markdown`
and the patched adapter's model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safelora_cli.report import (
    LayerRecord,
    Report,
    alignment_line,
    bound_line,
    fmt,
    pdst_line,
    percent,
    projected_line,
    sorted_layers,
    sweep_text,
)


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped so a path or name cannot break the table."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _rule_text(selection: dict[str, Any]) -> str:
    if selection["rule"] == "threshold":
        return f"threshold, select cosine ≤ {selection['threshold']}"
    return f"top-k, select the {selection['top_k']} lowest cosines"


def _projection_text(projection: dict[str, Any]) -> str:
    if projection["kind"] == "approx":
        return "approx (the paper's C = V·Vᵀ/‖V‖_F)"
    keep = f"rank {projection['rank']}" if projection.get("rank") is not None else f"energy {projection['energy']}"
    return f"exact (orthogonal projector onto V's top singular directions, {keep}, {projection['svd']} SVD)"


def public_source(entry: dict[str, Any]) -> str:
    """How a published document names an input: the Hub id, or a local path's last component."""
    source = str(entry["source"])
    if entry.get("commit"):
        return source.split("@", 1)[0]
    return Path(source.rstrip("/")).name or source


def _inputs(report: Report, public: bool) -> list[str]:
    lines = ["| input | source | revision |", "|---|---|---|"]
    for name, entry in report["inputs"].items():
        revision = entry.get("revision") or entry.get("commit")
        rev = f"`{_cell(revision)}`" if revision else "—"
        source = public_source(entry) if public else entry["source"]
        lines.append(f"| {name} | `{_cell(source)}` | {rev} |")
    return lines


def _skipped(report: Report) -> list[str]:
    skipped = report["skipped_files"]
    if not skipped:
        return []
    listed = "; ".join(f"`{_cell(s['path'])}` ({s['reason']})" for s in skipped)
    return [f"- Not copied from the adapter directory: {listed}"]


def _gates(report: Report) -> list[str]:
    gates = report["gates"]
    if not gates:
        return ["No gates were set."]
    lines = ["| gate | limit | observed | result |", "|---|---:|---:|---|"]
    for gate in gates:
        result = "passed" if gate["passed"] else "**FAILED**"
        lines.append(f"| --{gate['gate']} | {gate['limit']} | {fmt(gate['observed'])} | {result} |")
    lines += ["", *(f"- {g['message']}" for g in gates)]
    return lines


def _layers(rows: list[LayerRecord]) -> list[str]:
    lines = [
        "| layer | module | r | cosine | projected | alignment cos | update kept | ‖V‖ | ‖ΔW‖ | ‖ΔW − CΔW‖ |",
        "|---:|---|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cosine = fmt(row["cosine"]) if row["cosine"] is not None else f"undefined ({row['undefined_reason']})"
        cells = [fmt(row["layer_index"]), f"`{_cell(row['module'])}`", fmt(row["rank"]), _cell(cosine),
                 fmt(row["selected"]), fmt(row["alignment_cosine"]), percent(row["update_retained"]),
                 *(fmt(row[c]) for c in ("v_norm", "delta_norm", "residual_norm"))]  # type: ignore[literal-required]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(report: Report, sort_layers: list[LayerRecord], public: bool) -> str:
    summary, settings = report["summary"], report["settings"]
    done = ("lora_B of each projected layer was replaced by C·lora_B; lora_A and all other tensors are unchanged."
            if report["command"] == "patch" else "Nothing was written: these are the layers `patch` would project.")
    lines = [
        "## Safe LoRA",
        "",
        f"Report of `safelora {report['command']}` (safelora-cli {report['tool']['version']}, Safe LoRA: "
        f"Hsu et al., NeurIPS 2024). {done}",
        "",
        "### Settings",
        "",
        f"- Selection: {_rule_text(settings['selection'])}",
        f"- Projection: {_projection_text(settings['projection'])}",
        f"- Device: {report['device']}",
        "",
        "### Inputs",
        "",
        *_inputs(report, public),
        "",
        "### Summary",
        "",
        f"- Layers: {summary['layers']}; projected: {summary['selected']}; undefined: {summary['undefined']}",
        f"- {projected_line(report)}",
        f"- Cosine min / median / max: {fmt(summary['cosine_min'])} / {fmt(summary['cosine_median'])} / "
        f"{fmt(summary['cosine_max'])}",
        f"- {sweep_text(report)}",
        f"- {pdst_line(report)}",
        *_skipped(report),
        f"- {alignment_line(report)}",
        *([f"- {line}"] if (line := bound_line(report)) is not None else []),
        "",
        "### Gates",
        "",
        *_gates(report),
        "",
        "### Layers",
        "",
        *_layers(sort_layers),
    ]
    return "\n".join(lines) + "\n"


def to_markdown(report: Report, sort: str = "layer", public: bool = False) -> str:
    """The "## Safe LoRA" section; `public` names local inputs by directory name only (the model
    card is published; full paths stay in the JSON report)."""
    return render(report, sorted_layers(report, sort), public)
