"""Tiny models made once per test session with the real clients (transformers, peft)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("COLUMNS", "200")  # rich tables do not wrap differently across terminals

TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Trio:
    base: Path
    aligned: Path
    adapter: Path


def tiny_llama_config():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
    )


def make_aligned(model: torch.nn.Module, seed: int) -> None:
    """Turn a base model into its 'aligned' sibling: a low-rank change to every linear weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                out, inp = module.weight.shape
                u = torch.randn(out, 3, generator=gen)
                v = torch.randn(3, inp, generator=gen)
                module.weight += 0.02 * (u @ v).to(module.weight.dtype)


def save_llama_pair(root: Path, dtype: torch.dtype, shard: str | None, seed: int = 0):  # type: ignore[no-untyped-def]
    """Save base and aligned tiny Llamas; return the aligned model (in memory) for PEFT."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(root / "base", **kwargs)
    make_aligned(model, seed + 1)
    model.save_pretrained(root / "aligned", **kwargs)
    return model


def save_peft_adapter(model: torch.nn.Module, path: Path, seed: int = 2, **lora_kwargs: object) -> None:
    """A real PEFT adapter with non-zero lora_B (a fresh LoRA has B = 0 and an undefined cosine)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(path)
    peft_model.unload()


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory: pytest.TempPathFactory) -> Trio:
    """Single-file bf16 base/aligned checkpoints and a float32 PEFT adapter on q/v."""
    root = tmp_path_factory.mktemp("llama")
    model = save_llama_pair(root, torch.bfloat16, shard=None)
    save_peft_adapter(model, root / "adapter")
    return Trio(root / "base", root / "aligned", root / "adapter")


@pytest.fixture(scope="session")
def sharded_trio(tmp_path_factory: pytest.TempPathFactory) -> Trio:
    """Sharded float32 checkpoints (a layer's tensors spread over shards) and an adapter."""
    root = tmp_path_factory.mktemp("sharded")
    model = save_llama_pair(root, torch.float32, shard="20KB", seed=5)
    save_peft_adapter(model, root / "adapter", seed=6)
    return Trio(root / "base", root / "aligned", root / "adapter")


@pytest.fixture(scope="session")
def demo_trio(tmp_path_factory: pytest.TempPathFactory) -> Trio:
    """The demo's own generator: layers alternate between aligned and unaligned updates."""
    from safelora_cli.demo import write_trio

    root = tmp_path_factory.mktemp("demo")
    write_trio(root)
    return Trio(root / "base", root / "aligned", root / "adapter")


@pytest.fixture(scope="session")
def variant_cases(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Tiny models of several families with real PEFT adapters (see variant_models.py), built lazily."""
    from variant_models import CaseCache

    return CaseCache(tmp_path_factory.mktemp("variants"))
