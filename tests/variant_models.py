"""Tiny models of several families and real PEFT adapters on them, built once per test session.

Every case keeps, beside the saved directories, what the test needs to check the tool without
sharing its logic: the weights by their in-memory names (so no checkpoint naming is involved),
which modules store their weight transposed relative to B·A (from the module types), and the
scaling PEFT itself gave every adapted layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TEXT = {
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64,
}


def _llama(tied: bool = False) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**TEXT, tie_word_embeddings=tied))


def _mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**TEXT))


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**TEXT))  # q/k/v carry biases


def _gemma() -> Any:
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**TEXT, head_dim=8))  # ties lm_head to embed_tokens


def _phi3() -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def _llava() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    text = LlamaConfig(**TEXT, tie_word_embeddings=False)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))


def _qwen2_vl() -> Any:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2,
              "spatial_merge_size": 1, "temporal_patch_size": 1}
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))


FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": _llama, "llama-tied": lambda: _llama(tied=True), "mistral": _mistral, "qwen2": _qwen2,
    "gemma": _gemma, "phi3": _phi3, "gpt2": _gpt2, "llava": _llava, "qwen2-vl": _qwen2_vl,
}


@dataclass(frozen=True)
class Spec:
    """A model family and the LoRA settings of the adapter(s) trained on it.

    `adapters` maps adapter names to LoraConfig keyword arguments; PEFT saves "default" at the top
    level and any other name in a subfolder.
    """

    family: str
    adapters: dict[str, dict[str, Any]]


SPECS: dict[str, Spec] = {
    # Model families.
    "llama": Spec("llama", {"default": {"target_modules": ["q_proj", "v_proj"]}}),
    "mistral": Spec("mistral", {"default": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}),
    "qwen2": Spec("qwen2", {"default": {"target_modules": ["q_proj", "k_proj", "v_proj"]}}),
    "gemma-tied-lm-head": Spec("gemma", {"default": {"target_modules": ["q_proj", "lm_head"]}}),
    "phi3-fused": Spec("phi3", {"default": {"target_modules": ["qkv_proj", "gate_up_proj"]}}),
    "gpt2-conv1d": Spec("gpt2", {"default": {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}}),
    "llava": Spec("llava", {"default": {"target_modules": ["q_proj", "v_proj", "lm_head"]}}),
    "qwen2-vl": Spec("qwen2-vl", {"default": {"target_modules": r".*language_model.*\.(q_proj|v_proj)"}}),
    # LoRA variants.
    "embedding": Spec("llama", {"default": {"target_modules": ["embed_tokens", "q_proj"]}}),
    "tied-embedding-llama": Spec("llama-tied", {"default": {"target_modules": ["lm_head", "v_proj"]}}),
    "dora": Spec("llama", {"default": {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True}}),
    "dora-embedding": Spec("llama", {"default": {"target_modules": ["embed_tokens"], "use_dora": True}}),
    "patterns": Spec("llama", {"default": {
        "target_modules": ["q_proj", "v_proj", "up_proj"], "rank_pattern": {"v_proj": 2, "layers.1.mlp.up_proj": 6},
        "alpha_pattern": {"q_proj": 32, r"layers\.0\.self_attn\.v_proj": 3}}}),
    "rslora": Spec("llama", {"default": {"target_modules": ["q_proj"], "use_rslora": True, "lora_alpha": 6}}),
    "layers-to-transform": Spec("llama", {"default": {
        "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}}),
    "regex-exclude": Spec("llama", {"default": {
        "target_modules": r".*\.(self_attn|mlp)\.(q_proj|up_proj)", "exclude_modules": r".*layers\.0\.mlp.*"}}),
    "all-linear": Spec("llama", {"default": {"target_modules": "all-linear"}}),
    "lora-bias": Spec("llama", {"default": {"target_modules": ["q_proj"], "lora_bias": True}}),
    "modules-to-save": Spec("llama", {"default": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}}),
    "two-named": Spec("llama", {"first": {"target_modules": ["q_proj"]}, "second": {"target_modules": ["v_proj"]}}),
}


@dataclass(frozen=True)
class Case:
    """Saved base/aligned/adapter directories plus the facts a test checks against."""

    name: str
    family: str
    base: Path
    aligned: Path
    adapter: Path
    adapter_names: list[str]
    base_weights: dict[str, torch.Tensor]
    aligned_weights: dict[str, torch.Tensor]
    transposed: set[str]  # modules whose stored weight is the transpose of B·A
    scalings: dict[str, dict[str, float]] = field(default_factory=dict)  # adapter → module → PEFT scaling

    def load_aligned(self) -> Any:
        """The aligned model as a user loads it before attaching the adapter."""
        return type(FAMILIES[self.family]()).from_pretrained(self.aligned)

    def subfolder(self, adapter_name: str) -> Path:
        return self.adapter if adapter_name == "default" else self.adapter / adapter_name


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _make_aligned(model: torch.nn.Module, seed: int) -> None:
    """A low-rank change to every matrix (embeddings and Conv1D included), so no V is zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # tied weights are visited once
            if param.ndim == 2:
                u = torch.randn(param.shape[0], 3, generator=gen)
                v = torch.randn(3, param.shape[1], generator=gen)
                param += 0.05 * (u @ v)


