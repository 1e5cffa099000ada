"""The similarity report: one versioned JSON document, and its CSV / Markdown renderings.

Schema (version 1) is documented in docs/report-schema.md and shipped as a JSON Schema
(report_schema.json, see `json_schema`); `SCHEMA_VERSION` changes on any incompatible edit.
Norms are of the weight update as PEFT applies it (LoRA scaling included).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from safelora_cli import __version__
from safelora_cli.gates import GateResult, evaluate

if TYPE_CHECKING:
    from safelora_cli.pipeline import Analysis, LayerResult

SCHEMA_VERSION = 1
REPORT_NAME = "safelora_report.json"
SCHEMA_FILE = "report_schema.json"  # JSON Schema of the report, shipped as package data
_COLUMNS = ("module", "layer_index", "rank", "cosine", "selected", "v_norm", "delta_norm", "residual_norm")


def _layer_record(result: LayerResult) -> dict[str, Any]:
    plan, math = result.plan, result.math
    return {
        "module": plan.module,
        "layer_index": plan.layer_index,
        "weight_key": plan.weight_key,
        "shape": list(plan.shape),
        "rank": plan.rank,
        "scaling": plan.scaling,
        "cosine": math.cosine,
        "undefined_reason": math.undefined_reason,
        "selected": result.selected,
        "v_norm": math.v_norm,
        "delta_norm": math.delta_norm * abs(plan.scaling),
        "residual_norm": math.residual_norm * abs(plan.scaling),
        "b_distance": math.b_distance,
        "subspace_rank": math.subspace_rank,
    }


def _pdst(layers: list[LayerResult]) -> float | None:
    """The official code's summary: mean of 1/(1 + ‖B_final − C·B‖_F) over layers with V ≠ 0."""
    terms = [
        1.0 / (1.0 + (0.0 if r.selected else r.math.b_distance))
        for r in layers
        if r.math.b_distance is not None
    ]
    return sum(terms) / len(terms) if terms else None


def _summary(layers: list[LayerResult]) -> dict[str, Any]:
    cosines = [r.math.cosine for r in layers if r.math.cosine is not None]
    return {
        "layers": len(layers),
        "selected": sum(r.selected for r in layers),
        "undefined": sum(r.math.cosine is None for r in layers),
        "cosine_min": min(cosines) if cosines else None,
        "cosine_median": statistics.median(cosines) if cosines else None,
        "cosine_max": max(cosines) if cosines else None,
        "pdst": _pdst(layers),
    }


def _origin(analysis: Analysis, name: str) -> dict[str, Any]:
    """Requested revision and resolved commit (null for local inputs); see sources.Origin."""
    origin = analysis.origins.get(name)
    return origin.record() if origin is not None else {"revision": None, "commit": None}


def build_report(analysis: Analysis, command: str) -> dict[str, Any]:
    """The report as plain JSON values; deterministic for the same inputs and settings."""
    config = analysis.config
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "safelora-cli", "version": __version__},
        "command": command,
        "inputs": {
            "base": {"source": config.base, "path": str(analysis.base.root), **_origin(analysis, "base")},
            "aligned": {"source": config.aligned, "path": str(analysis.aligned.root), **_origin(analysis, "aligned")},
            "adapter": {"source": config.adapter, "path": str(analysis.adapter.path), **_origin(analysis, "adapter")},
        },
        "settings": config.settings_record(),
        "device": analysis.device,
        "summary": _summary(analysis.layers),
        "layers": [_layer_record(r) for r in analysis.layers],
        "untouched_tensors": analysis.adapter.other_keys,
        "gates": [asdict(g) for g in _gates(analysis)],
    }


def _gates(analysis: Analysis) -> list[GateResult]:
    layers = analysis.layers
    return evaluate(analysis.config.gates, [r.math.cosine for r in layers], [r.selected for r in layers],
                    [r.plan.module for r in layers])


