"""Compare `safelora patch`'s output with a reference implementation's; print one JSON line.

Usage: python crosscheck.py PATCHED_DIR REFERENCE_DIR BASE_DIR ALIGNED_DIR ADAPTER_DIR THRESHOLD

PATCHED_DIR holds safelora's adapter and safelora_report.json; REFERENCE_DIR holds the reference's
adapter_model.safetensors and cosines.json (module → cosine, rounded to 5 decimals). The layer
where the two cosines differ most is recomputed in float64 from the checkpoints, to tell which
side the difference comes from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

PREFIX = "base_model.model."


def weight(model: Path, key: str) -> torch.Tensor:
    index = model / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    with safe_open(str(model / name), framework="pt") as handle:
        return handle.get_tensor(key)


def cosine64(module: str, base: Path, aligned: Path, adapter: dict[str, torch.Tensor]) -> float:
    """The paper's cosine of one layer, densely, in float64."""
    v = weight(aligned, f"{module}.weight").double() - weight(base, f"{module}.weight").double()
    a = adapter[f"{PREFIX}{module}.lora_A.weight"].double()
    b = adapter[f"{PREFIX}{module}.lora_B.weight"].double()
    update = b @ a
    projected = (v @ (v.T @ update)) / torch.linalg.norm(v)
    return float((projected * update).sum() / (torch.linalg.norm(projected) * torch.linalg.norm(update)))


def main(argv: list[str]) -> None:
    patched, reference, base, aligned, adapter = map(Path, argv[1:6])
    threshold = float(argv[6])
    report = json.loads((patched / "safelora_report.json").read_text())
    ref_cos = json.loads((reference / "cosines.json").read_text())
    ours = {layer["module"]: layer for layer in report["layers"]}
    diffs = {m: abs(layer["cosine"] - ref_cos[m]) for m, layer in ours.items()}
    worst = max(diffs, key=diffs.__getitem__)
    sel_b = {m for m, layer in ours.items() if layer["selected"]}
    sel_ref = {m for m, c in ref_cos.items() if c <= threshold}
    ab = load_file(str(patched / "adapter_model.safetensors"))
    aref = load_file(str(reference / "adapter_model.safetensors"))
    rel = max(float((ab[k].double() - aref[k].double()).norm() / aref[k].double().norm().clamp_min(1e-30))
              for k in aref)
    exact = cosine64(worst, base, aligned, load_file(str(adapter / "adapter_model.safetensors")))
    print(json.dumps({
        "layers": len(diffs), "max_cos_diff": diffs[worst], "worst_module": worst,
        "worst_b": ours[worst]["cosine"], "worst_ref": ref_cos[worst], "worst_f64": exact,
        "sel_b": len(sel_b), "sel_ref": len(sel_ref), "same_selection": sel_b == sel_ref,
        "same_modules": set(ours) == set(ref_cos), "keys_equal": ab.keys() == aref.keys(), "max_rel_b": rel,
    }))


if __name__ == "__main__":
    main(sys.argv)
