"""adapter_config.json read as PEFT writes it: every field we use checked for its JSON type.

PEFT serialises `LoraConfig` with `json.dumps`, so booleans are JSON booleans, ranks JSON
integers and alphas JSON numbers. Python's own coercions would misread anything else without a
word (`bool("false")` is True, `int(2.5)` is 2), so each field is checked for the type PEFT
writes and a mismatch is refused with the field, the value found and the type expected.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safelora_cli import file_kind
from safelora_cli.errors import InputError, UnsupportedError

CONFIG_NAME = "adapter_config.json"
# LoraConfig's `bool` fields (peft 0.21). PEFT never writes null or a string for them.
BOOLEAN_FIELDS = ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "ensure_weight_tying",
                  "inference_mode", "use_qalora")


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
    ensure_weight_tying: bool = False

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


def describe(value: object) -> str:
    """A JSON value as a message names it: `the string "false"`, `the number 2.5`, `null`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        text = str(value) if value.bit_length() <= 64 else f"{str(value)[:12]}… ({len(str(value))} digits)"
        return f"the number {text}"
    if isinstance(value, float):
        text = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return f"the number {value!r}" if math.isfinite(value) else f"the number {text}"
    if isinstance(value, str):
        shown = json.dumps(value if len(value) <= 40 else value[:40] + "…", ensure_ascii=False)
        return f"the string {shown}"
    return "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__


def _bad(where: Path, name: str, expected: str, value: object) -> InputError:
    return InputError(f"{where / CONFIG_NAME}: {name} must be {expected}, found {describe(value)}.",
                      hint=f"PEFT writes {expected} here; fix the field or save the config again.")


def _boolean(raw: dict[str, Any], name: str, where: Path) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise _bad(where, name, "true or false", value)
    return value


def _rank(value: object, name: str, where: Path) -> int:
    """A positive JSON integer. 8.0 is refused too: PEFT would build nn.Linear(in, 8.0) and fail."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(where, name, "a positive whole number", value)
    return value


def _alpha(value: object, name: str, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(where, name, "a finite number", value)
    return float(value)


def _patterns(raw: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
    """A JSON object (null and absent mean none) whose keys compile as PEFT's pattern regexes."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(where, name, "an object mapping module-name patterns to values", value)
    for key in value:
        try:
            re.compile(_pattern_regex(key))
        except (re.error, RecursionError, OverflowError) as exc:
            raise InputError(f"{where / CONFIG_NAME}: {name} key {key!r} is not a valid regex ({exc}).",
                             hint="Keys are regexes matched against the end of module names.") from None
    return value


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object of `path`/adapter_config.json."""
    config_path = path / CONFIG_NAME
    file_kind.refuse_irregular(config_path)
    if not config_path.is_file():
        raise InputError(
            f"{path} is not a PEFT adapter directory: {CONFIG_NAME} not found.",
            hint="Pass the directory that PeftModel.save_pretrained wrote.",
        )
    try:
        raw = json.loads(config_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{config_path} is not valid JSON: {str(exc)[:200]}.") from None
    except PermissionError:
        raise InputError(f"Permission denied reading {config_path}.") from None
    except OSError as exc:
        raise InputError(f"Cannot read {config_path}: {exc.strerror}.") from None
    if not isinstance(raw, dict):
        raise InputError(f"{config_path} must hold a JSON object, found {type(raw).__name__}.")
    return raw


def _refuse_unsupported(raw: dict[str, Any], where: Path) -> None:
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


def parse_config(raw: dict[str, Any], where: Path) -> AdapterConfig:
    """Validate the adapter config; refuse variants whose patch we would get wrong.

    Absent fields take LoraConfig's defaults (r 8, lora_alpha 8, booleans false, no patterns).

    Raises:
        UnsupportedError: for non-LoRA adapters and MoE `target_parameters`.
        InputError: for a field of the wrong JSON type, a rank below 1, a non-finite alpha or a
            pattern key that is not a regex.
    """
    _refuse_unsupported(raw, where)
    flags = {name: _boolean(raw, name, where) for name in BOOLEAN_FIELDS}
    ranks = _patterns(raw, "rank_pattern", where)
    alphas = _patterns(raw, "alpha_pattern", where)
    return AdapterConfig(
        r=_rank(raw.get("r", 8), "r", where),
        lora_alpha=_alpha(raw.get("lora_alpha", 8), "lora_alpha", where),
        use_rslora=flags["use_rslora"],
        alpha_pattern={k: _alpha(v, f"alpha_pattern[{k!r}]", where) for k, v in alphas.items()},
        rank_pattern={k: _rank(v, f"rank_pattern[{k!r}]", where) for k, v in ranks.items()},
        use_dora=flags["use_dora"],
        fan_in_fan_out=flags["fan_in_fan_out"],
        ensure_weight_tying=flags["ensure_weight_tying"],
    )
