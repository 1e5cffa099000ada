"""The similarity report: one versioned JSON document, built once, and its CSV / Markdown renderings.

Schema (version 1) is documented in docs/report-schema.md and shipped as a JSON Schema
(report_schema.json, see `json_schema`); `SCHEMA_VERSION` changes on any incompatible edit.
Norms are of the weight update as PEFT applies it (LoRA scaling included). The types below say
what each part holds; the document itself is plain JSON values, so that `json.dumps` of it is
what `--json` prints and what the Python API returns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypedDict

from safelora_cli import __version__
from safelora_cli.gates import GateResult
from safelora_cli.outputs import REPORT_NAME

if TYPE_CHECKING:
    from safelora_cli.analysis import Analysis, LayerResult

__all__ = ["REPORT_NAME", "Report", "build_report", "json_schema", "to_csv", "to_json"]

SCHEMA_VERSION = 1
SCHEMA_FILE = "report_schema.json"  # JSON Schema of the report, shipped as package data
# Thresholds of the sweep in the summary: how many layers each would select, so a user picks τ without rerunning.
SWEEP = (0.3, 0.35, 0.4, 0.5, 0.6)
_COLUMNS = ("module", "layer_index", "rank", "cosine", "selected", "alignment_cosine", "update_retained", "v_norm",
            "delta_norm", "residual_norm")


class LayerRecord(TypedDict):
    module: str
    layer_index: int | None
    weight_key: str
    shape: list[int]
    rank: int
    scaling: float
    cosine: float | None
    undefined_reason: str | None
    selected: bool
    alignment_cosine: float | None
    update_retained: float
    v_norm: float
    delta_norm: float
    residual_norm: float
    b_distance: float | None
    subspace_rank: int | None
    cosine_error_bound: float | None
    selection_decided: bool | None


class Report(TypedDict):
    schema_version: int
    tool: dict[str, str]
    command: str
    inputs: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    device: str
    summary: dict[str, Any]
    layers: list[LayerRecord]
    untouched_tensors: list[str]
    skipped_files: list[dict[str, str]]
    gates: list[dict[str, Any]]


def text_of_path(value: object) -> str:
    """A path as JSON can hold it: bytes of a name that is not UTF-8 shown as `\\xff` escapes."""
    return os.fsencode(str(value)).decode("utf-8", "backslashreplace")


def _retained(result: LayerResult) -> float:
    """‖ΔW after‖_F / ‖ΔW before‖_F: ‖CΔW‖/‖ΔW‖ for a projected layer, 1 for one left alone."""
    math_ = result.math
    if not result.selected or math_.delta_norm == 0.0:
        return 1.0
    return math_.projected_norm / math_.delta_norm


def _layer_record(result: LayerResult) -> LayerRecord:
    plan, math_ = result.plan, result.math
    return {
        "module": plan.module,
        "layer_index": plan.layer_index,
        "weight_key": plan.weight_key,
        "shape": list(plan.shape),
        "rank": plan.rank,
        "scaling": plan.scaling,
        "cosine": math_.cosine,
        "undefined_reason": math_.undefined_reason,
        "selected": result.selected,
        "alignment_cosine": None if math_.alignment_cosine is None else math.copysign(1.0, plan.scaling) *
        math_.alignment_cosine,
        "update_retained": _retained(result),
        "v_norm": math_.v_norm,
        "delta_norm": math_.delta_norm * abs(plan.scaling),
        "residual_norm": math_.residual_norm * abs(plan.scaling),
        "b_distance": math_.b_distance,
        "subspace_rank": math_.subspace_rank,
        "cosine_error_bound": None if math_.cosine_upper is None or math_.cosine is None else
        math_.cosine_upper - math_.cosine,
        "selection_decided": result.decided,
    }


def _pdst(layers: list[LayerResult]) -> float | None:
    """The official code's summary: mean of 1/(1 + ‖B_final − C·B‖_F) over layers with V ≠ 0."""
    terms = [
        1.0 / (1.0 + (0.0 if r.selected else r.math.b_distance))
        for r in layers
        if r.math.b_distance is not None
    ]
    return sum(terms) / len(terms) if terms else None


def _summary(layers: list[LayerResult], records: list[LayerRecord]) -> dict[str, Any]:
    cosines = [r.math.cosine for r in layers if r.math.cosine is not None]
    kept = [rec["update_retained"] for rec in records if rec["selected"]]
    return {
        "layers": len(layers),
        "selected": sum(r.selected for r in layers),
        "undefined": sum(r.math.cosine is None for r in layers),
        "cosine_min": min(cosines) if cosines else None,
        "cosine_median": statistics.median(cosines) if cosines else None,
        "cosine_max": max(cosines) if cosines else None,
        "update_retained_min": min(kept) if kept else None,
        "update_retained_max": max(kept) if kept else None,
        "threshold_sweep": [{"threshold": t, "selected": sum(c <= t for c in cosines)} for t in SWEEP],
        "pdst": _pdst(layers),
        "selection_undecided": None if all(r.decided is None for r in layers) else
        sum(r.decided is False for r in layers),
    }