def failed_gates(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The gates of a report that did not pass (empty when none failed or none were set)."""
    return [g for g in report.get("gates", []) if not g["passed"]]


def json_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), as shipped in the package."""
    from importlib import resources

    return json.loads(resources.files("safelora_cli").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def to_json(report: dict[str, Any]) -> str:
    # allow_nan=False: NaN/Infinity are not JSON; one reaching here is a bug and must not ship silently.
    return json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def sorted_layers(report: dict[str, Any], sort: str) -> list[dict[str, Any]]:
    """Layers in layer order (as computed), by cosine (undefined last), or by module name."""
    layers = report["layers"]
    if sort == "cosine":
        return sorted(layers, key=lambda r: (r["cosine"] is None, r["cosine"] or 0.0))
    if sort == "module":
        return sorted(layers, key=lambda r: (r["module"].rsplit(".", 1)[-1], r["layer_index"] or 0))
    return list(layers)


def fmt(value: Any, digits: int = 4) -> str:
    """A cell: floats to `digits` decimals, None as '—' (undefined), booleans as yes/no."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def to_csv(report: dict[str, Any], sort: str = "layer") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_COLUMNS, "undefined_reason"])
    for row in sorted_layers(report, sort):
        writer.writerow([*("" if row[c] is None else row[c] for c in _COLUMNS), row["undefined_reason"] or ""])
    return buffer.getvalue()


def _md_cell(value: Any) -> str:
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


def _md_inputs(report: dict[str, Any]) -> list[str]:
    lines = ["| input | source | revision |", "|---|---|---|"]
    for name, entry in report["inputs"].items():
        revision = entry.get("revision") or entry.get("commit")
        rev = f"`{_md_cell(revision)}`" if revision else "—"
        lines.append(f"| {name} | `{_md_cell(entry['source'])}` | {rev} |")
    return lines


def _md_gates(report: dict[str, Any]) -> list[str]:
    gates = report.get("gates") or []
    if not gates:
        return ["No gates were set."]
    lines = ["| gate | limit | observed | result |", "|---|---:|---:|---|"]
    for gate in gates:
        result = "passed" if gate["passed"] else "**FAILED**"
        lines.append(f"| --{gate['gate']} | {gate['limit']} | {fmt(gate['observed'])} | {result} |")
    lines += ["", *(f"- {g['message']}" for g in gates)]
    return lines


def _md_layers(report: dict[str, Any], sort: str) -> list[str]:
    lines = [
        "| module | layer | r | cosine | projected | ‖V‖ | ‖ΔW‖ | ‖ΔW − CΔW‖ |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for row in sorted_layers(report, sort):
        cosine = fmt(row["cosine"]) if row["cosine"] is not None else f"undefined ({row['undefined_reason']})"
        cells = [f"`{_md_cell(row['module'])}`", fmt(row["layer_index"]), fmt(row["rank"]), _md_cell(cosine),
                 fmt(row["selected"]), *(fmt(row[c]) for c in _COLUMNS[5:])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(report: dict[str, Any], sort: str = "layer") -> str:
    """A self-contained "## Safe LoRA" section: what was done, to what, with which outcome.

    Used for `--report-md`, `inspect --format markdown` and the patched adapter's model card.
    """
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
        *_md_inputs(report),
        "",
        "### Summary",
        "",
        f"- Layers: {summary['layers']}; projected: {summary['selected']}; undefined: {summary['undefined']}",
        f"- Cosine min / median / max: {fmt(summary['cosine_min'])} / {fmt(summary['cosine_median'])} / "
        f"{fmt(summary['cosine_max'])}",
        f"- Pdst (the official code's summary, > 0.8 is better): {fmt(summary['pdst'])}",
        "",
        "### Gates",
        "",
        *_md_gates(report),
        "",
        "### Layers",
        "",
        *_md_layers(report, sort),
    ]
    return "\n".join(lines) + "\n"


def write_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
