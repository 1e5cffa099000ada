"""Pair each adapted module with its base and aligned weight, by name only."""

from __future__ import annotations

import re
from dataclasses import dataclass

from safelora_cli.adapter import Adapter
from safelora_cli.checkpoint import Checkpoint, refuse_quantized
from safelora_cli.errors import PairingError, format_keys

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class LayerPlan:
    """One layer to analyse: names of its four tensors and its LoRA scaling."""

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


def layer_index(module: str) -> int | None:
    """The transformer block number in a module name (`model.layers.12.mlp.up_proj` → 12)."""
    match = _LAYER_INDEX.search(f".{module}.")
    return int(match.group(1)) if match else None


def layer_order_key(module: str) -> list[object]:
    """Natural order of module names: layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(module)]


def weight_key(module: str) -> str:
    """The checkpoint tensor holding the weight of an adapted module."""
    return f"{module}.weight"


def needed_weight_keys(adapter: Adapter) -> set[str]:
    """Every checkpoint tensor `pair_layers` will look up: what must be fetched from the Hub."""
    return {weight_key(m.module) for m in adapter.modules}


def pair_layers(adapter: Adapter, base: Checkpoint, aligned: Checkpoint) -> list[LayerPlan]:
    """Match every adapter module to `<module>.weight` in both checkpoints, in layer order.

    Raises:
        PairingError: listing modules absent from a checkpoint, and any shape disagreement
            between base, aligned and the LoRA factors.
    """
    plans: list[LayerPlan] = []
    unpaired: dict[str, list[str]] = {"base": [], "aligned": []}
    mismatched: list[str] = []
    for module in sorted(adapter.modules, key=lambda m: layer_order_key(m.module)):
        key = weight_key(module.module)
        # Before "unpaired": a quantized layout may store the module without `<module>.weight`.
        refuse_quantized(base, key)
        refuse_quantized(aligned, key)
        infos = {"base": base.info(key), "aligned": aligned.info(key)}
        for label, info in infos.items():
            if info is None:
                unpaired[label].append(key)
        base_info, aligned_info = infos["base"], infos["aligned"]
        if base_info is None or aligned_info is None:
            continue
        a = adapter.tensors[module.a_key]
        b = adapter.tensors[module.b_key]
        expected = (b.shape[0], a.shape[1])
        if base_info.shape != aligned_info.shape or base_info.shape != expected:
            mismatched.append(
                f"{key}: base {base_info.shape}, aligned {aligned_info.shape}, LoRA B·A {expected}"
            )
            continue
        rank = a.shape[0]
        plans.append(
            LayerPlan(
                module=module.module,
                layer_index=layer_index(module.module),
                a_key=module.a_key,
                b_key=module.b_key,
                weight_key=key,
                shape=(int(expected[0]), int(expected[1])),
                rank=int(rank),
                scaling=adapter.config.scaling(module.module, int(rank)),
            )
        )
    for label, keys in unpaired.items():
        if keys:
            raise PairingError(
                f"{len(keys)} adapted module(s) have no weight in the {label} model: {format_keys(keys)}.",
                hint="Check that --base and --aligned are the models this adapter was trained on.",
            )
    if mismatched:
        raise PairingError(f"Shapes disagree for {len(mismatched)} module(s): {'; '.join(mismatched[:3])}.")
    return plans
