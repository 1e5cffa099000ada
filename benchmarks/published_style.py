"""Row (c2): Safe LoRA with the structure of the published code, model objects and all.

Usage: python published_style.py BASE_DIR ALIGNED_DIR ADAPTER_DIR OUT_DIR [THRESHOLD]

What it holds and does, in order (written here from a description of that structure, to measure
what it costs; it is not that code):

1. the fine-tuned model: the aligned model, loaded with transformers
   `AutoModelForCausalLM.from_pretrained` in float32, with the adapter attached by peft
   `PeftModel.from_pretrained`;
2. a `copy.deepcopy` of that PEFT model, the untouched reference the walk reads from;
3. the base and the aligned model, each loaded again the same way, walked side by side; for every
   parameter whose name contains a LoRA target, the dense C = V·Vᵀ/‖V‖_F (out × out) is formed and
   appended to a list. At this point four float32 copies of the model are alive;
4. a walk over the PEFT model's named parameters (and the copy's, in step): a LoRA parameter whose
   first dimension equals r is taken for lora_A; the next other LoRA parameter is lora_B and gets
   the next C of the list (iteration order is the only pairing). ΔW = B·A and C·ΔW are formed
   densely, their cosine is rounded to 5 decimals, and B ← C·B when it is ≤ the threshold.
   Pdst, the mean of 1/(1 + ‖B_final − C·B‖_F), is printed like the published code prints it;
5. the patched adapter is saved with `save_pretrained`, and the per-layer cosines (cosines.json,
   module name → cosine) for the harness's cross-check.

Nothing is read from the network (HF_HUB_OFFLINE is set) and no tokenizer is used.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

MODEL_PREFIX = "base_model.model."


def load_fp32(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def dense_projections(base_dir: Path, aligned_dir: Path, targets: list[str]) -> list[torch.Tensor]:
    """Every targeted layer's C = V·Vᵀ/‖V‖_F, in parameter order; both models live until all are formed."""
    base = load_fp32(base_dir)
    aligned = load_fp32(aligned_dir)
    projections = []
    with torch.no_grad():
        for (_, w_base), (name, w_aligned) in zip(base.named_parameters(), aligned.named_parameters(),
                                                  strict=True):
            if not any(target in name for target in targets):
                continue
            v = w_aligned - w_base
            projections.append(torch.mm(v, v.t()) / torch.norm(v))
    return projections


def module_of(parameter_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight' → 'model.layers.0.self_attn.q_proj'."""
    return parameter_name.removeprefix(MODEL_PREFIX).split(".lora_", 1)[0]


def main(argv: list[str]) -> None:
    base_dir, aligned_dir, adapter_dir, out_dir = map(Path, argv[1:5])
    threshold = float(argv[5]) if len(argv) > 5 else 0.5
    hf_logging.disable_progress_bar()

    fine_tuned = PeftModel.from_pretrained(load_fp32(aligned_dir), str(adapter_dir))
    reference = copy.deepcopy(fine_tuned)
    lora_config = fine_tuned.peft_config["default"]
    projections = dense_projections(base_dir, aligned_dir, sorted(lora_config.target_modules))

    cosines: dict[str, float] = {}
    closeness: list[float] = []
    lora_a: torch.Tensor | None = None
    next_c = 0
    with torch.no_grad():
        for (name, param), (_, original) in zip(fine_tuned.named_parameters(), reference.named_parameters(),
                                                strict=True):
            if "lora_" not in name:
                continue
            if param.shape[0] == lora_config.r:
                lora_a = original.detach().clone()
                continue
            assert lora_a is not None, f"{name}: a lora_B before any lora_A"
            c = projections[next_c]
            next_c += 1
            cb = torch.mm(c, original)
            update = torch.mm(original, lora_a)
            projected_update = torch.mm(cb, lora_a)
            cosine = torch.nn.functional.cosine_similarity(projected_update.reshape(1, -1), update.reshape(1, -1))
            cosine_value = round(float(cosine), 5)
            cosines[module_of(name)] = cosine_value
            param.data = cb if cosine_value <= threshold else original.detach().clone()
            closeness.append(float(1.0 / (1.0 + torch.norm(param.data.reshape(-1) - cb.reshape(-1)))))

    selected = sum(c <= threshold for c in cosines.values())
    pdst = sum(closeness) / max(len(closeness), 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    fine_tuned.save_pretrained(str(out_dir))
    (out_dir / "cosines.json").write_text(json.dumps(cosines, indent=1))
    print(f"{selected} layers are projected, cosine threshold is {threshold}, and Pdst is {pdst:.4f}; "
          f"{len(projections)} dense C held")


if __name__ == "__main__":
    main(sys.argv)
