"""Pair each adapted module with its base and aligned weight, by name only."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from safelora_cli.adapter import Adapter, LoraModule
from safelora_cli.checkpoint import Checkpoint, refuse_quantized
from safelora_cli.errors import PairingError, format_keys
from safelora_cli.naming import (
    KeyRule,
    apply_key_map,
    is_input_embedding,
    is_output_layer,
    name_candidates,
    resolve_key,
)

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class LayerPlan:
    """One layer to analyse: names of its tensors, the shape (out, in) of B·A and its LoRA scaling."""

    module: str
    layer_index: int | None
    a_key: str
    b_key: str
    weight_key: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    # The checkpoint stores this weight as (in, out) relative to B·A (GPT-2 Conv1D, embeddings):
    # V is transposed before use.
    transposed: bool = False
    # DoRA: the magnitude vector to recompute when B is projected.
    magnitude_key: str | None = None


def layer_index(module: str) -> int | None:
    """The transformer block number in a module name (`model.layers.12.mlp.up_proj` → 12)."""
    match = _LAYER_INDEX.search(f".{module}.")
    return int(match.group(1)) if match else None


def layer_order_key(module: str) -> list[object]:
    """Natural order of module names: layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(module)]


def stored_transposed(module: LoraModule, stored: tuple[int, ...], update: tuple[int, int],
                      fan_in_fan_out: bool) -> bool | None:
    """Whether the checkpoint stores the weight as the transpose of B·A (shape `update`, (out, in)).

    Embeddings are stored (vocab, dim) while their B·A is (dim, vocab). GPT-2's Conv1D stores
    (in, out); PEFT marks adapters on it with fan_in_fan_out (and clears the flag for plain Linear
    layers), so with the flag a weight is transposed when its shape says so, and a square weight,
    which cannot say, follows the flag. None: the stored shape fits neither layout.
    """
    flipped = (update[1], update[0])
    if module.embedding:
        return True if stored == flipped else None
    if stored == update == flipped:
        return fan_in_fan_out
    if stored == update:
        return False
    return True if stored == flipped and fan_in_fan_out else None


@dataclass(frozen=True)
class _Found:
    """One module's weight key in both checkpoints, or what was tried when it is missing."""

    key: str | None
    missing: dict[str, list[str]]


def _find_weight(name: str, base: Checkpoint, aligned: Checkpoint) -> _Found:
    found = {c.label: resolve_key(name, c.tensors, c.root, c.label) for c in (base, aligned)}
    missing = {label: r.tried for label, r in found.items() if r.key is None}
    if missing:
        return _Found(None, missing)
    base_key, aligned_key = found[base.label].key, found[aligned.label].key
    if base_key != aligned_key:
        raise PairingError(
            f"{name} is stored as {base_key} in the base model but as {aligned_key} in the aligned model.",
            hint="Use base and aligned checkpoints saved in the same layout.",
        )
    return _Found(base_key, {})


def _unpaired_error(label: str, misses: list[tuple[str, list[str]]]) -> PairingError:
    module, tried = misses[0]
    return PairingError(
        f"{len(misses)} adapted module(s) have no weight in the {label} model: "
        f"{format_keys([t[0] for _, t in misses])}; names tried for {module}: {', '.join(tried)}.",
        hint="Check that --base and --aligned are the models this adapter was trained on, or map names "
        "with --key-map 'REGEX=REPLACEMENT' (applied to the module name).",
    )


def needed_weight_keys(adapter: Adapter, key_map: tuple[KeyRule, ...], listed: Collection[str]) -> set[str]:
    """The names of `listed` (a checkpoint index) that `pair_layers` may use for `adapter`.

    What a Hub checkpoint must supply: only the shards holding these are downloaded.
    """
    wanted: set[str] = set()
    for module in adapter.modules:
        name = apply_key_map(module.module, key_map)
        wanted.update(name_candidates(name))
        if is_output_layer(name):  # may resolve to the tied input embedding
            wanted.update(k for k in listed if is_input_embedding(k))
    return wanted & set(listed)


def pair_layers(adapter: Adapter, base: Checkpoint, aligned: Checkpoint,
                key_map: tuple[KeyRule, ...] = ()) -> list[LayerPlan]:
    """Match every adapter module to its weight in both checkpoints (see `naming`), in layer order.

    Raises:
        PairingError: listing modules absent from a checkpoint (with the names tried), ambiguous
            names, and any shape disagreement between base, aligned and the LoRA factors.
    """
    plans: list[LayerPlan] = []
    unpaired: dict[str, list[tuple[str, list[str]]]] = {base.label: [], aligned.label: []}
    mismatched: list[str] = []
    for module in sorted(adapter.modules, key=lambda m: layer_order_key(m.module)):
        name = apply_key_map(module.module, key_map)
        for model in (base, aligned):  # before "unpaired": GPTQ/AWQ store `qweight`, not `weight`
            refuse_quantized(model, f"{name}.weight")
        found = _find_weight(name, base, aligned)
        for label, tried in found.missing.items():
            unpaired[label].append((module.module, tried))
        if found.key is None:
            continue
        key = found.key
        refuse_quantized(base, key)
        refuse_quantized(aligned, key)
        # From the header: pairing reads no tensor data.
        a_shape, b_shape = adapter.tensors.shape(module.a_key), adapter.tensors.shape(module.b_key)
        update = (int(b_shape[0]), int(a_shape[1]))
        base_shape, aligned_shape = base.tensors[key].shape, aligned.tensors[key].shape
        transposed = stored_transposed(module, base_shape, update, adapter.config.fan_in_fan_out)
        if base_shape != aligned_shape or transposed is None:
            mismatched.append(f"{key}: base {base_shape}, aligned {aligned_shape}, LoRA B·A {update}")
            continue
        rank = int(a_shape[0])
        plans.append(LayerPlan(
            module=module.module, layer_index=layer_index(module.module), a_key=module.a_key,
            b_key=module.b_key, weight_key=key, shape=update, rank=rank,
            scaling=adapter.config.scaling(module.module, rank), transposed=transposed,
            magnitude_key=module.magnitude_key,
        ))
    for label, misses in unpaired.items():
        if misses:
            raise _unpaired_error(label, misses)
    if mismatched:
        raise PairingError(f"Shapes disagree for {len(mismatched)} module(s): {'; '.join(mismatched[:3])}.")
    return plans
