"""The stages in order: resolve inputs → index → pair → stream and compute → select → write.

This is the only module that knows the order. Each stage lives in its own module. Several
adapters on the same base/aligned pair share one pass over the weights: each module's W_base
and W_aligned are read once, V and its projection are formed once, and every adapter that
targets the module is analysed from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from safelora_cli.adapter import Adapter, load_adapter
from safelora_cli.alignment import AlignmentMatrix, Weight
from safelora_cli.checkpoint import Checkpoint
from safelora_cli.config import ProjectionSettings, RunConfig
from safelora_cli.dora import recompute_magnitudes
from safelora_cli.errors import InputError, SafeLoraError, UsageError
from safelora_cli.naming import KeyRule, parse_key_map
from safelora_cli.pairing import LayerPlan, needed_weight_keys, pair_layers
from safelora_cli.prefetch import Prefetcher, disk_order
from safelora_cli.projection import LayerMath, Projected, layer_math, project
from safelora_cli.selection import could_select, select
from safelora_cli.sources import Origin, aligned_from_adapter, resolve_adapter, resolve_model

OnLayer = Callable[[int, int], None]  # (modules done, modules in all)


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
    origins: dict[str, Origin] = field(default_factory=dict)  # 'base', 'aligned', 'adapter'


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


def _not_finite(name: str, where: str) -> InputError:
    return InputError(f"{name} in {where} contains NaN or Inf values.",
                      hint="The file is corrupted or the training diverged; use a clean copy.")


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
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
        raise InputError(f"W_aligned − W_base overflows float32 for {key}.")
    return projected


@dataclass
class _Job:
    """One adapter's share of the pass: its plans (layer order) and, as the pass goes, their results."""

    config: RunConfig
    adapter: Adapter
    plans: list[LayerPlan]
    origins: dict[str, Origin] = field(default_factory=dict)
    maths: dict[int, LayerMath] = field(default_factory=dict)

    def plans_for(self, key: str) -> list[tuple[int, LayerPlan]]:
        # Several modules can share a weight (tied embeddings), so this is a list.
        return [(i, p) for i, p in enumerate(self.plans) if p.weight_key == key]


def _analyze_weight(key: str, w_base: Weight, w_aligned: Weight, jobs: list[_Job],
                    models: tuple[Checkpoint, Checkpoint], settings: ProjectionSettings) -> None:
    """Every adapter's layers on one weight: V and its projection once, the B's side by side."""
    targets = [(job, i, plan) for job in jobs for i, plan in job.plans_for(key)]
    for transposed in sorted({plan.transposed for _, _, plan in targets}):
        group = [t for t in targets if t[2].transposed == transposed]
        bs = [job.adapter.tensors[plan.b_key].to(w_base.device, torch.float32) for job, _, plan in group]
        projected = _project(key, w_base, w_aligned, transposed, bs, settings, models)
        cbs: list[torch.Tensor | None] = list(projected.cbs) if projected.cbs is not None else [None] * len(group)
        for (job, i, plan), cb in zip(group, cbs, strict=True):
            lora_a, lora_b = job.adapter.tensors[plan.a_key], job.adapter.tensors[plan.b_key]
            math_ = layer_math(projected, lora_a, lora_b, cb)
            if math_.projected_b is not None:
                # Keep C·B only where it may be used, in the adapter's own dtype on the host: never
                # more memory than the adapter's B's.
                kept = could_select(math_.cosine, job.config.selection)
                math_ = replace(math_, projected_b=math_.projected_b.to("cpu", lora_b.dtype).contiguous()
                                if kept else None)
            job.maths[i] = math_


def _shared(config: RunConfig) -> tuple[object, ...]:
    return (config.base, config.aligned, config.base_revision, config.aligned_revision, config.projection,
            config.device)


def _aligned_spec(configs: list[RunConfig], adapters: list[Adapter]) -> tuple[str, str | None]:
    """--aligned, or else the model the adapters' configs name (all of them the same one)."""
    first = configs[0]
    if first.aligned is not None:
        return first.aligned, first.aligned_revision
    named = {aligned_from_adapter(a.raw_config, a.path, first.aligned_revision) for a in adapters}
    if len(named) > 1:
        raise UsageError(f"--aligned was not given and the adapters name different models: "
                         f"{', '.join(sorted(f'{n}@{r}' if r else n for n, r in named))}.",
                         hint="Pass --aligned, or patch them in separate runs.")
    return named.pop()


