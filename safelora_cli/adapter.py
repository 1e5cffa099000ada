"""A PEFT LoRA adapter directory: its config, its tensors, and the grammar of its keys."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli import file_kind
from safelora_cli.adapter_config import (  # noqa: F401  (AdapterConfig and _pattern_value are re-exported)
    CONFIG_NAME,
    AdapterConfig,
    _pattern_value,
    parse_config,
    read_config,
)
from safelora_cli.adapter_tensors import AdapterTensors, PickledTensors, SafetensorsTensors
from safelora_cli.errors import InputError, UnsupportedError, format_keys

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

# On disk PEFT drops the adapter name: base_model.model.<module>.lora_A.weight. Embedding LoRA has
# no `.weight` suffix; DoRA adds one magnitude vector per module; lora_bias adds lora_B.bias.
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)
# Any key with one of these components is LoRA's; one the grammar above does not match would be
# skipped by PEFT on load, so it is refused rather than copied as an untouched tensor.
_LORA_PART = re.compile(r"(?:^|\.)(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.|$)")
_LORA_BIAS = re.compile(r"^base_model\.model\..+\.lora_B\.bias$")
PREFIX = "base_model.model."
# The dtypes the projection can compute in; LoRA factors in any other dtype are refused by name.
MATH_DTYPES = ("F32", "F16", "BF16", "F64")
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
class Adapter:
    """An adapter directory: its config, and its tensors read from the file when asked for.

    `tensors` reads each tensor from the weights file on every access and keeps none (see
    `adapter_tensors`: a large adapter need not fit in memory beside the weights). `path` is
    the directory holding the chosen adapter's files; `root` the directory the user passed and
    `name` the subfolder chosen with --adapter-name (PEFT saves a non-default adapter in a
    subfolder named after it).
    """

    path: Path
    config: AdapterConfig
    raw_config: dict[str, Any]
    tensors: AdapterTensors
    metadata: dict[str, str]
    modules: list[LoraModule]
    other_keys: list[str]
    root: Path | None = None
    name: str | None = None


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


def _refuse_misnamed(misnamed: list[str], where: Path) -> None:
    """LoRA tensors PEFT would not load (it only warns of "missing adapter keys" and keeps its own)."""
    if not misnamed:
        return
    bare = [key for key in misnamed if not key.startswith(PREFIX)]
    if bare:
        raise InputError(
            f"{where}: {len(bare)} LoRA tensor(s) lack the '{PREFIX}' prefix PEFT saves them with: "
            f"{format_keys(bare, 3)}; PeftModel.from_pretrained would not load them.",
            hint=f"Save the adapter with PeftModel.save_pretrained, or add '{PREFIX}' to the start of every key.",
        )
    raise InputError(
        f"{where}: {len(misnamed)} LoRA tensor(s) are not named as PEFT saves them "
        f"({PREFIX}<module>.lora_A.weight, .lora_B.weight, …): {format_keys(misnamed, 3)}.",
        hint="Save the adapter with PeftModel.save_pretrained (it removes the adapter name from the keys).",
    )


def split_keys(keys: list[str], where: Path) -> tuple[list[LoraModule], list[str]]:
    """Group LoRA keys by module; return the modules and every other key.

    Other keys (copied untouched) are full weights of `modules_to_save`, `*.base_layer.weight`
    copies of targeted embeddings and `lora_B.bias` (lora_bias=True). `where` is the weights file.

    Raises:
        InputError: when a LoRA key is not in PEFT's on-disk grammar (no `base_model.model.`
            prefix, an adapter name left in), a module has lora_A without lora_B (or the other
            way round), or no module has LoRA weights at all.
    """
    grouped: dict[str, dict[str, str]] = {}
    other, misnamed = [], []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match is not None:
            grouped.setdefault(match["module"], {})[_PART[match["part"]]] = key
        elif _LORA_PART.search(key) and not _LORA_BIAS.match(key):
            misnamed.append(key)
        else:
            other.append(key)
    _refuse_misnamed(sorted(misnamed), where)
    found = {m: _module_from_parts(m, parts, where) for m, parts in grouped.items()}
    incomplete = sorted(m for m, module in found.items() if module is None)
    if incomplete:
        raise InputError(f"{where.parent}: these modules lack lora_A or lora_B: {format_keys(incomplete)}.")
    modules = [module for module in found.values() if module is not None]
    if not modules:
        raise InputError(f"{where} holds no LoRA weights (no '*.lora_A.weight' keys).")
    return modules, sorted(other)


def check_dtypes(modules: list[LoraModule], dtypes: dict[str, str], where: Path) -> None:
    """LoRA factors and DoRA magnitudes must be in a dtype the math uses; checked from the header.

    Raises:
        InputError: naming the first tensor stored in another dtype (int, fp8, complex, …).
    """
    for module in modules:
        for key in (module.a_key, module.b_key, module.magnitude_key):
            if key is not None and dtypes[key] not in MATH_DTYPES:
                raise InputError(
                    f"{where}: {key} is stored as {dtypes[key]}; LoRA factors must be float32, float16, bfloat16 "
                    f"or float64 ({', '.join(MATH_DTYPES)}).",
                    hint="Save the adapter with its LoRA weights in one of those dtypes.",
                )


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


def _check_module(module: LoraModule, tensors: AdapterTensors, config: AdapterConfig, path: Path) -> None:
    """Shapes (from the header) and the config's rank; DoRA magnitudes present exactly when use_dora says so."""
    a, b = tensors.shape(module.a_key), tensors.shape(module.b_key)
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise InputError(
            f"{path}: {module.module} has lora_A {a} and lora_B {b}; "
            "expected (r, in) and (out, r) with the same r."
        )
    expected_rank = config.rank(module.module)
    if a[0] != expected_rank:
        raise InputError(
            f"{path}: {module.module} has rank {a[0]} but {CONFIG_NAME} gives it r = {expected_rank} "
            "(r / rank_pattern); PEFT could not load this adapter.",
            hint="Use the adapter_config.json that was saved with these weights.",
        )
    if config.use_dora and module.magnitude_key is None:
        raise InputError(f"{path} is a DoRA adapter (use_dora: true) but {module.module} has no lora_magnitude_vector.")
    if not config.use_dora and module.magnitude_key is not None:
        raise InputError(f"{path}: {module.module} has a DoRA lora_magnitude_vector but use_dora is false.")
    if module.magnitude_key is not None and tensors.shape(module.magnitude_key) != (b[0],):
        raise InputError(
            f"{path}: {module.module} has lora_magnitude_vector {tensors.shape(module.magnitude_key)}; "
            f"expected ({b[0]},), one entry per output row."
        )


