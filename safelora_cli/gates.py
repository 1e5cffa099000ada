"""Policy gates for CI: rules on a finished analysis that decide whether an adapter may ship.

Pure: parsing a limit and judging per-layer results, no I/O. A failed gate does not undo the
work (the patched adapter and its report are written); the CLI turns it into exit code 3.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from safelora_cli.errors import UsageError

_LIMIT = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<percent>%?)\s*$")


@dataclass(frozen=True)
class SelectedLimit:
    """The most layers the selection rule may pick: a count, or a percentage of all layers."""

    value: float
    percent: bool

    def __str__(self) -> str:
        number = f"{self.value:g}"
        return f"{number}%" if self.percent else number

    def allowed(self, layers: int) -> int:
        """How many selected layers still pass, out of `layers` (20% of 6 layers → 1)."""
        if not self.percent:
            return int(self.value)
        # A tiny tolerance so that 30% of 10 layers allows 3 despite 0.3·10 = 2.9999999999999996.
        return math.floor(self.value * layers / 100 + 1e-9)


def parse_selected_limit(text: str) -> SelectedLimit:
    """`"3"` → at most 3 layers; `"20%"` → at most 20 % of the analysed layers.

    Raises:
        UsageError: for anything else (negative, not a number, over 100 %, a fractional count).
    """
    match = _LIMIT.match(text)
    if match is None:
        raise UsageError(f"--max-selected takes a count like 3 or a percentage like 20%, got {text!r}.")
    value, percent = float(match["number"]), bool(match["percent"])
    if percent and value > 100:
        raise UsageError(f"--max-selected {text}: a percentage must lie in [0%, 100%].")
    if not percent and not value.is_integer():
        raise UsageError(f"--max-selected {text}: a count must be a whole number; add % for a percentage.")
    return SelectedLimit(value, percent)


@dataclass(frozen=True)
class Gates:
    """The gates asked for; both None means no gate."""

    max_selected: SelectedLimit | None = None
    fail_below: float | None = None

    def __post_init__(self) -> None:
        if self.fail_below is not None and not -1.0 <= self.fail_below <= 1.0:
            raise UsageError(f"--fail-below is a cosine and must lie in [-1, 1], got {self.fail_below}.")


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict, as recorded in the report.

    Attributes:
        gate: the option that set it, e.g. "max-selected".
        limit: the limit as the user wrote it, e.g. "20%" or "0.3".
        observed: what was measured (selected layers, or the lowest defined cosine; None if none).
        passed: whether the adapter passes this gate.
        message: one sentence for people.
    """

    gate: str
    limit: str
    observed: int | float | None
    passed: bool
    message: str


def check_max_selected(limit: SelectedLimit, selected: Sequence[bool]) -> GateResult:
    """Fail when the rule selects more layers than `limit` allows."""
    count, total = sum(selected), len(selected)
    allowed = limit.allowed(total)
    passed = count <= allowed
    share = f" ({100 * count / total:.1f}%)" if total else ""
    verdict = "within" if passed else "over"
    message = (f"{count} of {total} layers selected{share}, {verdict} --max-selected {limit} "
               f"(at most {allowed}).")
    return GateResult("max-selected", str(limit), count, passed, message)


def check_fail_below(tau: float, cosines: Sequence[float | None], modules: Sequence[str]) -> GateResult:
    """Fail when any defined cosine is below `tau`; undefined cosines are not judged."""
    defined = [(c, m) for c, m in zip(cosines, modules, strict=True) if c is not None]
    low = [(c, m) for c, m in defined if c < tau]
    lowest = min(defined)[0] if defined else None
    if low:
        worst_cosine, worst_module = min(low)
        message = (f"{len(low)} layer(s) have a cosine below --fail-below {tau:g}; the lowest is "
                   f"{worst_cosine:.4f} in {worst_module}.")
    else:
        message = f"No defined cosine is below --fail-below {tau:g} ({len(defined)} defined)."
    return GateResult("fail-below", f"{tau:g}", lowest, not low, message)


def evaluate(gates: Gates, cosines: Sequence[float | None], selected: Sequence[bool],
             modules: Sequence[str]) -> list[GateResult]:
    """Every requested gate's result, in a fixed order (max-selected, then fail-below)."""
    results = []
    if gates.max_selected is not None:
        results.append(check_max_selected(gates.max_selected, selected))
    if gates.fail_below is not None:
        results.append(check_fail_below(gates.fail_below, cosines, modules))
    return results
