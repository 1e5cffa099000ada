"""The stages in order; the only module that knows the order. Data flows one way:

resolve the adapters → name the aligned model → check every output path → resolve the models →
pair → stream and compute → select (`analysis`) → gates → report (built once) → write.

Nothing is written before the last stage, and every path written was checked before the first
weight was read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from safelora_cli import __version__, gates
from safelora_cli.adapter import Adapter, load_adapter, named_adapters
from safelora_cli.analysis import Analysis, Job, OnLayer, analyze, resolve_device
from safelora_cli.checkpoint import Checkpoint
from safelora_cli.config import Inputs, Method, Outputs
from safelora_cli.errors import InputError, SafeLoraError, UsageError
from safelora_cli.outputs import OutputPlan, plan_outputs, protected, refuse_cache_in_inputs
from safelora_cli.pairing import needed_weight_keys, pair_layers
from safelora_cli.placement import make_parents, os_error, remove_created, write_file
from safelora_cli.report import Report, build_report, text_of_path
from safelora_cli.result import Result
from safelora_cli.sources import Origin, aligned_from_adapter, parse_spec, resolve_adapter, resolve_model
from safelora_cli.subspace_file import refuse_as_model
from safelora_cli.writer import CopyPlan, plan_copy, provenance, write_patched_adapter

Warn = Callable[[str], None]


def aligned_spec(inputs: Inputs, adapters: list[tuple[Origin, Adapter]]) -> tuple[str, str | None]:
    """`aligned`, or else the model the adapters' configs name (all of them the same one)."""
    if inputs.aligned is not None:
        return inputs.aligned, inputs.aligned_revision
    named = {aligned_from_adapter(a.raw_config, a.path, inputs.aligned_revision) for _, a in adapters}
    if len(named) > 1:
        raise UsageError(f"aligned was not given and the adapters name different models: "
                         f"{', '.join(sorted(f'{n}@{r}' if r else n for n, r in named))}.",
                         hint="Pass --aligned, or patch them in separate runs.")
    return named.pop()


def local_inputs(inputs: Inputs, aligned: tuple[str, str | None] | None,
                  adapters: list[tuple[Origin, Adapter]]) -> dict[str, Path]:
    """Every directory a run reads, resolved: what no output may touch. A model from the Hub is
    read from its cache, which counts as a whole."""
    found: dict[str, Path] = {}
    models = [("base", inputs.base, inputs.base_revision), ("aligned", *aligned)] if aligned is not None else \
        [("subspace", inputs.subspace, inputs.subspace_revision)]
    from_hub = False
    for label, spec, revision in models:
        assert spec is not None
        path = parse_spec(spec, revision, label).path  # also refuses a malformed spec before any work
        if path is not None:
            found[f"{label} model" if label != "subspace" else "subspace file"] = path
        from_hub = from_hub or path is None
    for i, (origin, adapter) in enumerate(adapters):
        label = "adapter" if len(adapters) == 1 else f"adapter {origin.spec}"
        found[label if label not in found else f"{label} ({i + 1})"] = adapter.root or adapter.path
    if from_hub:
        refuse_cache_in_inputs(found)
    return protected(found)


def _refuse_same_model(base: Origin, aligned: Origin) -> None:
    same_dir = base.repo_id is None and aligned.repo_id is None and base.path.resolve() == aligned.path.resolve()
    same_commit = base.repo_id is not None and (base.repo_id, base.commit) == (aligned.repo_id, aligned.commit)
    if same_dir or same_commit:
        where = f"{base.repo_id}@{base.commit}" if same_commit else str(base.path)
        raise InputError(f"The base and aligned models are the same ({where}); V = W_aligned − W_base would be 0 "
                         "in every layer.", hint="Pass the unaligned base model to --base and the safety-aligned "
                         "model the adapter was trained on to --aligned.")


def _refuse_nothing_evaluated(analyses: list[Analysis]) -> None:
    """A run in which no layer could be evaluated is never a success."""
    for analysis in analyses:
        layers = analysis.layers
        if layers and all(r.math.cosine is None for r in layers):
            reasons = sorted({r.math.undefined_reason or "" for r in layers})
            raise InputError(f"No layer of {analysis.adapter.path} could be evaluated: every cosine is undefined "
                             f"({'; '.join(reasons)}).", hint="Check that --base and --aligned differ and that "
                             "the adapter was trained (a fresh LoRA has lora_B = 0).")


