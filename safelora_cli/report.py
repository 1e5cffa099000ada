"""The similarity report: one versioned JSON document, and its CSV / Markdown renderings.

Schema (version 1) is documented in docs/report-schema.md; `SCHEMA_VERSION` changes on any
incompatible edit. Norms are of the weight update as PEFT applies it (LoRA scaling included).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from typing import TYPE_CHECKING, Any

from safelora_cli import __version__

if TYPE_CHECKING:
    from safelora_cli.pipeline import Analysis, LayerResult

SCHEMA_VERSION = 1
REPORT_NAME = "safelora_report.json"
SORT_KEYS = ("layer", "cosine", "module")
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
    }


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


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


def to_markdown(report: dict[str, Any], sort: str = "layer") -> str:
    summary, settings = report["summary"], report["settings"]
    rule = settings["selection"]
    rule_text = f"cosine ≤ {rule['threshold']}" if rule["rule"] == "threshold" else f"{rule['top_k']} lowest"
    lines = [
        "## Safe LoRA",
        "",
        f"Patched with safelora-cli {report['tool']['version']} ({settings['projection']['kind']} projection, "
        f"selection: {rule_text}).",
        "",
        f"- Base: `{report['inputs']['base']['source']}`",
        f"- Aligned: `{report['inputs']['aligned']['source']}`",
        f"- Adapter: `{report['inputs']['adapter']['source']}`",
        f"- Layers: {summary['layers']}, projected: {summary['selected']}, undefined: {summary['undefined']}",
        f"- Cosine min / median / max: {fmt(summary['cosine_min'])} / {fmt(summary['cosine_median'])} / "
        f"{fmt(summary['cosine_max'])}; Pdst: {fmt(summary['pdst'])}",
        "",
        "| module | layer | r | cosine | projected | ‖V‖ | ‖ΔW‖ | ‖ΔW − CΔW‖ |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for row in sorted_layers(report, sort):
        cells = [f"`{row['module']}`", *(fmt(row[c]) for c in _COLUMNS[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
