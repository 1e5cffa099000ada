"""`safelora subspace`: the stages in order, from two models to a subspace file. Data flows one way:

resolve the adapters (or take --modules) → name the aligned model → check the output path →
resolve the models → choose the weights → stream them, writing V (exact) or computing Q
(low-rank) → write the file and its card, whole or not at all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli import __version__
from safelora_cli.adapter import load_adapter
from safelora_cli.alignment import AlignmentMatrix
from safelora_cli.analysis import OnLayer, resolve_device
from safelora_cli.checkpoint import CONFIG_FILE, refuse_quantized
from safelora_cli.config import Inputs
from safelora_cli.errors import InputError, PairingError, UsageError
from safelora_cli.lowrank import Factor, factor_of
from safelora_cli.naming import ties_embeddings
from safelora_cli.outputs import plan_outputs
from safelora_cli.pairing import needed_weight_keys, pair_layers
from safelora_cli.pipeline import Models, aligned_spec, local_inputs, resolve_models
from safelora_cli.placement import write_directory
from safelora_cli.prefetch import Prefetcher, disk_order
from safelora_cli.sources import resolve_adapter
from safelora_cli.subspace_file import (
    EXACT,
    LOW_RANK,
    STORE_DTYPES,
    WEIGHTS_FILE,
    Entry,
    StreamingWriter,
    header_metadata,
)

CARD_FILE = "README.md"


@dataclass(frozen=True)
class SubspaceRequest:
    """What `safelora subspace` was asked: the models, which weights, the mode, the output."""

    inputs: Inputs  # base, aligned, adapters (may be empty when `modules` is given), Hub access
    out: Path
    modules: tuple[str, ...] = ()
    rank: int | None = None
    energy: float | None = None
    dtype: str = "float32"
    force: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if bool(self.inputs.adapters) == bool(self.modules):
            raise UsageError("Give the adapter whose modules the file is for, or --modules; one of the two.")
        if self.rank is not None and self.energy is not None:
            raise UsageError("Give --rank or --energy, not both.")
        if self.rank is not None and (isinstance(self.rank, bool) or self.rank < 1):
            raise UsageError(f"rank must be a positive integer, got {self.rank!r}.")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UsageError(f"energy must be in (0, 1], got {self.energy!r}.")
        if self.dtype not in STORE_DTYPES:
            raise UsageError(f"Unknown dtype {self.dtype!r}.", hint=f"Use one of {', '.join(STORE_DTYPES)}.")
        if self.low_rank and self.dtype != "float32":
            raise UsageError("--dtype applies to the exact mode; a low-rank factor is always stored as float32.")

    @property
    def low_rank(self) -> bool:
        return self.rank is not None or self.energy is not None



@dataclass(frozen=True)
class SubspaceResult:
    """What was written: the directory, its header document, and the weights file's size."""

    out: Path
    document: dict[str, Any]
    nbytes: int


def _module_keys(modules: tuple[str, ...]) -> Callable[[Collection[str]], set[str]]:
    """The 2-D `…<module>.weight` names of an index for module names such as q_proj."""
    def needed(listed: Collection[str]) -> set[str]:
        return {k for k in listed if k.endswith(".weight") and k.rsplit(".", 2)[-2] in modules}
    return needed


def _weights(request: SubspaceRequest, models: Models, adapters: list[Any]) -> dict[str, bool]:
    """Each weight key the file will hold → whether the model stores it transposed to its update."""
    if request.modules:
        keys = sorted(k for k in _module_keys(request.modules)(models.base.tensors)
                      if len(models.base.tensors[k].shape) == 2)
        if not keys:
            raise InputError(f"The base model {models.base.root} has no weight for the modules "
                             f"{', '.join(request.modules)}.", hint="Name modules as PEFT's target_modules does, "
                             "e.g. q_proj,v_proj.")
        for key in keys:
            for model in (models.base, models.aligned):
                refuse_quantized(model, key)
            if key not in models.aligned.tensors or models.aligned.tensors[key].shape != models.base.tensors[key].shape:
                raise PairingError(f"{key} is not stored alike in the base and aligned models.")
        return dict.fromkeys(keys, False)
    found: dict[str, bool] = {}
    for adapter in adapters:
        for plan in pair_layers(adapter, models.base, models.aligned, request.inputs.key_rules):
            if found.setdefault(plan.weight_key, plan.transposed) != plan.transposed:
                raise UsageError(f"The adapters use {plan.weight_key} in two orientations; write one file per adapter.")
    return found


def _provenance(request: SubspaceRequest, models: Models, keys: dict[str, bool]) -> dict[str, Any]:
    # The file is made to be published: inputs as they were named (a Hub id, or the path as typed),
    # never where this machine keeps them; what was downloaded belongs to this run, not to the file.
    inputs = {name: {**{k: v for k, v in entry.items() if k != "bytes_downloaded"}, "path": entry["source"]}
              for name, entry in models.records().items()}
    return {"tool": {"name": "safelora-cli", "version": __version__}, "inputs": inputs,
            "modules": sorted({k.rsplit(".", 2)[-2] for k in keys}),
            "rank_requested": request.rank, "energy_requested": request.energy}


def _not_finite(alignment: AlignmentMatrix, key: str, models: Models) -> InputError:
    bad = alignment.nonfinite_weight()
    model = (models.base, models.aligned)[bad if bad is not None else 1]
    return InputError(f"{key} in the {model.label} model {model.root} contains NaN or Inf values.",
                      hint="The file is corrupted; use a clean copy.")


