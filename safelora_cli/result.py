"""What a run returns to its caller: the reports, the gate verdicts in them, the paths written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safelora_cli.report import Report


@dataclass(frozen=True)
class FailedGate:
    adapter: str  # the adapter's source as given
    gate: str  # e.g. "max-selected"
    message: str


@dataclass(frozen=True)
class Result:
    """The outcome of `safelora_cli.patch` or `safelora_cli.inspect`.

    Attributes:
        command: "patch" or "inspect".
        reports: one JSON document per adapter, in the order given; exactly what `--json` prints
            (see docs/report-schema.md).
        outputs: the patched adapter directories written (empty for inspect).
        warnings: things worth knowing that did not stop the run (files not copied, top-k larger
            than the number of layers).
    """

    command: str
    reports: list[Report]
    outputs: list[Path]
    warnings: list[str] = field(default_factory=list)

    @property
    def failed_gates(self) -> list[FailedGate]:
        """Every gate that did not pass, adapter by adapter."""
        return [FailedGate(str(r["inputs"]["adapter"]["source"]), g["gate"], g["message"])
                for r in self.reports for g in r["gates"] if not g["passed"]]

    @property
    def passed(self) -> bool:
        """True when every gate asked for passed (or none was asked for)."""
        return not self.failed_gates

    @property
    def report(self) -> Report:
        """The report of a run with one adapter."""
        if len(self.reports) != 1:
            raise ValueError(f"this run analysed {len(self.reports)} adapters; use .reports")
        return self.reports[0]

    def json_document(self) -> Any:
        """What `--json` prints: the report for one adapter, a list of them for several."""
        return self.reports[0] if len(self.reports) == 1 else self.reports
