"""A PEFT LoRA adapter directory: its config, its tensors, and the grammar of its keys."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safelora_cli import pickled_io
from safelora_cli.errors import InputError, UnsupportedError, format_keys
from safelora_cli.safetensors_io import read_all_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

# On disk PEFT drops the adapter name: base_model.model.<module>.lora_A.weight. Embedding LoRA has
# no `.weight` suffix; DoRA adds one magnitude vector per module; lora_bias adds lora_B.bias.
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)
_PART = {
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "eA", "lora_embedding_B": "eB",
    "lora_magnitude_vector": "m",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name as the model names it and its tensors' keys.

    `embedding` marks lora_embedding_A (r, vocab) / lora_embedding_B (dim, r): the update B·A is
    (dim, vocab), the transpose of the stored (vocab, dim) weight. `magnitude_key` is DoRA's
    per-output-row magnitude vector, shape (out,).
    """

    module: str
    a_key: str
    b_key: str
    embedding: bool = False
    magnitude_key: str | None = None


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json that change the math or what we can handle."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    use_dora: bool = False
    fan_in_fan_out: bool = False

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's multiplier of B·A for `module`: α/r, or α/√r with rsLoRA."""
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def rank(self, module: str) -> int:
        """The rank PEFT gives `module` when it builds the layer (and so expects on load)."""
        return int(_pattern_value(self.rank_pattern, module, self.r))


def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for rank/alpha patterns (peft.utils.other.get_pattern_key): the first key, in the
    file's order, that matches `(.*\\.)?(key)$` from the start of the module name wins."""
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), module):
            return value
    return default