def _write_exact(path: Path, request: SubspaceRequest, models: Models, keys: dict[str, bool],
                 provenance: dict[str, Any], device: torch.device, on_layer: OnLayer | None) -> dict[str, Any]:
    """V of every weight, streamed from the models into the file a block of rows at a time."""
    dtype = STORE_DTYPES[request.dtype]
    entries = {k: Entry(tuple(models.base.tensors[k].shape)) for k in keys}  # type: ignore[arg-type]
    metadata = header_metadata(EXACT, request.dtype, provenance, entries)
    order = disk_order(sorted(keys), models.base)  # the file's order is the order the models are read in
    writer = StreamingWriter(path, {k: (dtype, entries[k].shape) for k in order}, metadata)
    limit = torch.finfo(dtype).max
    try:
        with Prefetcher(order, models.base, models.aligned, device) as fetched:
            for done, item in enumerate(fetched, start=1):
                alignment = AlignmentMatrix(*item.wait(), transposed=False)
                for _, block in alignment.stored_blocks():
                    if not bool(torch.isfinite(block).all()):
                        raise _not_finite(alignment, item.key, models)
                    if dtype != torch.float32 and bool(block.abs().max() > limit):
                        raise InputError(f"V of {item.key} exceeds the range of {request.dtype}.",
                                         hint="Store it as float32 (the default) or bfloat16.")
                    writer.write(item.key, block.to(dtype))
                if on_layer is not None:
                    on_layer(done, len(order))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return json.loads(metadata["safelora_subspace"])


def _factors(request: SubspaceRequest, models: Models, keys: dict[str, bool], device: torch.device,
             on_layer: OnLayer | None) -> dict[str, Factor]:
    """Q of every weight (held: each is out × k floats), from V formed whole one weight at a time."""
    factors: dict[str, Factor] = {}
    order = disk_order(sorted(keys), models.base)
    with Prefetcher(order, models.base, models.aligned, device) as fetched:
        for done, item in enumerate(fetched, start=1):
            alignment = AlignmentMatrix(*item.wait(), transposed=keys[item.key])
            if not math.isfinite(alignment.norm()):
                raise _not_finite(alignment, item.key, models)
            factor = factor_of(alignment.dense(), request.rank, request.energy)
            factors[item.key] = Factor(factor.q.to("cpu"), factor.v_norm, factor.energy_kept, factor.dropped,
                                       factor.full_rank)
            if on_layer is not None:
                on_layer(done, len(order))
    return factors


def _write_low_rank(path: Path, request: SubspaceRequest, models: Models, keys: dict[str, bool],
                    provenance: dict[str, Any], factors: dict[str, Factor]) -> dict[str, Any]:
    entries = {k: Entry(tuple(models.base.tensors[k].shape), keys[k], f.v_norm, int(f.q.shape[1]),  # type: ignore[arg-type]
                        f.energy_kept, f.dropped, f.full_rank) for k, f in factors.items()}
    metadata = header_metadata(LOW_RANK, "float32", provenance, entries)
    writer = StreamingWriter(path, {k: (torch.float32, tuple(f.q.shape)) for k, f in factors.items()}, metadata)
    try:
        for key in sorted(factors):
            writer.write(key, factors[key].q)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return json.loads(metadata["safelora_subspace"])


def build(request: SubspaceRequest, on_layer: OnLayer | None = None) -> SubspaceResult:
    """Write the subspace file `request` asks for. See the module docstring for the order."""
    from safelora_cli.subspace_card import card_text
    from safelora_cli.subspace_file import written_by_subspace

    inputs = request.inputs
    device = resolve_device(request.device)  # before any download: a wrong device fails at once
    origins = [resolve_adapter(spec, inputs.adapter_revision, inputs.token) for spec in inputs.adapters]
    adapters = [(o, load_adapter(o.path, inputs.adapter_name)) for o in origins]
    if inputs.aligned is None and not adapters:
        raise UsageError("--aligned is needed with --modules (there is no adapter config to name it).")
    aligned = aligned_spec(inputs, adapters)
    plan = plan_outputs(request.out, request.force, None, None, [str(request.out)],
                        local_inputs(inputs, aligned, adapters), replaceable=written_by_subspace)
    target = plan.adapter_dirs[0]
    rules = inputs.key_rules
    needed = _module_keys(request.modules) if request.modules else (
        lambda listed: set().union(*(needed_weight_keys(a, rules, listed) for _, a in adapters)))
    models = resolve_models(inputs, aligned, needed)
    keys = _weights(request, models, [a for _, a in adapters])
    provenance = _provenance(request, models, keys)
    factors = _factors(request, models, keys, device, on_layer) if request.low_rank else {}
    document: dict[str, Any] = {}

    def fill(staging: Path) -> None:
        weights = staging / WEIGHTS_FILE
        if request.low_rank:
            document.update(_write_low_rank(weights, request, models, keys, provenance, factors))
        else:
            document.update(_write_exact(weights, request, models, keys, provenance, device, on_layer))
        # Pairing an output layer with a tied input embedding reads this, as it does the model's.
        config = {"tie_word_embeddings": ties_embeddings(models.aligned.root)}
        (staging / CONFIG_FILE).write_text(json.dumps(config) + "\n", encoding="utf-8")
        (staging / CARD_FILE).write_text(card_text(document, weights.stat().st_size), encoding="utf-8")

    write_directory(target.path, target.existed, target.label, fill)
    return SubspaceResult(target.path, document, (target.path / WEIGHTS_FILE).stat().st_size)
