"""Stream the weights once and compute every adapter's layers: cosines, then the selection.

Several adapters on the same base/aligned pair share one pass: each module's W_base and
W_aligned are read once, V and its projection are formed once, and every adapter that targets
the module is analysed from them. Nothing here writes or reports; see `pipeline` for the order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from safelora_cli.adapter import Adapter
from safelora_cli.alignment import AlignmentMatrix, Weight
from safelora_cli.checkpoint import Checkpoint
from safelora_cli.config import Method, ProjectionSettings
from safelora_cli.dora import recompute_magnitudes
from safelora_cli.errors import InputError, SafeLoraError, UsageError
from safelora_cli.pairing import LayerPlan
from safelora_cli.prefetch import Prefetcher, disk_order
from safelora_cli.projection import LayerMath, Projected, layer_math, project
from safelora_cli.selection import could_select, select

OnLayer = Callable[[int, int], None]  # (modules done, modules in all)


@dataclass(frozen=True)
class LayerResult:
    """One layer's outcome. `decided` (low-rank subspace only): whether the cosine's bounds are
    tight enough that the full C would select the same (None when not applicable)."""

    plan: LayerPlan
    math: LayerMath
    selected: bool
    decided: bool | None = None


@dataclass(frozen=True)
class Analysis:
    """One adapter's outcome: every layer's result, and the tensors a patched adapter replaces.

    `patched` maps adapter keys to their replacements: lora_B of the selected layers, and the
    recomputed DoRA magnitude vectors of those layers (see `dora`), in the adapter's dtypes.
    """

    adapter: Adapter
    layers: list[LayerResult]
    patched: dict[str, torch.Tensor]


@dataclass
class Job:
    """One adapter's share of the pass: its plans (layer order) and, as the pass goes, their maths."""

    adapter: Adapter
    plans: list[LayerPlan]
    maths: dict[int, LayerMath] = field(default_factory=dict)
    held: list[tuple[float, int]] = field(default_factory=list)  # top-K: see _retain_top_k

    def plans_for(self, key: str) -> list[tuple[int, LayerPlan]]:
        # Several modules can share a weight (tied embeddings), so this is a list.
        return [(i, p) for i, p in enumerate(self.plans) if p.weight_key == key]


def resolve_device(spec: str) -> torch.device:
    """`auto` → the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UsageError(f"Unknown device {spec!r}.", hint="Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SafeLoraError(f"Device {spec} was asked for but no CUDA device is available.",
                                hint="Use device cpu or auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SafeLoraError(f"Device {spec}: only {torch.cuda.device_count()} CUDA device(s) exist.")
    elif device.type != "cpu":
        raise UsageError(f"Device type {device.type!r} is not supported.", hint="Use auto, cpu or cuda[:N].")
    return device


def _not_finite(name: str, where: str) -> InputError:
    return InputError(f"{name} in {where} contains NaN or Inf values.",
                      hint="The file is corrupted or the training diverged; use a clean copy.")


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise _not_finite(name, where)


def _project(key: str, w_base: Weight, w_aligned: Weight, transposed: bool, bs: list[torch.Tensor],
             settings: ProjectionSettings, models: tuple[Checkpoint, Checkpoint]) -> Projected:
    """Project the B's with one weight's V; an error naming the tensor when a weight is not finite."""
    alignment = AlignmentMatrix(w_base, w_aligned, transposed)
    projected = project(alignment, settings, bs)
    if not math.isfinite(projected.v_norm):
        # Any NaN/Inf in either weight makes ‖V‖ non-finite; only then pay for finding which.
        bad = alignment.nonfinite_weight()
        if bad is not None:
            raise _not_finite(key, f"the {models[bad].label} model {models[bad].root}")
        raise InputError(f"W_aligned − W_base is not finite in float32 for {key} (its entries exceed 3.4e38).")
    return projected


def _check_range(factors: dict[str, torch.Tensor], plan: LayerPlan, adapter: Adapter) -> None:
    """The math runs in float32: float64 factors beyond its range cannot be analysed faithfully."""
    limit = torch.finfo(torch.float32).max
    if any(t.dtype == torch.float64 and bool(t.abs().max() > limit) for t in factors.values() if t.numel()):
        raise InputError(f"The LoRA factors of {plan.module} in {adapter.path} are too large to analyse (beyond "
                         "float32's range).", hint="The training diverged; use a clean checkpoint.")


def _checked(math_: LayerMath, plan: LayerPlan, adapter: Adapter, dtype: torch.dtype) -> LayerMath:
    """Refuse results that are not finite (factors near float64's range) or a C·B that does not fit
    the adapter's dtype: written, it would hold Inf, and the report NaN."""
    values = (math_.cosine or 0.0, math_.delta_norm, math_.residual_norm, math_.b_distance or 0.0)
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"The LoRA factors of {plan.module} in {adapter.path} are too large to analyse "
                         "(‖B·A‖ overflows float64).", hint="The training diverged; use a clean checkpoint.")
    cb = math_.projected_b
    if cb is not None and dtype.is_floating_point and bool(cb.abs().max() > torch.finfo(dtype).max):
        raise InputError(f"C·lora_B of {plan.module} exceeds the range of the adapter's {dtype} "
                         f"(largest entry {float(cb.abs().max()):.4g}); writing it would store Inf.",
                         hint="Convert the adapter to float32 or bfloat16 (e.g. with PEFT) and patch again.")
    return math_