@dataclass(frozen=True)
class Adapter:
    """An adapter directory loaded in memory (adapters are small).

    `path` is the directory holding the chosen adapter's files; `root` the directory the user
    passed and `name` the subfolder chosen with --adapter-name (PEFT saves a non-default adapter
    in a subfolder named after it).
    """

    path: Path
    config: AdapterConfig
    raw_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[LoraModule]
    other_keys: list[str]
    root: Path | None = None
    name: str | None = None


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
    """Validate the adapter config; refuse variants whose patch we would get wrong.

    Raises:
        UnsupportedError: for non-LoRA adapters and MoE `target_parameters`.
        InputError: for malformed numbers or patterns.
    """
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{where / CONFIG_NAME} has peft_type {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be patched."
        )
    if raw.get("target_parameters"):
        raise UnsupportedError(
            f"{where} adapts parameters directly (target_parameters: {raw['target_parameters']}), e.g. MoE expert "
            "tensors; their LoRA layout differs between PEFT versions, so they are refused rather than "
            "sliced per expert on a guess.",
            hint="Adapters on linear layers (target_modules) can be patched; retrain without target_parameters.",
        )
    try:
        config = AdapterConfig(
            r=int(raw.get("r", 8)),
            lora_alpha=float(raw.get("lora_alpha", 8)),
            use_rslora=bool(raw.get("use_rslora", False)),
            alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
            use_dora=bool(raw.get("use_dora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            f"{where / CONFIG_NAME} has a malformed r, lora_alpha, rank_pattern or alpha_pattern: {exc}."
        ) from None
    _check_patterns(config, where)
    return config


def _check_patterns(config: AdapterConfig, where: Path) -> None:
    """Scalings must be finite and pattern keys valid regexes, or the math and the report break."""
    for key, value in [("lora_alpha", config.lora_alpha), *config.alpha_pattern.items()]:
        if not math.isfinite(value):
            raise InputError(f"{where / CONFIG_NAME}: alpha {value} for {key!r} is not a finite number.")
    for field_name, patterns in (("alpha_pattern", config.alpha_pattern), ("rank_pattern", config.rank_pattern)):
        for key in patterns:
            try:
                re.compile(_pattern_regex(key))
            except re.error as exc:
                raise InputError(f"{where / CONFIG_NAME}: {field_name} key {key!r} is not a valid regex ({exc}).",
                                 hint="Keys are regexes matched against the end of module names.") from None


def _module_from_parts(module: str, parts: dict[str, str], where: Path) -> LoraModule | None:
    """The module's keys, or None when one of its two LoRA factors is missing."""
    linear = "A" in parts or "B" in parts
    embedding = "eA" in parts or "eB" in parts
    if linear and embedding:
        raise InputError(f"{where}: {module} has both lora_A/lora_B and lora_embedding_A/B tensors.")
    a, b = ("eA", "eB") if embedding else ("A", "B")
    if a not in parts or b not in parts:
        return None
    return LoraModule(module, parts[a], parts[b], embedding=embedding, magnitude_key=parts.get("m"))


def split_keys(keys: list[str], where: Path) -> tuple[list[LoraModule], list[str]]:
    """Group LoRA keys by module; return the modules and every other key.

    Other keys (copied untouched) are full weights of `modules_to_save`, `*.base_layer.weight`
    copies of targeted embeddings and `lora_B.bias` (lora_bias=True).

    Raises:
        InputError: when a module has lora_A without lora_B (or the other way round), or no
            module has LoRA weights at all.
    """
    grouped: dict[str, dict[str, str]] = {}
    other = []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match is None:
            other.append(key)
            continue
        grouped.setdefault(match["module"], {})[_PART[match["part"]]] = key
    found = {m: _module_from_parts(m, parts, where) for m, parts in grouped.items()}
    incomplete = sorted(m for m, module in found.items() if module is None)
    if incomplete:
        raise InputError(f"{where}: these modules lack lora_A or lora_B: {format_keys(incomplete)}.")
    modules = [module for module in found.values() if module is not None]
    if not modules:
        raise InputError(f"{where / WEIGHTS_NAME} holds no LoRA weights (no '*.lora_A.weight' keys).")
    return modules, sorted(other)


def named_adapters(path: Path) -> list[str]:
    """Names of the adapters PEFT saved in subfolders of `path` (one per non-default adapter)."""
    try:
        return sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    except OSError:
        return []


def locate_adapter(path: Path, name: str | None) -> Path:
    """The directory holding the adapter to patch: `path`, or its subfolder `name`.

    Raises:
        InputError: when `name` is not one of the adapters in `path`, or when `path` holds no
            top-level adapter but named ones (the message lists them).
    """
    if not path.exists():
        raise InputError(f"Adapter path {path} does not exist.")
    if not path.is_dir():
        raise InputError(f"Adapter path {path} is not a directory.", hint="Pass the adapter's directory.")
    names = named_adapters(path)
    if name is not None:
        if name in names and name not in (".", ".."):
            return path / name
        # PEFT saves the adapter called "default" at the top level, not in a subfolder.
        if name == "default" and (path / CONFIG_NAME).is_file():
            return path
        found = [*(["default"] if (path / CONFIG_NAME).is_file() else []), *names]
        raise InputError(
            f"{path} holds no adapter named {name!r}; found: {', '.join(found) or 'none'}.",
            hint="Pass one of those names to --adapter-name.",
        )
    if not (path / CONFIG_NAME).is_file() and names:
        raise InputError(
            f"{path} has no top-level {CONFIG_NAME}; it holds the named adapters {', '.join(names)}.",
            hint="Choose one with --adapter-name NAME.",
        )
    return path


def _check_module(module: LoraModule, tensors: dict[str, torch.Tensor], config: AdapterConfig, path: Path) -> None:
    """Shapes, dtypes and the config's rank; DoRA magnitudes present exactly when use_dora says so."""
    a, b = tensors[module.a_key], tensors[module.b_key]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise InputError(
            f"{path}: {module.module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
            "expected (r, in) and (out, r) with the same r."
        )
    if not a.is_floating_point() or not b.is_floating_point():
        raise InputError(f"{path}: {module.module} has non-floating-point LoRA weights ({a.dtype}, {b.dtype}).")
    expected_rank = config.rank(module.module)
    if a.shape[0] != expected_rank:
        raise InputError(
            f"{path}: {module.module} has rank {a.shape[0]} but {CONFIG_NAME} gives it r = {expected_rank} "
            "(r / rank_pattern); PEFT could not load this adapter.",
            hint="Use the adapter_config.json that was saved with these weights.",
        )
    if config.use_dora and module.magnitude_key is None:
        raise InputError(f"{path} is a DoRA adapter (use_dora: true) but {module.module} has no lora_magnitude_vector.")
    if not config.use_dora and module.magnitude_key is not None:
        raise InputError(f"{path}: {module.module} has a DoRA lora_magnitude_vector but use_dora is false.")
    if module.magnitude_key is not None and tuple(tensors[module.magnitude_key].shape) != (b.shape[0],):
        raise InputError(
            f"{path}: {module.module} has lora_magnitude_vector {tuple(tensors[module.magnitude_key].shape)}; "
            f"expected ({b.shape[0]},), one entry per output row."
        )


def _refuse_tied_factors(raw: dict[str, Any], modules: list[LoraModule], path: Path) -> None:
    """With ensure_weight_tying PEFT makes lm_head's LoRA factors views of the embedding's
    (lora_A = embedding Bᵀ, lora_B = embedding Aᵀ); projecting the two layers on their own would
    break that tie, and which copy PEFT loads last would decide the result."""
    if not raw.get("ensure_weight_tying"):
        return
    embedding = [m.module for m in modules if m.embedding]
    heads = [m.module for m in modules if m.module.rsplit(".", 1)[-1] == "lm_head"]
    if embedding and heads:
        raise UnsupportedError(
            f"{path} ties the LoRA factors of {heads[0]} to those of {embedding[0]} (ensure_weight_tying: true); "
            "projecting tied factors is not supported.",
            hint="Train the adapter without ensure_weight_tying, or without LoRA on the embedding or lm_head.",
        )


def load_adapter(path: Path, name: str | None = None) -> Adapter:
    """Read an adapter directory: config, tensors (each in its own dtype) and metadata.

    `name` picks the subfolder of a directory where PEFT saved several named adapters.
    """
    root = path
    path = locate_adapter(root, name)
    raw = read_config(path)
    config = parse_config(raw, path)
    weights, legacy = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    # Like PEFT: safetensors when both exist; the pickle only through weights_only loading.
    if weights.is_file():
        tensors, metadata = read_all_tensors(weights)
    elif legacy.is_file():
        tensors, metadata = pickled_io.read_all_tensors(legacy), {}
    else:
        raise InputError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME}).")
    modules, other = split_keys(list(tensors), path)
    for module in modules:
        _check_module(module, tensors, config, path)
    _refuse_tied_factors(raw, modules, path)
    return Adapter(path, config, raw, tensors, metadata, modules, other, root=root,
                   name=name if path != root else None)
