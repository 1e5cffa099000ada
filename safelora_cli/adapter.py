"""A PEFT LoRA adapter directory: its config, its tensors, and the grammar of its keys."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import InputError, UnsupportedError, format_keys
from safelora_cli.safetensors_io import read_all_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

_PREFIX = "base_model.model."
# On disk PEFT drops the adapter name: base_model.model.<module>.lora_A.weight
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_embedding_": "embedding LoRA (lora_embedding_A/B)",
    "lora_magnitude_vector": "DoRA magnitude vectors",
    ".lora_B.bias": "LoRA biases (lora_bias=True)",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name as the model names it and its two tensors' keys."""

    module: str
    a_key: str
    b_key: str


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json that change the math or what we can handle."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's multiplier of B·A for `module`: α/r, or α/√r with rsLoRA."""
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rule for rank/alpha patterns: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), module):
            return value
    return default


@dataclass(frozen=True)
class Adapter:
    """An adapter directory loaded in memory (adapters are small)."""

    path: Path
    config: AdapterConfig
    raw_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[LoraModule]
    other_keys: list[str]


def read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise InputError(
            f"{path} is not a PEFT adapter directory: {CONFIG_NAME} not found.",
            hint="Pass the directory that PeftModel.save_pretrained wrote.",
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_path} is not valid JSON: {exc}.") from None
    except OSError as exc:
        raise InputError(f"Cannot read {config_path}: {exc.strerror}.") from None
    if not isinstance(raw, dict):
        raise InputError(f"{config_path} must hold a JSON object, found {type(raw).__name__}.")
    return raw


def parse_config(raw: dict[str, Any], where: Path) -> AdapterConfig:
    """Validate the adapter config; refuse variants whose patch we would get wrong."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{where / CONFIG_NAME} has peft_type {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be patched."
        )
    if raw.get("use_dora"):
        raise UnsupportedError(
            f"{where} is a DoRA adapter (use_dora: true); DoRA is not supported yet.",
        )
    if raw.get("fan_in_fan_out"):
        raise UnsupportedError(
            f"{where} uses fan_in_fan_out (GPT-2 style Conv1D layers); that layout is not supported yet."
        )
    if raw.get("target_parameters"):
        raise UnsupportedError(f"{where} targets parameters (target_parameters); that is not supported yet.")
    try:
        alpha_pattern = {str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()}
        config = AdapterConfig(
            r=int(raw.get("r", 8)),
            lora_alpha=float(raw.get("lora_alpha", 8)),
            use_rslora=bool(raw.get("use_rslora", False)),
            alpha_pattern=alpha_pattern,
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{where / CONFIG_NAME} has a malformed r, lora_alpha or alpha_pattern: {exc}.") from None
    _check_alpha(config, where)
    return config


def _check_alpha(config: AdapterConfig, where: Path) -> None:
    """Scalings must be finite and pattern keys valid regexes, or the math and the report break."""
    for key, value in [("lora_alpha", config.lora_alpha), *config.alpha_pattern.items()]:
        if not math.isfinite(value):
            raise InputError(f"{where / CONFIG_NAME}: alpha {value} for {key!r} is not a finite number.")
    for key in config.alpha_pattern:
        try:
            re.compile(_pattern_regex(key))
        except re.error as exc:
            raise InputError(f"{where / CONFIG_NAME}: alpha_pattern key {key!r} is not a valid regex ({exc}).",
                             hint="Keys are regexes matched against the end of module names.") from None


def split_keys(keys: list[str], where: Path) -> tuple[list[LoraModule], list[str]]:
    """Group lora_A/lora_B keys by module; return the modules and every other key.

    Raises:
        UnsupportedError: for LoRA variants this tool does not handle yet.
        InputError: when a module has lora_A without lora_B or the other way round.
    """
    for marker, what in _UNSUPPORTED_KEYS.items():
        hits = [k for k in keys if marker in k]
        if hits:
            raise UnsupportedError(f"{where} contains {what} ({format_keys(hits, 2)}); not supported yet.")
    halves: dict[str, dict[str, str]] = {}
    other = []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match is None:
            other.append(key)
            continue
        halves.setdefault(match["module"], {})[match["ab"]] = key
    incomplete = sorted(m for m, h in halves.items() if len(h) != 2)
    if incomplete:
        raise InputError(f"{where}: these modules lack lora_A or lora_B: {format_keys(incomplete)}.")
    modules = [LoraModule(m, h["A"], h["B"]) for m, h in halves.items()]
    if not modules:
        raise InputError(f"{where / WEIGHTS_NAME} holds no LoRA weights (no '*.lora_A.weight' keys).")
    return modules, sorted(other)


def load_adapter(path: Path) -> Adapter:
    """Read an adapter directory: config, tensors (each in its own dtype) and metadata."""
    if not path.exists():
        raise InputError(f"Adapter path {path} does not exist.")
    if not path.is_dir():
        raise InputError(f"Adapter path {path} is not a directory.", hint="Pass the adapter's directory.")
    raw = read_config(path)
    config = parse_config(raw, path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        if (path / LEGACY_WEIGHTS_NAME).is_file():
            raise UnsupportedError(
                f"{path} holds {LEGACY_WEIGHTS_NAME} only; pickled adapters are not supported yet.",
                hint="Re-save it with PeftModel.save_pretrained(..., safe_serialization=True).",
            )
        raise InputError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
    tensors, metadata = read_all_tensors(weights)
    modules, other = split_keys(list(tensors), path)
    for module in modules:
        a, b = tensors[module.a_key], tensors[module.b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(
                f"{path}: {module.module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected (r, in) and (out, r) with the same r."
            )
        if not a.is_floating_point() or not b.is_floating_point():
            raise InputError(f"{path}: {module.module} has non-floating-point LoRA weights ({a.dtype}, {b.dtype}).")
    return Adapter(path, config, raw, tensors, metadata, modules, other)


def module_of(key: str) -> str:
    """The model's name for an adapter key's module (drops PEFT's wrapper prefix)."""
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
