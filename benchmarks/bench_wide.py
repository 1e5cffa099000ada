"""One decoder layer of 70B and 405B geometry (all seven linear modules), for the width rows.

    python benchmarks/bench_generate.py DATA_DIR w70     # ~1.7 GB per model in bf16
    python benchmarks/bench_generate.py DATA_DIR w405    # ~6.4 GB per model in bf16

A 405B MLP weight is 53248 × 16384: 3.5 GB in float32 while it is made. `demo.write_models`
holds a whole shard of both models before writing it, so here every weight is its own shard,
made, written for the base, changed in place into the aligned weight and written again: peak
memory is about two float32 copies of the largest weight. The vocabulary is tiny (the patch
never reads embeddings). With a single layer, `demo.write_adapter` would put every update in
V's column space; here the modules alternate (q, v, gate, down inside it, k, o, up random), so
some layers are selected, as in the other setups.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safelora_cli.demo import ALIGN_RANK, LlamaShape, write_adapter

WIDE_SHAPES = {
    "SHAPE_W70": LlamaShape(hidden=8192, intermediate=28672, layers=1, heads=64, kv_heads=8, vocab=256),
    "SHAPE_W405": LlamaShape(hidden=16384, intermediate=53248, layers=1, heads=128, kv_heads=8, vocab=256),
}
_RANDOM_MODULES = ("k_proj", "o_proj", "up_proj")  # updates outside V's column space: low cosine


def write_wide_models(root: Path, shape: LlamaShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """`root/base` and `root/aligned`, one shard per linear weight; return each weight's basis U."""
    gen = torch.Generator().manual_seed(seed)
    linear = {f"model.layers.0.{name}.weight": s for name, s in shape.linear_shapes().items()}
    count = len(linear) + 1
    small = {"model.embed_tokens.weight": torch.randn(shape.vocab, shape.hidden, generator=gen) * 0.02,
             "lm_head.weight": torch.randn(shape.vocab, shape.hidden, generator=gen) * 0.02,
             "model.norm.weight": torch.ones(shape.hidden),
             "model.layers.0.input_layernorm.weight": torch.ones(shape.hidden),
             "model.layers.0.post_attention_layernorm.weight": torch.ones(shape.hidden)}
    bases: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for model in ("base", "aligned"):
        (root / model).mkdir(parents=True, exist_ok=True)
        (root / model / "config.json").write_text(json.dumps(shape.hf_config(torch.bfloat16), indent=2))
    for n, (key, (out, inp)) in enumerate(sorted(linear.items()), start=1):
        shard = f"model-{n:05d}-of-{count:05d}.safetensors"
        w = torch.randn(out, inp, generator=gen).mul_(0.02)
        u = torch.linalg.qr(torch.randn(out, ALIGN_RANK, generator=gen))[0]
        v = torch.randn(ALIGN_RANK, inp, generator=gen) * 0.01
        save_file({key: w.to(torch.bfloat16)}, str(root / "base" / shard), metadata={"format": "pt"})
        w.addmm_(u, v)
        save_file({key: w.to(torch.bfloat16)}, str(root / "aligned" / shard), metadata={"format": "pt"})
        del w
        bases[key] = u
        weight_map[key] = shard
    shard = f"model-{count:05d}-of-{count:05d}.safetensors"
    tensors = {k: t.to(torch.bfloat16) for k, t in small.items()}
    total = sum(o * i * 2 for o, i in linear.values()) + sum(t.numel() * 2 for t in tensors.values())
    for model in ("base", "aligned"):
        save_file(tensors, str(root / model / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return bases


def write_wide_adapter(path: Path, shape: LlamaShape, bases: dict[str, torch.Tensor], targets: tuple[str, ...],
                       rank: int) -> None:
    """`demo.write_adapter`, then the B of every module in `_RANDOM_MODULES` replaced by a random one."""
    write_adapter(path, shape, bases, targets, rank, base_model="synthetic-aligned")
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    gen = torch.Generator().manual_seed(7)
    for key, tensor in tensors.items():
        if ".lora_B." in key and any(f".{m}." in key for m in _RANDOM_MODULES):
            tensors[key] = (torch.randn(tensor.shape, generator=gen) * 0.01).contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
