"""Adapter module name → checkpoint tensor name.

The plain rule is `<module>.weight`. Checkpoints do not always use the names the model uses in
memory, so a fixed, ordered list of candidates is built for every module:

1. the user's `--key-map REGEX=REPLACEMENT` rules, applied in order to the module name;
2. `<module>.weight`;
3. the names transformers v5 writes on disk for modules it renames in memory (vision-language
   models: `model.language_model.…` is saved as `language_model.model.…` or `model.…`);
4. the name without its first component (`transformer.h.0…` saved as `h.0…` by older GPT-2 and
   Bloom checkpoints, or a checkpoint of the bare backbone);
5. only when none of these exists and the model's config.json ties the output layer to the input
   embedding: the input embedding, for `lm_head`.

More than one candidate present in a checkpoint is an error: a name is never guessed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from safelora_cli.errors import PairingError, UsageError, format_keys

# transformers v5 keeps the legacy layout on disk for these models; (in-memory prefix, on-disk prefix).
_LEGACY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),  # Llava, Mistral3, Gemma3, PaliGemma…
    ("model.language_model.", "model."),  # Qwen2-VL, Qwen2.5-VL
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.visual.", "visual."),
    ("lm_head", "language_model.lm_head"),
)
# The wrapper component a backbone-only or older checkpoint lacks (GPT-2/Bloom `transformer.`).
_DROPPABLE_PREFIX = re.compile(r"^(?:transformer|model)\.")
_OUTPUT_LAYER = re.compile(r"(?:^|\.)lm_head$")
_INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in)\.weight$")
MODEL_CONFIG = "config.json"


@dataclass(frozen=True)
class KeyRule:
    """One `--key-map` rule: `re.sub(pattern, replacement, module)`."""

    pattern: re.Pattern[str]
    replacement: str


def parse_key_map(specs: tuple[str, ...] | list[str]) -> tuple[KeyRule, ...]:
    """Parse `REGEX=REPLACEMENT` strings (the first `=` splits them).

    Raises:
        UsageError: for a spec without `=`, with an empty regex, or with an invalid regex.
    """
    rules = []
    for spec in specs:
        pattern, sep, replacement = spec.partition("=")
        if not sep or not pattern:
            raise UsageError(f"--key-map {spec!r} must look like REGEX=REPLACEMENT, e.g. '^transformer\\.='.")
        try:
            compiled = re.compile(pattern)
            compiled.sub(replacement, "")  # a bad back-reference in the replacement fails here
        except (re.error, IndexError, OverflowError, RecursionError) as exc:
            # IndexError: a \g<name> the pattern does not define ("unknown group name 'x'").
            raise UsageError(f"--key-map {spec!r}: invalid regular expression or replacement ({exc}).") from None
        rules.append(KeyRule(compiled, replacement))
    return tuple(rules)


def apply_key_map(module: str, rules: tuple[KeyRule, ...]) -> str:
    """The module name after every rule, in the order given."""
    for rule in rules:
        module = rule.pattern.sub(rule.replacement, module)
    return module


def name_candidates(module: str) -> list[str]:
    """Checkpoint keys that may hold `module`'s weight, in the fixed order of the module docstring."""
    names = [module]
    for memory, disk in _LEGACY_PREFIXES:
        if module == memory or (memory.endswith(".") and module.startswith(memory)):
            names.append(disk + module[len(memory):])
    dropped = _DROPPABLE_PREFIX.sub("", module, count=1)
    if dropped != module:
        names.append(dropped)
    return list(dict.fromkeys(f"{name}.weight" for name in names))


def is_output_layer(module: str) -> bool:
    """`lm_head` (or a module ending in it), which a tied checkpoint may store as the input embedding."""
    return _OUTPUT_LAYER.search(module) is not None


def is_input_embedding(key: str) -> bool:
    return _INPUT_EMBEDDING.search(key) is not None


def ties_embeddings(root: Path) -> bool:
    """Whether the checkpoint's config.json ties the output layer to the input embedding.

    transformers writes `tie_word_embeddings` at the top level or, for multimodal models, in
    `text_config`. A missing or unreadable config means no: then nothing is inferred.
    """
    try:
        config = json.loads((root / MODEL_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(config, dict):
        return False
    text = config.get("text_config")
    for section in (config, text if isinstance(text, dict) else {}):
        if isinstance(section.get("tie_word_embeddings"), bool):
            return bool(section["tie_word_embeddings"])
    return False


@dataclass(frozen=True)
class Resolution:
    """Where one module's weight lives in one checkpoint; `key` is None when nowhere."""

    key: str | None
    tried: list[str]


def resolve_key(module: str, keys: Collection[str], root: Path, label: str) -> Resolution:
    """Find the single checkpoint key holding `module`'s weight.

    Args:
        module: the adapter's module name, after `--key-map`.
        keys: the tensor names of the checkpoint.
        root: the checkpoint directory (for config.json).
        label: 'base' or 'aligned', for messages.

    Raises:
        PairingError: when more than one candidate is present (ambiguous).
    """
    tried = name_candidates(module)
    found = [k for k in tried if k in keys]
    if not found and _OUTPUT_LAYER.search(module) and ties_embeddings(root):
        tied = sorted(k for k in keys if _INPUT_EMBEDDING.search(k))
        tried = [*tried, "the tied input embedding (*embed_tokens.weight, *wte.weight, …)"]
        found = tied
    if len(found) > 1:
        raise PairingError(
            f"{module} is ambiguous in the {label} model: it holds {format_keys(found)}.",
            hint="Say which with --key-map 'REGEX=REPLACEMENT' (applied to the module name).",
        )
    return Resolution(found[0] if found else None, tried)
