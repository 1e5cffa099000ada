"""Check a subspace file's records and factors before trusting them.

The low-rank bound rests on what `safelora subspace` writes: Q's columns orthogonal, their
squared norms (the kept eigenvalues of C) descending, none below the dropped one, together no more
than ‖V‖_F. A file edited by hand, or damaged, that breaks these would give wrong cosines with
"decided" selections; so every record field is typed and every factor checked when it is read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import InputError

# Rounding allowed in the factor checks: Q is stored in float32.
_TOLERANCE = 1e-4


def bad_file(root: Path, why: str) -> InputError:
    return InputError(f"{root} is not a safelora subspace file: {why}.",
                      hint="Write one with `safelora subspace --base … --aligned … --adapter … --out DIR`.")


def _number(value: Any, name: str, key: str, root: Path, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < 0:
        what = "a non-negative integer" if integer else "a finite non-negative number"
        raise bad_file(root, f"the record of {key} has {name} {value!r}, not {what}")
    return value


def check_entry(key: str, record: Any, low_rank: bool, root: Path) -> dict[str, Any]:
    """The record's fields, typed; raises `bad_file` for anything `safelora subspace` would not write."""
    if not isinstance(record, dict):
        raise bad_file(root, f"the record of {key} is not an object")
    shape = record.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool)
                                                                 and d >= 0 for d in shape):
        raise bad_file(root, f"the record of {key} has shape {shape!r}, not two sizes")
    fields: dict[str, Any] = {"shape": (shape[0], shape[1])}
    if not low_rank:
        return fields
    if not isinstance(record.get("transposed", False), bool):
        raise bad_file(root, f"the record of {key} has transposed {record.get('transposed')!r}, not true or false")
    fields["transposed"] = record.get("transposed", False)
    for name in ("v_norm", "dropped", "energy_kept"):
        fields[name] = float(_number(record.get(name), name, key, root))
    for name in ("rank", "full_rank"):
        fields[name] = int(_number(record.get(name), name, key, root, integer=True))
    if fields["energy_kept"] > 1.0 or fields["rank"] > fields["full_rank"] or \
            (fields["v_norm"] == 0.0) != (fields["rank"] == 0):
        raise bad_file(root, f"the record of {key} is inconsistent (rank {fields['rank']} of {fields['full_rank']}, "
                             f"‖V‖ {fields['v_norm']}, energy kept {fields['energy_kept']})")
    return fields


def check_document(document: dict[str, Any], root: Path) -> None:
    """The fields a patch reads beyond the entries: provenance of the models, and the modules."""
    inputs = document.get("inputs")
    if not isinstance(inputs, dict) or not all(
            isinstance(inputs.get(name), dict) and isinstance(inputs[name].get("source"), str) and
            isinstance(inputs[name].get("path"), str) and
            all(isinstance(inputs[name].get(k), str | None) for k in ("revision", "commit"))
            for name in ("base", "aligned")):
        raise bad_file(root, "its record of the base and aligned models is malformed")
    modules = document.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise bad_file(root, "its list of modules is malformed")


def check_factor(key: str, q: torch.Tensor, v_norm: float, dropped: float, root: Path) -> None:
    """Q must be what the bound assumes: finite, orthogonal columns of descending squared norm, each
    at least the dropped eigenvalue, summing to at most ‖V‖_F (Σ_{j≤k} σ_j²/‖V‖_F ≤ ‖V‖_F)."""
    q64 = q.double()
    if not bool(torch.isfinite(q64).all()):
        raise bad_file(root, f"the factor of {key} contains NaN or Inf values")
    if q64.shape[1] == 0:
        return
    gram = q64.T @ q64
    kept = torch.diagonal(gram)
    scale = float(kept.max())
    off = gram - torch.diag(kept)
    problems = []
    if scale <= 0.0 or float(off.abs().max()) > _TOLERANCE * scale:
        problems.append("its columns are not orthogonal")
    if bool((kept[1:] > kept[:-1] * (1 + _TOLERANCE) + _TOLERANCE * scale).any()):
        problems.append("its eigenvalues are not in descending order")
    if float(kept.min()) < dropped * (1 - _TOLERANCE) or float(kept.sum()) > v_norm * (1 + _TOLERANCE):
        problems.append("its eigenvalues disagree with the recorded ‖V‖ and dropped eigenvalue")
    if problems:
        raise bad_file(root, f"the factor of {key} is not what safelora subspace writes ({'; '.join(problems)})")