def _settings(inputs: Inputs, method: Method) -> dict[str, object]:
    record = method.record()
    if inputs.adapter_name is not None:
        record["adapter_name"] = inputs.adapter_name
    if inputs.key_map:
        record["key_map"] = list(inputs.key_map)
    return record


def link_roots(origin: Origin) -> tuple[Path, ...]:
    # A Hub snapshot's files are links into the repository's blob store, two levels up.
    return (origin.path.parent.parent / "blobs",) if origin.repo_id is not None else ()


@dataclass(frozen=True)
class Models:
    base: Checkpoint
    aligned: Checkpoint
    base_origin: Origin
    aligned_origin: Origin

    def records(self) -> dict[str, dict[str, object]]:
        """The report's entries for the two models."""
        return {"base": _entry(self.base_origin, self.base.root), "aligned": _entry(self.aligned_origin,
                                                                                    self.aligned.root)}


class _Notes(list[str]):
    """Warnings of the run: collected for the result, and handed on as they happen."""

    def __init__(self, warn: Warn | None) -> None:
        super().__init__()
        self._warn = warn

    def add(self, message: str) -> None:
        self.append(message)
        if self._warn is not None:
            self._warn(message)


def run(command: str, inputs: Inputs, method: Method, outputs: Outputs, policy: gates.Gates,
        on_layer: OnLayer | None = None, warn: Warn | None = None) -> Result:
    """Analyse the adapters of `inputs`; for `patch`, write each to its output. See the module docstring."""
    notes = _Notes(warn)
    if not inputs.adapters:
        raise UsageError("Give at least one adapter.")
    device = resolve_device(method.device)  # before any download: a wrong device fails at once
    origins = [resolve_adapter(spec, inputs.adapter_revision, inputs.token) for spec in inputs.adapters]
    adapters = [(o, load_adapter(o.path, inputs.adapter_name)) for o in origins]
    aligned_name = aligned_spec(inputs, adapters) if inputs.subspace is None else None
    plan = plan_outputs(outputs.out if command == "patch" else None, outputs.force, outputs.report_md, outputs.plot,
                        list(inputs.adapters), local_inputs(inputs, aligned_name, adapters))
    if outputs.plot is not None:
        from safelora_cli.plot import require_matplotlib

        require_matplotlib()
    copies = [plan_copy(a, link_roots(o)) if command == "patch" else None for o, a in adapters]
    if aligned_name is not None:
        models = _resolve_models(inputs, aligned_name, adapters)
        jobs = [Job(a, pair_layers(a, models.base, models.aligned, inputs.key_rules)) for _, a in adapters]
        _warn_top_k(method, jobs, notes)
        analyses = analyze(jobs, models.base, models.aligned, method, device, on_layer)
        records = models.records()
    else:
        from safelora_cli.subspace_analysis import analyze_subspace
        from safelora_cli.subspace_source import resolve_subspace

        subspace, records = resolve_subspace(inputs, adapters, notes.add)
        jobs = [Job(a, pair_layers(a, subspace.checkpoint, subspace.checkpoint, inputs.key_rules)) for _, a in adapters]
        _warn_top_k(method, jobs, notes)
        analyses = analyze_subspace(jobs, subspace, method, device, on_layer)
    _refuse_nothing_evaluated(analyses)
    reports = [_report(command, inputs, method, policy, str(device), records, origin, analysis, copy, notes)
               for (origin, _), analysis, copy in zip(adapters, analyses, copies, strict=True)]
    side_files = _render_side_files(plan, reports)  # before writing anything: a failure leaves nothing
    written: list[Path] = []
    with _saying_what_was_written(written):
        if command == "patch":
            _write(plan, adapters, analyses, copies, reports, written)
        _write_side_files(side_files, written)
    return Result(command, reports, [t.path for t in plan.adapter_dirs], list(notes))


def _resolve_models(inputs: Inputs, aligned: tuple[str, str | None], adapters: list[tuple[Origin, Adapter]]) -> Models:
    """Index both models for the tensors the adapters may use (from the Hub: download only those)."""
    def needed(listed: Collection[str]) -> set[str]:
        return set().union(*(needed_weight_keys(a, inputs.key_rules, listed) for _, a in adapters))

    return resolve_models(inputs, aligned, needed)


