"""Row (c): Safe LoRA computed the direct way, as the published implementation structures it.

Usage: python direct_dense.py BASE_DIR ALIGNED_DIR ADAPTER_DIR OUT_DIR [THRESHOLD]

- both full models are loaded, every tensor, in float32 (what `from_pretrained(torch_dtype=
  torch.float32)` holds in memory), and kept for the whole run;
- for every adapted layer the dense projection C = V·Vᵀ/‖V‖_F (out × out) is formed, and all of
  them are kept in a list before any is used;
- then per layer: ΔW = B·A densely, C·ΔW densely, their cosine (rounded to 5 decimals), and
  B ← C·B when the cosine is ≤ the threshold;
- the patched adapter and the per-layer cosines (cosines.json) are written to OUT_DIR.

This is an independent re-implementation for measuring cost, not a copy of that code.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."


def load_model_fp32(root: Path) -> dict[str, torch.Tensor]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    model: dict[str, torch.Tensor] = {}
    for name in files:
        model.update({k: t.float() for k, t in load_file(str(root / name)).items()})
    return model


def main(argv: list[str]) -> None:
    base_dir, aligned_dir, adapter_dir, out_dir = map(Path, argv[1:5])
    threshold = float(argv[5]) if len(argv) > 5 else 0.5
    base = load_model_fp32(base_dir)
    aligned = load_model_fp32(aligned_dir)
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in adapter if ".lora_A." in k},
                     key=lambda m: (int(m.split(".")[2]), m))

    projections = []
    for module in modules:
        v = aligned[f"{module}.weight"] - base[f"{module}.weight"]
        projections.append(torch.mm(v, v.t()) / torch.norm(v))

    patched = dict(adapter)
    cosines = {}
    for module, c in zip(modules, projections, strict=True):
        a_key, b_key = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
        a, b = adapter[a_key].float(), adapter[b_key].float()
        delta = torch.mm(b, a)
        new_b = torch.mm(c, b)
        projected = torch.mm(new_b, a)
        cos = torch.nn.functional.cosine_similarity(projected.reshape(1, -1), delta.reshape(1, -1))
        cos = round(float(cos), 5)
        cosines[module] = cos
        if cos <= threshold:
            patched[b_key] = new_b.to(adapter[b_key].dtype).contiguous()

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(patched, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(adapter_dir / "adapter_config.json", out_dir / "adapter_config.json")
    (out_dir / "cosines.json").write_text(json.dumps(cosines, indent=1))
    # The models and every C stay referenced until here, as in the published code.
    print(f"{sum(c <= threshold for c in cosines.values())} of {len(cosines)} layers projected; "
          f"{len(base) + len(aligned)} fp32 tensors and {len(projections)} dense C held")


if __name__ == "__main__":
    main(sys.argv)