def _transposed_modules(model: torch.nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding | Conv1D)}


def _peft_scalings(peft_model: Any, adapter_name: str) -> dict[str, float]:
    inner = peft_model.base_model.model
    return {n: float(m.scaling[adapter_name]) for n, m in inner.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and adapter_name in m.scaling}


def _train_dora_magnitudes(peft_model: Any, gen: torch.Generator) -> None:
    """A fresh DoRA m equals ‖W + s·B·A‖_row; training moves it, so move it."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.3 * torch.rand(param.shape, generator=gen))


def build_case(name: str, root: Path, seed: int = 0) -> Case:
    """Save base and aligned models of the spec's family and the PEFT adapter(s) trained on the aligned one."""
    from peft import LoraConfig, get_peft_model

    spec = SPECS[name]
    torch.manual_seed(seed)
    model = FAMILIES[spec.family]()
    model.save_pretrained(root / "base")
    base_weights = _weights(model)
    _make_aligned(model, seed + 1)
    model.save_pretrained(root / "aligned")
    aligned_weights, transposed = _weights(model), _transposed_modules(model)
    gen = torch.Generator().manual_seed(seed + 2)
    peft_model, scalings = None, {}
    for adapter_name, kwargs in spec.adapters.items():
        config = LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs})
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        else:
            peft_model.add_adapter(adapter_name, config)
        scalings[adapter_name] = _peft_scalings(peft_model, adapter_name)
    assert peft_model is not None
    _train_dora_magnitudes(peft_model, gen)
    peft_model.save_pretrained(root / "adapter")
    return Case(name, spec.family, root / "base", root / "aligned", root / "adapter", list(spec.adapters),
                base_weights, aligned_weights, transposed, scalings)


class CaseCache:
    """Builds each case, and each patched output, at most once per session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cases: dict[str, Case] = {}
        self._patched: dict[tuple[str, ...], tuple[Path, dict[str, Any]]] = {}

    def case(self, name: str) -> Case:
        if name not in self._cases:
            self._cases[name] = build_case(name, self.root / name)
        return self._cases[name]

    def patched(self, name: str, *extra: str) -> tuple[Path, dict[str, Any]]:
        """Patch the case (by default every defined layer selected: threshold 1); return (out, report)."""
        import json

        from helpers import run_cli

        from safelora_cli.report import REPORT_NAME

        key = (name, *extra)
        if key not in self._patched:
            case = self.case(name)
            out = self.root / f"{name}-patched-{len(self._patched)}"
            rule = () if "--top-k" in extra else ("--threshold", "1")
            result = run_cli("patch", "--base", case.base, "--aligned", case.aligned, "--adapter", case.adapter,
                             "--out", out, "--device", "cpu", "--quiet", *rule, *extra)
            assert result.exit_code == 0, result.stderr
            self._patched[key] = (out, json.loads((out / REPORT_NAME).read_text()))
        return self._patched[key]
