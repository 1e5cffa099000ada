"""Synthetic Llama-shaped base / aligned / adapter trios, for the demo and the benchmarks.

The aligned model is the base plus a low-rank "alignment" update per linear weight, so V has
a known column space. Adapter layers alternate between an update inside that space (cosine
near 1: left alone) and a random one (low cosine: projected), so the demo shows both outcomes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ALIGN_RANK = 8


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 256

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear module in one decoder layer."""
        h, m, kv = self.hidden, self.intermediate, self.kv_dim
        return {
            "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m),
        }

    def hf_config(self, dtype: torch.dtype) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."),
        }


TINY = LlamaShape()
SHAPE_1B = LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
SHAPE_7B = LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)


def _layer_tensors(shape: LlamaShape, i: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"model.layers.{i}.{n}.weight": s for n, s in shape.linear_shapes().items()}
    shapes[f"model.layers.{i}.input_layernorm.weight"] = (shape.hidden,)
    shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (shape.hidden,)
    return shapes


def _shard_name(n: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{n:05d}-of-{count:05d}.safetensors"


def _write_index(root: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_models(root: Path, shape: LlamaShape, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 layers_per_shard: int | None = None) -> dict[str, torch.Tensor]:
    """Write `root/base` and `root/aligned`; return each linear weight's alignment basis U (out, 8).

    Each shard is written as soon as it is made, so memory holds one shard of each model at a time.
    """
    gen = torch.Generator().manual_seed(seed)
    bases: dict[str, torch.Tensor] = {}
    per_shard = layers_per_shard or shape.layers
    count = -(-shape.layers // per_shard)
    embed = (torch.randn(shape.vocab, shape.hidden, generator=gen) * 0.02).to(dtype)
    head = (torch.randn(shape.vocab, shape.hidden, generator=gen) * 0.02).to(dtype)
    extra = {"model.embed_tokens.weight": embed, "lm_head.weight": head,
             "model.norm.weight": torch.ones(shape.hidden, dtype=dtype)}
    weight_map: dict[str, str] = {}
    total = 0
    for name in ("base", "aligned"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(shape.hf_config(dtype), indent=2))
    for n, first in enumerate(range(0, shape.layers, per_shard), start=1):
        b_shard: dict[str, torch.Tensor] = {}
        a_shard: dict[str, torch.Tensor] = {}
        for i in range(first, min(first + per_shard, shape.layers)):
            for key, s in _layer_tensors(shape, i).items():
                if len(s) == 1:
                    b_shard[key] = a_shard[key] = torch.ones(s, dtype=dtype)
                    continue
                w = torch.randn(s, generator=gen) * 0.02
                u = torch.linalg.qr(torch.randn(s[0], ALIGN_RANK, generator=gen))[0]
                v = torch.randn(ALIGN_RANK, s[1], generator=gen) * 0.01
                bases[key] = u
                b_shard[key] = w.to(dtype)
                a_shard[key] = (w + u @ v).to(dtype)
        if n == count:
            b_shard.update(extra)
            a_shard.update(extra)
        shard = _shard_name(n, count)
        for name, tensors in (("base", b_shard), ("aligned", a_shard)):
            save_file(tensors, str(root / name / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(b_shard, shard))
        total += sum(t.numel() * t.element_size() for t in b_shard.values())
    if count > 1:
        for name in ("base", "aligned"):
            _write_index(root / name, weight_map, total)
    return bases


def write_adapter(path: Path, shape: LlamaShape, alignment_bases: dict[str, torch.Tensor],
                  targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 8, seed: int = 1,
                  base_model: str = "aligned") -> None:
    """A PEFT-format LoRA adapter; even layers update inside V's column space, odd layers not."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(shape.layers):
        for name, (out, inp) in shape.linear_shapes().items():
            if name.rsplit(".", 1)[-1] not in targets:
                continue
            module = f"model.layers.{i}.{name}"
            a = torch.randn(rank, inp, generator=gen) / inp**0.5
            if i % 2 == 0:
                u = alignment_bases[f"{module}.weight"]
                b = u @ torch.randn(u.shape[1], rank, generator=gen) * 0.01
            else:
                b = torch.randn(out, rank, generator=gen) * 0.01
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "alpha_pattern": {}, "base_model_name_or_path": base_model, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "modules_to_save": None,
        "peft_type": "LORA", "r": rank, "rank_pattern": {}, "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def write_trio(root: Path, shape: LlamaShape = TINY, targets: tuple[str, ...] = ("q_proj", "v_proj"),
               rank: int = 8, dtype: torch.dtype = torch.bfloat16, layers_per_shard: int | None = None,
               final_root: Path | None = None) -> None:
    """`root/base`, `root/aligned` and `root/adapter`, ready for `safelora patch`.

    The adapter's config names `final_root/aligned` as its model: the place the trio will be
    used from, when `root` is only where it is built.
    """
    bases = write_models(root, shape, dtype, layers_per_shard=layers_per_shard)
    named = (final_root or root) / "aligned"
    write_adapter(root / "adapter", shape, bases, targets, rank, base_model=str(named))


def write_demo(directory: Path) -> None:
    """The demo trio in `directory` (new, or empty), written whole or not at all.

    Raises:
        UsageError: `directory` is a file or a directory that is not empty.
        OutputError: it cannot be written (disk full, permissions).
    """
    import os

    from safelora_cli.errors import UsageError
    from safelora_cli.placement import write_directory

    if os.path.lexists(directory) and (directory.is_symlink() or not directory.is_dir()):
        raise UsageError(f"{directory} exists and is not a directory.", hint="Choose a new directory.")
    if directory.is_dir() and any(directory.iterdir()):
        raise UsageError(f"{directory} exists and is not empty.", hint="Choose a new directory.")
    existed = (os.stat(directory).st_dev, os.stat(directory).st_ino) if directory.is_dir() else None
    write_directory(directory, existed, "demo directory",
                    lambda staging: write_trio(staging, final_root=directory.absolute()))