def resolve_models(inputs: Inputs, aligned: tuple[str, str | None],
                   needed: Callable[[Collection[str]], Collection[str]]) -> Models:
    """Index base and aligned for the tensors `needed` picks from an index; refuse one model twice."""
    assert inputs.base is not None
    base, base_origin = resolve_model(inputs.base, inputs.base_revision, inputs.token, "base", needed)
    model, origin = resolve_model(aligned[0], aligned[1], inputs.token, "aligned", needed)
    origin = replace(origin, from_adapter_config=inputs.aligned is None)
    _refuse_same_model(base_origin, origin)
    for checkpoint in (base, model):
        refuse_as_model(checkpoint)
    return Models(base, model, base_origin, origin)


def _warn_top_k(method: Method, jobs: list[Job], notes: _Notes) -> None:
    top_k = method.selection.top_k
    fewest = min(len(job.plans) for job in jobs)
    if top_k is not None and top_k > fewest:
        notes.add(f"top-k {top_k} asks for more layers than the adapter has ({fewest}); every layer with a defined "
                  "cosine is selected.")


def _report(command: str, inputs: Inputs, method: Method, policy: gates.Gates, device: str,
            models: dict[str, dict[str, object]],
            origin: Origin, analysis: Analysis, copy: CopyPlan | None, notes: _Notes) -> Report:
    """The gates' verdicts and the report of one adapter, built once."""
    layers = analysis.layers
    verdicts = gates.evaluate(policy, [r.math.cosine for r in layers], [r.selected for r in layers],
                              [r.plan.module for r in layers])
    skipped = copy.skipped if copy is not None else []
    adapter = analysis.adapter
    others = [n for n in named_adapters(adapter.root or adapter.path) if n != adapter.name] if adapter.name else []
    if copy is not None and others:
        notes.add(f"{origin.spec}: only {adapter.name!r} is patched; the other adapters of the directory "
                  f"({', '.join(others)}) are copied as they are.")
    for item in skipped:
        notes.add(f"{origin.spec}: {item['path']} was not copied to the output: it is {item['reason']}.")
    records = {**models, "adapter": _entry(origin, adapter.path)}
    return build_report(command, analysis, records, _settings(inputs, method), device, verdicts, skipped)


def _entry(origin: Origin, path: Path) -> dict[str, object]:
    """An input as the report records it: what was asked for, where it was read, at which commit."""
    return {"source": text_of_path(origin.spec), "path": text_of_path(path), **origin.record()}


@contextlib.contextmanager
def _saying_what_was_written(written: list[Path]) -> Iterator[None]:
    """Outputs are placed one at a time: when a later one fails, the error says which are already in
    place (each is whole), rather than claim that nothing was written."""
    try:
        yield
    except SafeLoraError as exc:
        if not written:
            raise
        done = ", ".join(text_of_path(p) for p in written)
        exc.message = exc.message.replace("; nothing was written", "") + f" Already written, whole: {done}."
        raise


def _write(plan: OutputPlan, adapters: list[tuple[Origin, Adapter]], analyses: list[Analysis],
           copies: list[CopyPlan | None], reports: list[Report], written: list[Path]) -> None:
    for target, (origin, adapter), analysis, copy, report in zip(plan.adapter_dirs, adapters, analyses, copies,
                                                                  reports, strict=True):
        assert copy is not None
        inputs = {name: entry["source"] for name, entry in report["inputs"].items()}
        record = provenance(f"safelora-cli {__version__}", inputs, report["settings"],
                            [r.plan.module for r in analysis.layers if r.selected])
        title = f"{text_of_path(Path(origin.spec.rstrip('/')).name or origin.spec)}, patched with Safe LoRA"
        written.append(write_patched_adapter(target, adapter, analysis.patched, copy, report, record, title))


def _render_side_files(plan: OutputPlan, reports: list[Report]) -> list[tuple[Path, bytes]]:
    """One Markdown file holding each report's section; one plot per report."""
    from safelora_cli.markdown import to_markdown

    files = []
    if plan.report_md is not None:
        files.append((plan.report_md.path, "\n".join(to_markdown(r) for r in reports).encode("utf-8")))
    if plan.plots:
        from safelora_cli.plot import render_png

        files += [(t.path, render_png(r)) for t, r in zip(plan.plots, reports, strict=True)]  # type: ignore[arg-type]
    return files


def _write_side_files(files: list[tuple[Path, bytes]], written: list[Path]) -> None:
    for path, data in files:
        created: list[Path] = []
        try:
            created = make_parents(path)
            write_file(path, data)
        except OSError as exc:
            remove_created(created)
            raise os_error(exc, path) from None
        written.append(path)