def _refuse_tied_factors(config: AdapterConfig, modules: list[LoraModule], path: Path) -> None:
    """With ensure_weight_tying PEFT makes lm_head's LoRA factors views of the embedding's
    (lora_A = embedding Bᵀ, lora_B = embedding Aᵀ); projecting the two layers on their own would
    break that tie, and which copy PEFT loads last would decide the result."""
    if not config.ensure_weight_tying:
        return
    embedding = [m.module for m in modules if m.embedding]
    heads = [m.module for m in modules if m.module.rsplit(".", 1)[-1] == "lm_head"]
    if embedding and heads:
        raise UnsupportedError(
            f"{path} ties the LoRA factors of {heads[0]} to those of {embedding[0]} (ensure_weight_tying: true); "
            "projecting tied factors is not supported.",
            hint="Train the adapter without ensure_weight_tying, or without LoRA on the embedding or lm_head.",
        )


def _read_weights(path: Path) -> tuple[AdapterTensors, dict[str, str], list[LoraModule], list[str]]:
    """Tensors (read lazily), metadata, modules and other keys, from the header: no tensor data is read."""
    weights, legacy = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    file_kind.refuse_irregular(weights)
    file_kind.refuse_irregular(legacy)
    # Like PEFT: safetensors when both exist; the pickle only through weights_only loading.
    if weights.is_file() or legacy.is_file():
        tensors: AdapterTensors = SafetensorsTensors(weights) if weights.is_file() else PickledTensors(legacy)
        modules, other = split_keys(list(tensors), tensors.path)
        check_dtypes(modules, {key: tensors.dtype(key) for key in tensors}, tensors.path)
        tensors.check_loadable()
        return tensors, tensors.metadata, modules, other
    raise InputError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME}).")


def load_adapter(path: Path, name: str | None = None) -> Adapter:
    """Read an adapter directory: config, tensors (each in its own dtype) and metadata.

    `name` picks the subfolder of a directory where PEFT saved several named adapters.
    """
    root = path
    path = locate_adapter(root, name)
    raw = read_config(path)
    config = parse_config(raw, path)
    tensors, metadata, modules, other = _read_weights(path)
    for module in modules:
        _check_module(module, tensors, config, path)
    _refuse_tied_factors(config, modules, path)
    return Adapter(path, config, raw, tensors, metadata, modules, other, root=root,
                   name=name if path != root else None)
