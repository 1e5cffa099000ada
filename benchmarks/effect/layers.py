"""Per-layer numbers of the effect benchmark, computed from the tensors, and its control adapters.

For each adapted module: V = W_aligned − W_base, ΔW = B·A, the paper's cosine between C·ΔW and ΔW
(C = V·Vᵀ/‖V‖_F), the signed alignment cosine a = ⟨ΔW, V⟩/(‖ΔW‖‖V‖) and the fraction of the update
a projection keeps, ‖C·ΔW‖/‖ΔW‖. Controls are copies of an adapter with lora_B zeroed ("drop") or
replaced by C·lora_B ("project") in a chosen set of modules.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."


@dataclass(frozen=True)
class LayerStats:
    module: str
    cosine: float
    signed: float
    retained: float


def _weights(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(str(root / "base" / "model.safetensors")), load_file(str(root / "aligned" / "model.safetensors"))


def _factors(adapter: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str]]]:
    """The adapter's tensors and, per module name, its (lora_A key, lora_B key)."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    keys = {k[len(PREFIX):-len(".lora_A.weight")]: (k, k.replace("lora_A", "lora_B"))
            for k in tensors if k.endswith(".lora_A.weight")}
    return tensors, dict(sorted(keys.items(), key=lambda kv: _order(kv[0])))


def _order(module: str) -> tuple[int, str]:
    parts = module.split(".")
    return int(parts[2]), parts[-1]


def layer_stats(root: Path, adapter: Path) -> list[LayerStats]:
    base, aligned = _weights(root)
    tensors, keys = _factors(adapter)
    out = []
    for module, (a_key, b_key) in keys.items():
        v = (aligned[f"{module}.weight"] - base[f"{module}.weight"]).double()
        delta = tensors[b_key].double() @ tensors[a_key].double()
        projected = v @ (v.T @ delta) / v.norm()
        out.append(LayerStats(
            module=module,
            cosine=float((projected * delta).sum() / (projected.norm() * delta.norm())),
            signed=float((delta * v).sum() / (delta.norm() * v.norm())),
            retained=float(projected.norm() / delta.norm())))
    return out


def rewrite(src: Path, dst: Path, modules: set[str], how: str, root: Path) -> Path:
    """Copy adapter `src` to `dst` with lora_B of `modules` zeroed (drop) or set to C·lora_B (project)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    tensors, keys = _factors(src)
    base, aligned = _weights(root) if how == "project" else ({}, {})
    for module in modules:
        b_key = keys[module][1]
        b = tensors[b_key]
        if how == "drop":
            tensors[b_key] = torch.zeros_like(b)
        else:
            v = (aligned[f"{module}.weight"] - base[f"{module}.weight"]).float()
            tensors[b_key] = (v @ (v.T @ b.float()) / v.norm()).to(b.dtype)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def _metrics(results: dict[str, dict[str, dict]], path: Path | str) -> dict[str, float | None]:  # type: ignore[type-arg]
    safety, task = results["safety"][str(path)], results["task"][str(path)]
    return {"refusal": safety["refusal_rate"], "over_refusal": safety["over_refusal_rate"],
            "old_tasks": safety["accuracy"], "new_task": task["accuracy"]}


def _mean(rows: list[dict[str, float | None]]) -> dict[str, object]:
    """Mean over random draws, with the range beside it."""
    return {k: {"mean": statistics.fmean(float(r[k] or 0.0) for r in rows),
                "min": min(float(r[k] or 0.0) for r in rows), "max": max(float(r[k] or 0.0) for r in rows)}
            for k in rows[0]}


def summarise(root: Path, results: dict, selected: dict, patched: dict, variants: dict,  # type: ignore[type-arg]
              stats: dict[str, list[LayerStats]]) -> dict[str, object]:
    """Every row of the table, as data: adapter → list of {rule, layers, metrics}."""
    out: dict[str, object] = {"aligned": _metrics(results, ""), "base_refusal": results["base"][""]["refusal_rate"],
                              "base_old_tasks": results["base"][""]["accuracy"]}
    for adapter, paths in patched.items():
        by_module = {s.module: s for s in stats[adapter]}
        rows: list[dict[str, object]] = [{"rule": "LoRA as trained", "layers": 0,
                                          "metrics": _metrics(results, root / adapter)}]
        for name, path in paths.items():
            chosen = selected[name][adapter]
            kept = [by_module[m].retained for m in chosen]
            rows.append({"rule": f"paper: {name}", "layers": len(chosen), "metrics": _metrics(results, path),
                         "modules": chosen, "retained_median": statistics.median(kept) if kept else None})
        randoms: dict[int, list[dict[str, float | None]]] = {}
        for label, path in variants[adapter].items():
            if label.startswith("drop random"):
                randoms.setdefault(int(label.split()[2]), []).append(_metrics(results, path))
            else:
                rows.append({"rule": label, "layers": int(label.split()[-1]) if "lowest-a" in label else len(
                    selected[label[len("drop selected ("):-1]][adapter]), "metrics": _metrics(results, path)})
        rows += [{"rule": f"drop random {n} (mean of {len(r)})", "layers": n, "metrics": _mean(r)}
                 for n, r in randoms.items()]
        rows.sort(key=lambda r: int(r["layers"]))  # type: ignore[call-overload]
        out[adapter] = {"rows": rows, "layer_stats": [asdict(s) for s in stats[adapter]]}
    return out


def _cell(value: object) -> str:
    if isinstance(value, dict):
        return f"{value['mean']:.2f} [{value['min']:.2f}–{value['max']:.2f}]"
    return "—" if value is None else f"{float(value):.2f}"  # type: ignore[arg-type]


def markdown(summary: dict) -> str:  # type: ignore[type-arg]
    a = summary["aligned"]
    lines = [f"Aligned model alone: refusal {_cell(a['refusal'])}, old tasks {_cell(a['old_tasks'])}, new task "
             f"{_cell(a['new_task'])}, over-refusal {_cell(a['over_refusal'])}. Base model: refusal "
             f"{_cell(summary['base_refusal'])}, old tasks {_cell(summary['base_old_tasks'])}.", ""]
    for adapter in ("pure_bad", "mixed", "benign"):
        lines += [f"### {adapter}", "", "| rule | modules changed | refusal | old tasks | new task | over-refusal |",
                  "|---|---|---|---|---|---|"]
        for row in summary[adapter]["rows"]:
            m = row["metrics"]
            lines.append(f"| {row['rule']} | {row['layers']} | {_cell(m['refusal'])} | {_cell(m['old_tasks'])} | "
                         f"{_cell(m['new_task'])} | {_cell(m['over_refusal'])} |")
        lines += ["", "| module | cosine (paper) | signed a | kept ‖CΔW‖/‖ΔW‖ |", "|---|---|---|---|"]
        lines += [f"| {s['module'].replace('model.layers.', 'L').replace('.self_attn.', ' ')} | {s['cosine']:.3f} | "
                  f"{s['signed']:+.3f} | {s['retained']:.3f} |" for s in summary[adapter]["layer_stats"]]
        lines.append("")
    return "\n".join(lines)
