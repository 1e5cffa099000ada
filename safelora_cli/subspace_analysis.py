"""Analyse adapters against a subspace file instead of the two models (`patch --subspace`).

Exact mode stores V itself: it is read whole in a background thread while the previous weight is
computed (a V wider than `prefetch.HOLD_BYTES` a block of rows at a time instead), and goes
through the very `AlignmentMatrix` arithmetic of a two-model run, so cosines, selection and C·B are the same to
float rounding of the stored dtype (bit for bit in float32). Low-rank mode stores Q with
C_k = Q·Qᵀ: C_k·B = Q·(Qᵀ·B), and each layer also gets the proven upper end of the cosine with
the full C (see `lowrank`), from which the report's `cosine_error_bound` and the layers whose
selection the bound cannot decide follow.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from safelora_cli.alignment import PairSide, Rows, RowSource, TensorRows
from safelora_cli.analysis import (
    Analysis,
    Job,
    LayerResult,
    OnLayer,
    _analyze_weight,
    _finish,
    _read_factors,
    record,
)
from safelora_cli.checkpoint import Checkpoint, TensorStream
from safelora_cli.config import Method, Projection
from safelora_cli.errors import InputError, UsageError
from safelora_cli.lowrank import cosine_upper, project_low_rank, undecided
from safelora_cli.prefetch import HOLD_BYTES, disk_order
from safelora_cli.projection import Projected, layer_math
from safelora_cli.safetensors_io import torch_dtype
from safelora_cli.subspace_file import Subspace
from safelora_cli.subspace_records import check_factor

# Rows of stored V read at once when the compute block is smaller (the CPU's 4 MB blocks).
_READ_BYTES = 32 << 20


@dataclass
class StoredRows:
    """A `RowSource` over V as a subspace file stores it: base rows are None, V comes as the aligned rows."""

    checkpoint: Checkpoint
    key: str
    device: torch.device
    stream: TensorStream

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.checkpoint.tensors[self.key].shape
        return rows, cols

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.checkpoint.tensors[self.key].dtype)

    def rows(self, block_rows: int) -> Iterator[Rows]:
        rows, cols = self.shape
        step = max(block_rows, _READ_BYTES // max(cols * self.dtype.itemsize, 1) // block_rows * block_rows)
        for start in range(0, rows, step):
            read = self.stream.read_rows(self.checkpoint, self.key, start, min(rows, start + step)).to(self.device)
            for offset in range(0, read.shape[0], block_rows):
                yield slice(start + offset, start + min(read.shape[0], offset + block_rows)), None, \
                    read[offset:offset + block_rows]


class ReadAhead:
    """The next weight's tensor, read whole in a background thread while the current one is computed.

    Only weights marked `held` are read this way (a factor Q, or V of up to `prefetch.HOLD_BYTES`),
    so at most two of them are in memory at once; a wider V is streamed by `StoredRows` in the
    caller's thread. The reader has its own `TensorStream`, used by that thread alone.
    """

    def __init__(self, checkpoint: Checkpoint, keys: list[str], held: list[bool]) -> None:
        self._checkpoint, self._keys, self._held = checkpoint, keys, held
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safelora-reader")
        self._stream = TensorStream()
        self._pending: dict[int, Future[torch.Tensor]] = {}

    def _submit(self, index: int) -> None:
        if index < len(self._keys) and self._held[index] and index not in self._pending:
            self._pending[index] = self._pool.submit(self._stream.read, self._checkpoint, self._keys[index])

    def take(self, index: int) -> torch.Tensor | None:
        """Weight `index` whole (None when it is streamed instead); starts reading the next one."""
        self._submit(index)
        self._submit(index + 1)
        future = self._pending.pop(index, None)
        return None if future is None else future.result()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._stream.close()


def _low_rank_weight(key: str, q: torch.Tensor, subspace: Subspace, jobs: list[Job], method: Method) -> None:
    """Every adapter's layers on one weight, with C_k = Q·Qᵀ and the bound on the cosine with C."""
    entry = subspace.entries[key]
    assert entry.v_norm is not None and entry.dropped is not None
    for job in jobs:
        for i, plan in job.plans_for(key):
            if plan.transposed != entry.transposed:
                raise InputError(f"The subspace file {subspace.root} holds the factor of {key} for the other "
                                 f"orientation than {plan.module} of {job.adapter.path} needs.",
                                 hint="Write the subspace file with --adapter set to this adapter.")
            lora_a, lora_b = _read_factors(job.adapter, plan)
            low = project_low_rank(q, lora_a, lora_b)
            cb = low.cb if entry.v_norm > 0.0 and q.shape[1] > 0 else None
            math_ = layer_math(Projected(entry.v_norm, None if cb is None else [cb]), lora_a, lora_b, cb)
            if math_.cosine is not None:
                retained = math_.projected_norm / math_.delta_norm
                upper = cosine_upper(math_.cosine, retained, low.outside_sq, entry.dropped, entry.v_norm)
                math_ = replace(math_, cosine_upper=upper)
            record(job, i, plan, math_, lora_b, method)


def _with_decisions(analysis: Analysis, method: Method) -> Analysis:
    """Mark the layers whose selection the low-rank bounds cannot decide."""
    layers = analysis.layers
    flags = undecided([r.math.cosine for r in layers], [r.math.cosine_upper for r in layers],
                      [r.selected for r in layers], method.selection.threshold)
    marked = [replace(r, decided=None if r.math.cosine is None else not flag) for r, flag in zip(layers, flags,
                                                                                                   strict=True)]
    return replace(analysis, layers=marked)


def analyze_subspace(jobs: list[Job], subspace: Subspace, method: Method, device: torch.device,
                     on_layer: OnLayer | None = None) -> list[Analysis]:
    """`analysis.analyze`, with the weights' V (or Q) read from a subspace file."""
    if not subspace.exact and method.projection.kind is Projection.EXACT:
        raise UsageError(f"projection exact needs V, and the subspace file {subspace.root} holds a low-rank factor.",
                         hint="Use the paper's projection with it, or an exact subspace file.")
    checkpoint = subspace.checkpoint
    keys = disk_order(sorted({p.weight_key for job in jobs for p in job.plans}), checkpoint)
    held = [not subspace.exact or checkpoint.tensors[k].nbytes <= HOLD_BYTES for k in keys]
    with TensorStream() as stream, ReadAhead(checkpoint, keys, held) as ahead:
        for done, key in enumerate(keys, start=1):
            whole = ahead.take(done - 1)
            if subspace.exact:
                source: RowSource = StoredRows(checkpoint, key, device, stream) if whole is None else \
                    TensorRows(None, whole.to(device))
                _analyze_weight(key, PairSide(source, False), PairSide(source, True), jobs, (checkpoint, checkpoint),
                                method)
            else:
                assert whole is not None
                q = whole.to(device, torch.float32)
                entry = subspace.entries[key]
                assert entry.v_norm is not None and entry.dropped is not None
                check_factor(key, q, entry.v_norm, entry.dropped, subspace.root)
                _low_rank_weight(key, q, subspace, jobs, method)
            if on_layer is not None:
                on_layer(done, len(keys))
    analyses = [_finish(job, checkpoint, method, device) for job in jobs]
    return analyses if subspace.exact else [_with_decisions(a, method) for a in analyses]


__all__ = ["LayerResult", "ReadAhead", "StoredRows", "analyze_subspace"]
