"""The stages in order: resolve inputs → index → pair → stream and compute → select → write.

This is the only module that knows the order. Each stage lives in its own module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from safelora_cli.adapter import Adapter, load_adapter
from safelora_cli.checkpoint import Checkpoint, TensorStream, open_checkpoint
from safelora_cli.config import RunConfig
from safelora_cli.dora import recompute_magnitudes
from safelora_cli.errors import InputError, SafeLoraError
from safelora_cli.naming import parse_key_map
from safelora_cli.pairing import LayerPlan, pair_layers
from safelora_cli.projection import LayerMath, alignment_matrix, analyze_with_v
from safelora_cli.selection import select
from safelora_cli.sources import resolve_local

OnLayer = Callable[[int, int], None]  # (layers done, layers in all)


@dataclass(frozen=True)
class LayerResult:
    plan: LayerPlan
    math: LayerMath
    selected: bool


@dataclass(frozen=True)
class Analysis:
    """Everything a report or a writer needs.

    `patched_b` maps adapter keys to their replacements: lora_B of the selected layers, and the
    recomputed DoRA magnitude vectors of those layers (see `dora`).
    """

    config: RunConfig
    adapter: Adapter
    base: Checkpoint
    aligned: Checkpoint
    device: str
    layers: list[LayerResult]
    patched_b: dict[str, torch.Tensor]


def resolve_device(spec: str) -> torch.device:
    """`auto` → the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SafeLoraError(f"Unknown device {spec!r}.", hint="Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SafeLoraError(f"--device {spec} was asked for but no CUDA device is available.",
                                hint="Use --device cpu or --device auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SafeLoraError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) exist.")
    elif device.type != "cpu":
        raise SafeLoraError(f"Device type {device.type!r} is not supported.", hint="Use auto, cpu or cuda[:N].")
    return device


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{name} in {where} contains NaN or Inf values.",
                             hint="The file is corrupted or the training diverged; use a clean copy.")


@dataclass(frozen=True)
class _Inputs:
    adapter: Adapter
    base: Checkpoint
    aligned: Checkpoint


def _analyze_one(plan: LayerPlan, inputs: _Inputs, stream: TensorStream, config: RunConfig,
                 device: torch.device) -> LayerMath:
    adapter, base, aligned = inputs.adapter, inputs.base, inputs.aligned
    lora_a, lora_b = adapter.tensors[plan.a_key], adapter.tensors[plan.b_key]
    _check_finite({plan.a_key: lora_a, plan.b_key: lora_b}, f"the adapter {adapter.path}")
    w_base = stream.read(base, plan.weight_key)
    w_aligned = stream.read(aligned, plan.weight_key)
    v = alignment_matrix(w_base, w_aligned, device)
    if plan.transposed:
        v = v.T
    v_norm = float(torch.linalg.vector_norm(v))
    if not math.isfinite(v_norm):
        # Any NaN/Inf in either weight makes ‖V‖ non-finite; only then pay for finding which.
        _check_finite({plan.weight_key: w_base}, f"the base model {base.root}")
        _check_finite({plan.weight_key: w_aligned}, f"the aligned model {aligned.root}")
        raise InputError(f"W_aligned − W_base overflows float32 for {plan.weight_key}.")
    del w_base, w_aligned
    result = analyze_with_v(v, v_norm, lora_a, lora_b, config.projection)
    if result.projected_b is not None:
        # Keep C·B in the adapter's own dtype on the host: never more memory than the adapter.
        result = replace(result, projected_b=result.projected_b.to("cpu", lora_b.dtype).contiguous())
    return result


def analyze(config: RunConfig, on_layer: OnLayer | None = None) -> Analysis:
    """Compute every adapted layer's similarity and the patched B of the selected ones."""
    adapter = load_adapter(resolve_local(config.adapter, "adapter"), config.adapter_name)
    base = open_checkpoint(resolve_local(config.base, "base"), "base")
    aligned = open_checkpoint(resolve_local(config.aligned, "aligned"), "aligned")
    plans = pair_layers(adapter, base, aligned, parse_key_map(config.key_map))
    device = resolve_device(config.device)
    # Read in on-disk order (shard by shard) so each shard is opened once; report in layer order.
    read_order = sorted(range(len(plans)), key=lambda i: str(base.tensors[plans[i].weight_key].file))
    maths: dict[int, LayerMath] = {}
    inputs = _Inputs(adapter, base, aligned)
    with TensorStream() as stream:
        for done, i in enumerate(read_order, start=1):
            maths[i] = _analyze_one(plans[i], inputs, stream, config, device)
            if on_layer is not None:
                on_layer(done, len(plans))
    ordered = [maths[i] for i in range(len(plans))]
    flags = select([m.cosine for m in ordered], config.selection)
    layers = [LayerResult(p, m, f) for p, m, f in zip(plans, ordered, flags, strict=True)]
    patched = {r.plan.b_key: r.math.projected_b for r in layers if r.selected and r.math.projected_b is not None}
    projected = [(r.plan, patched[r.plan.b_key]) for r in layers if r.plan.b_key in patched]
    patched.update(recompute_magnitudes(projected, adapter.tensors, aligned, device))
    return Analysis(config, adapter, base, aligned, str(device), layers, patched)


def patch(config: RunConfig, on_layer: OnLayer | None = None) -> Analysis:
    """Analyze, then write the patched adapter and its report to `config.out` atomically."""
    from safelora_cli.report import build_report
    from safelora_cli.writer import check_output_target, write_patched_adapter

    assert config.out is not None
    check_output_target(Path(config.out), Path(config.adapter), config.force)
    analysis = analyze(config, on_layer)
    write_patched_adapter(analysis, build_report(analysis, command="patch"))
    return analysis
