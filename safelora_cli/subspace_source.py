"""`--subspace`: resolve the file (local or Hub, only the tensors the adapters need) and check it
can stand in for the models for these adapters."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from safelora_cli.adapter import Adapter
from safelora_cli.config import Inputs
from safelora_cli.errors import InputError, SafeLoraError, UnsupportedError, format_keys
from safelora_cli.naming import apply_key_map, resolve_key
from safelora_cli.pairing import needed_weight_keys
from safelora_cli.report import text_of_path
from safelora_cli.sources import Origin, aligned_from_adapter, resolve_model
from safelora_cli.subspace_file import Subspace, open_subspace


def _refuse_dora(adapters: list[tuple[Origin, Adapter]]) -> None:
    for origin, adapter in adapters:
        if adapter.config.use_dora:
            raise UnsupportedError(f"{origin.spec} is a DoRA adapter; its magnitude vectors are recomputed from "
                                   "W_aligned, which a subspace file does not hold.",
                                   hint="Patch DoRA adapters with --base and --aligned.")


def _refuse_uncovered(subspace: Subspace, adapters: list[tuple[Origin, Adapter]], inputs: Inputs) -> None:
    """Every adapted module must have its weight in the file: one line naming those that do not."""
    keys = subspace.checkpoint.tensors
    for origin, adapter in adapters:
        names = [(m.module, apply_key_map(m.module, inputs.key_rules)) for m in adapter.modules]
        missing = [module for module, name in names if resolve_key(name, keys, subspace.root, "subspace").key is None]
        if missing:
            covered = ", ".join(subspace.provenance.get("modules", [])) or "none"
            raise InputError(f"The subspace file {subspace.root} holds no weight for {len(missing)} module(s) of "
                             f"the adapter {origin.spec}: {format_keys(missing)} (it covers {covered}).",
                             hint="Write a subspace file for this adapter: safelora subspace --base … --aligned … "
                             f"--adapter {origin.spec} --out DIR.")


def _warn_other_model(subspace: Subspace, adapters: list[tuple[Origin, Adapter]], warn: Callable[[str], None]) -> None:
    """An adapter whose config names another Hub model than the file was made from is worth a warning
    (local paths and Hub ids cannot be compared, so only two Hub ids are)."""
    made_from = subspace.provenance.get("inputs", {}).get("aligned", {})
    if not made_from.get("commit"):
        return
    name = str(made_from["source"]).split("@", 1)[0]
    for origin, adapter in adapters:
        try:
            named, _ = aligned_from_adapter(adapter.raw_config, adapter.path, None)
        except SafeLoraError:  # a config naming nothing usable names nothing to compare
            continue
        if "/" in named and not named.startswith((".", "/", "~")) and named.split("@", 1)[0] != name:
            warn(f"{origin.spec} was trained on {named}, but the subspace file was made from {name}.")


def resolve_subspace(inputs: Inputs, adapters: list[tuple[Origin, Adapter]],
                     warn: Callable[[str], None]) -> tuple[Subspace, dict[str, dict[str, Any]]]:
    """The subspace file, checked for these adapters, and the report's records of the models it
    stands for (as the file recorded them) and of itself."""
    assert inputs.subspace is not None
    _refuse_dora(adapters)

    def needed(listed: Collection[str]) -> set[str]:
        return set().union(*(needed_weight_keys(a, inputs.key_rules, listed) for _, a in adapters))

    checkpoint, origin = resolve_model(inputs.subspace, inputs.subspace_revision, inputs.token, "subspace", needed)
    subspace = open_subspace(origin.path, checkpoint)
    _refuse_uncovered(subspace, adapters, inputs)
    _warn_other_model(subspace, adapters, warn)
    recorded = subspace.provenance.get("inputs", {})
    # The models themselves were not read in this run: nothing was downloaded for them.
    records = {name: {**recorded[name], "via_subspace": True, "bytes_downloaded": 0 if recorded[name].get("commit")
                      else None} for name in ("base", "aligned") if name in recorded}
    records["subspace"] = {"source": text_of_path(origin.spec), "path": text_of_path(origin.path), **origin.record()}
    return subspace, records