def build_report(command: str, analysis: Analysis, inputs: dict[str, dict[str, Any]], settings: dict[str, Any],
                 device: str, gates: list[GateResult], skipped_files: list[dict[str, str]]) -> Report:
    """The report as plain JSON values; deterministic for the same inputs and settings.

    Args:
        command: "patch" or "inspect".
        analysis: the adapter's analysed layers.
        inputs: `base`, `aligned`, `adapter` → source, path, revision, commit (see sources.Origin.record).
        settings: the method's record, with adapter_name / key_map when given.
        device: the device the math ran on.
        gates: the verdicts of the gates asked for.
        skipped_files: files of the adapter directory not copied to the output, with the reason.
    """
    records = [_layer_record(r) for r in analysis.layers]
    report: Report = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "safelora-cli", "version": __version__},
        "command": command,
        "inputs": inputs,
        "settings": settings,
        "device": device,
        "summary": _summary(analysis.layers, records),
        "layers": records,
        "untouched_tensors": analysis.adapter.other_keys,
        "skipped_files": skipped_files,
        "gates": [asdict(g) for g in gates],
    }
    return report


def json_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), as shipped in the package."""
    from importlib import resources

    return json.loads(resources.files("safelora_cli").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def to_json(report: Report | list[Report]) -> str:
    # allow_nan=False: NaN/Infinity are not JSON; one reaching here is a bug and must not ship silently.
    return json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# Model order within a block: attention, then MLP, as the modules run.
_MODULE_ORDER = {name: i for i, name in enumerate(
    ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "o_proj", "dense", "c_proj",
     "gate_proj", "up_proj", "gate_up_proj", "down_proj", "fc1", "fc2", "c_fc"))}


def model_order(row: LayerRecord) -> tuple[float, int, str]:
    """Layer number (modules outside the blocks first), then attention before MLP as the model runs."""
    leaf = row["module"].rsplit(".", 1)[-1]
    index = row["layer_index"]
    return (-1 if index is None else index, _MODULE_ORDER.get(leaf, len(_MODULE_ORDER)), row["module"])


def sorted_layers(report: Report, sort: str) -> list[LayerRecord]:
    """Layers in model order, by cosine (undefined last), or by module type."""
    layers = report["layers"]
    if sort == "cosine":
        return sorted(layers, key=lambda r: (r["cosine"] is None, r["cosine"] or 0.0, model_order(r)))
    if sort == "module":
        return sorted(layers, key=lambda r: (r["module"].rsplit(".", 1)[-1], model_order(r)))
    return sorted(layers, key=model_order)


def fmt(value: Any, digits: int = 4) -> str:
    """A cell: floats to `digits` decimals, None as '—' (undefined), booleans as yes/no."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def percent(value: float) -> str:
    """A share as people read it: 0.4% rather than 0.0043; two significant digits when small."""
    share = 100 * value
    return f"{share:.2g}%" if share < 10 else f"{share:.0f}%"


def to_csv(report: Report, sort: str = "layer") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_COLUMNS, "undefined_reason"])
    for row in sorted_layers(report, sort):
        writer.writerow([*("" if row[c] is None else row[c] for c in _COLUMNS),  # type: ignore[literal-required]
                         row["undefined_reason"] or ""])
    return buffer.getvalue()


def projected_line(report: Report) -> str:
    """One sentence on what projecting did: "4 layers projected; they keep 0.4–3% of their update"."""
    s = report["summary"]
    if not s["selected"]:
        return "No layer projected; the adapter is unchanged."
    low, high = s["update_retained_min"], s["update_retained_max"]
    share = percent(low) if math.isclose(low, high, rel_tol=0.05) else f"{percent(low)}–{percent(high)}"
    noun = "layer" if s["selected"] == 1 else "layers"
    return f"{s['selected']} {noun} projected; they keep {share} of their update (‖CΔW‖/‖ΔW‖)."


def pdst_line(report: Report) -> str:
    """The official code's summary number, with what it means: people meet it in its printout."""
    return (f"Pdst {fmt(report['summary']['pdst'])}: the official code's summary, the mean over layers of "
            "1/(1 + ‖B_final − C·B‖_F), 1 for a projected layer; the published code reads > 0.8 as good.")


def alignment_line(report: Report) -> str:
    """How many layers the fine-tune moved back toward the base model: what the cosine cannot see."""
    if all(r["alignment_cosine"] is None for r in report["layers"]) and "subspace" in report["inputs"]:
        return "alignment cos = ⟨ΔW, V⟩/(‖ΔW‖‖V‖): not known, a low-rank subspace file holds no V."
    back = [a for r in report["layers"] if (a := r["alignment_cosine"]) is not None and a < 0.0]
    lowest = min(back, default=None)
    where = f", lowest {fmt(lowest)}" if lowest is not None else ""
    return (f"alignment cos = ⟨ΔW, V⟩/(‖ΔW‖‖V‖), signed: {len(back)} of {len(report['layers'])} layers move back "
            f"toward the base model (< 0){where}; the cosine scores ΔW and −ΔW alike.")


def bound_line(report: Report) -> str | None:
    """With a low-rank subspace file: how loose the cosines are, and whether that leaves the selection open."""
    undecided = report["summary"].get("selection_undecided")
    bounds = [b for r in report["layers"] if (b := r.get("cosine_error_bound")) is not None]
    if undecided is None or not bounds:
        return None
    tail = ("the bounds decide every selection" if not undecided else
            f"{undecided} of {len(report['layers'])} layers' selection is undecided by them (selection_decided "
            "false): use an exact subspace file, or a larger --rank, to settle it")
    return (f"Low-rank subspace: each cosine is a lower end; the full C's may be up to {fmt(max(bounds))} higher "
            f"(cosine_error_bound); {tail}.")


def sweep_text(report: Report) -> str:
    parts = [f"τ={e['threshold']:g}: {e['selected']}" for e in report["summary"]["threshold_sweep"]]
    return f"Layers a threshold would select of {report['summary']['layers']}: " + ", ".join(parts) + "."