def _read_factors(adapter: Adapter, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A and lora_B of one layer, read from the adapter file now and checked as they arrive."""
    factors = {k: adapter.tensors[k] for k in (plan.a_key, plan.b_key)}
    check_finite(factors, f"the adapter {adapter.path}")
    _check_range(factors, plan, adapter)
    return factors[plan.a_key], factors[plan.b_key]


def _retain_top_k(job: Job, index: int, top_k: int | None) -> None:
    """Top-K: hold C·B for at most K layers, the K smallest (cosine, layer index) seen so far.

    `select` takes the K smallest (cosine, index) of all layers; a layer among those is among the
    K smallest of any subset holding it, so no C·B it will use is dropped here, whatever order
    the layers arrive in. `job.held` is a heap of (−cosine, −index): its top is the one to drop.
    """
    math_ = job.maths[index]
    if top_k is None or math_.projected_b is None or math_.cosine is None:
        return
    heapq.heappush(job.held, (-math_.cosine, -index))
    if len(job.held) > top_k:
        _, dropped = heapq.heappop(job.held)
        job.maths[-dropped] = replace(job.maths[-dropped], projected_b=None)


def _analyze_weight(key: str, w_base: Weight, w_aligned: Weight, jobs: list[Job],
                    models: tuple[Checkpoint, Checkpoint], method: Method) -> None:
    """Every adapter's layers on one weight: V and its projection once, the B's side by side."""
    targets = [(job, i, plan) for job in jobs for i, plan in job.plans_for(key)]
    for transposed in sorted({plan.transposed for _, _, plan in targets}):
        group = [t for t in targets if t[2].transposed == transposed]
        factors = [_read_factors(job.adapter, plan) for job, _, plan in group]
        bs = [lora_b.to(w_base.device, torch.float32) for _, lora_b in factors]
        projected = _project(key, w_base, w_aligned, transposed, bs, method.projection, models)
        del bs
        cbs: list[torch.Tensor | None] = list(projected.cbs) if projected.cbs is not None else [None] * len(group)
        vtbs: list[torch.Tensor | None] = list(projected.vtbs) if projected.vtbs is not None else [None] * len(group)
        for (job, i, plan), (lora_a, lora_b), cb, vtb in zip(group, factors, cbs, vtbs, strict=True):
            record(job, i, plan, layer_math(projected, lora_a, lora_b, cb, vtb), lora_b, method)


def record(job: Job, index: int, plan: LayerPlan, math_: LayerMath, lora_b: torch.Tensor, method: Method) -> None:
    """Check a layer's result and keep it, with C·B only where it may be used, in the adapter's own
    dtype on the host: for a threshold the layers that pass it, for top-K at most K (see _retain_top_k)."""
    math_ = _checked(math_, plan, job.adapter, lora_b.dtype)
    if math_.projected_b is not None:
        kept = could_select(math_.cosine, method.selection)
        math_ = replace(math_, projected_b=math_.projected_b.to("cpu", lora_b.dtype).contiguous() if kept else None)
    job.maths[index] = math_
    _retain_top_k(job, index, method.selection.top_k)


def analyze(jobs: list[Job], base: Checkpoint, aligned: Checkpoint, method: Method, device: torch.device,
            on_layer: OnLayer | None = None) -> list[Analysis]:
    """Analyse every job's layers in one pass over the weights, then select each job's layers."""
    keys = disk_order(sorted({p.weight_key for job in jobs for p in job.plans}), base)
    with Prefetcher(keys, base, aligned, device) as fetched:
        for done, item in enumerate(fetched, start=1):
            _analyze_weight(item.key, *item.wait(), jobs, (base, aligned), method)
            if on_layer is not None:
                on_layer(done, len(keys))
    return [_finish(job, aligned, method, device) for job in jobs]


def _finish(job: Job, aligned: Checkpoint, method: Method, device: torch.device) -> Analysis:
    """Select layers (in layer order, which breaks top-K ties) and collect the patched tensors."""
    maths = [job.maths[i] for i in range(len(job.plans))]
    flags = select([m.cosine for m in maths], method.selection)
    layers = [LayerResult(p, m, f) for p, m, f in zip(job.plans, maths, flags, strict=True)]
    patched = {r.plan.b_key: r.math.projected_b for r in layers if r.selected and r.math.projected_b is not None}
    projected = [(r.plan, patched[r.plan.b_key]) for r in layers if r.plan.b_key in patched]
    patched.update(recompute_magnitudes(projected, job.adapter.tensors, aligned, device))
    return Analysis(job.adapter, layers, patched)