def _load_jobs(configs: list[RunConfig]) -> tuple[list[_Job], Checkpoint, Checkpoint]:
    """Adapters first: their modules say which tensors (so which shards) the models must supply."""
    first = configs[0]
    if any(_shared(other) != _shared(first) for other in configs[1:]):
        raise UsageError("Adapters patched in one run must share --base, --aligned and the settings.")
    adapter_origins = [resolve_adapter(c.adapter, c.adapter_revision, c.token) for c in configs]
    adapters = [load_adapter(o.path, c.adapter_name) for o, c in zip(adapter_origins, configs, strict=True)]
    aligned_spec, aligned_revision = _aligned_spec(configs, adapters)
    key_maps = [parse_key_map(c.key_map) for c in configs]

    def needed(listed: Collection[str]) -> set[str]:
        return set().union(*(needed_weight_keys(a, k, listed) for a, k in zip(adapters, key_maps, strict=True)))

    base, base_origin = resolve_model(first.base, first.base_revision, first.token, "base", needed)
    aligned, aligned_origin = resolve_model(aligned_spec, aligned_revision, first.token, "aligned", needed)
    aligned_origin = replace(aligned_origin, from_adapter_config=first.aligned is None)
    jobs = []
    for config, adapter, key_map, origin in zip(configs, adapters, key_maps, adapter_origins, strict=True):
        plans = _pair(adapter, base, aligned, key_map)
        origins = {"base": base_origin, "aligned": aligned_origin, "adapter": origin}
        jobs.append(_Job(replace(config, aligned=aligned_spec), adapter, plans, origins))
    return jobs, base, aligned


def _pair(adapter: Adapter, base: Checkpoint, aligned: Checkpoint, key_map: tuple[KeyRule, ...]) -> list[LayerPlan]:
    plans = pair_layers(adapter, base, aligned, key_map)
    for plan in plans:
        _check_finite({plan.a_key: adapter.tensors[plan.a_key], plan.b_key: adapter.tensors[plan.b_key]},
                      f"the adapter {adapter.path}")
    return plans


def analyze_many(configs: list[RunConfig], on_layer: OnLayer | None = None) -> list[Analysis]:
    """Analyse several adapters of the same base/aligned pair in one pass over the weights."""
    device = resolve_device(configs[0].device)  # before any download: a wrong --device fails at once
    jobs, base, aligned = _load_jobs(configs)
    keys = disk_order(sorted({p.weight_key for job in jobs for p in job.plans}), base)
    with Prefetcher(keys, base, aligned, device) as fetched:
        for done, item in enumerate(fetched, start=1):
            _analyze_weight(item.key, *item.wait(), jobs, (base, aligned), configs[0].projection)
            if on_layer is not None:
                on_layer(done, len(keys))
    return [_finish(job, base, aligned, str(device)) for job in jobs]


def _finish(job: _Job, base: Checkpoint, aligned: Checkpoint, device: str) -> Analysis:
    """Select layers (in layer order, which breaks top-K ties) and collect the patched B's."""
    plans = job.plans
    maths = [job.maths[i] for i in range(len(plans))]
    flags = select([m.cosine for m in maths], job.config.selection)
    layers = [LayerResult(p, m, f) for p, m, f in zip(plans, maths, flags, strict=True)]
    patched = {r.plan.b_key: r.math.projected_b for r in layers if r.selected and r.math.projected_b is not None}
    projected = [(r.plan, patched[r.plan.b_key]) for r in layers if r.plan.b_key in patched]
    patched.update(recompute_magnitudes(projected, job.adapter.tensors, aligned, torch.device(device)))
    return Analysis(job.config, job.adapter, base, aligned, device, layers, patched, job.origins)


def analyze(config: RunConfig, on_layer: OnLayer | None = None) -> Analysis:
    """Compute every adapted layer's similarity and the patched B of the selected ones."""
    return analyze_many([config], on_layer)[0]


def patch_many(configs: list[RunConfig], on_layer: OnLayer | None = None) -> list[Analysis]:
    """Analyse, then write each patched adapter and its report to its `config.out` atomically."""
    from safelora_cli.report import build_report
    from safelora_cli.writer import check_output_target, write_patched_adapter

    outs = [Path(c.out) for c in configs if c.out is not None]
    if len(outs) != len(configs) or len({o.resolve() for o in outs}) != len(outs):
        raise UsageError("Each adapter needs its own output directory.")
    for config, out in zip(configs, outs, strict=True):
        check_output_target(out, Path(config.adapter), config.force)
    analyses = analyze_many(configs, on_layer)
    for analysis in analyses:
        write_patched_adapter(analysis, build_report(analysis, command="patch"))
    return analyses


def patch(config: RunConfig, on_layer: OnLayer | None = None) -> Analysis:
    """Analyze, then write the patched adapter and its report to `config.out` atomically."""
    return patch_many([config], on_layer)[0]
