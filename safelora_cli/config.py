"""Frozen settings: what the user asked for, validated once, passed to the pipeline."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from safelora_cli.errors import UsageError
from safelora_cli.gates import Gates
from safelora_cli.naming import parse_key_map

DEFAULT_THRESHOLD = 0.5


class Projection(str, Enum):
    """Which projection replaces B: the paper's C = V·Vᵀ/‖V‖_F, or an orthogonal projector."""

    APPROX = "approx"
    EXACT = "exact"


class SvdMethod(str, Enum):
    AUTO = "auto"
    FULL = "full"
    RANDOMIZED = "randomized"


@dataclass(frozen=True)
class SelectionRule:
    """Select layers with cosine ≤ threshold, or exactly the `top_k` lowest cosines."""

    threshold: float | None = DEFAULT_THRESHOLD
    top_k: int | None = None

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.top_k is None):
            raise UsageError("Choose one selection rule: --threshold or --top-k, not both.")
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"--top-k must be 0 or more, got {self.top_k}.")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold is a cosine and must lie in [-1, 1], got {self.threshold}.")

    @property
    def kind(self) -> str:
        return "threshold" if self.threshold is not None else "top-k"


@dataclass(frozen=True)
class ProjectionSettings:
    """`approx` needs nothing more; `exact` needs exactly one of `rank` or `energy`."""

    kind: Projection = Projection.APPROX
    rank: int | None = None
    energy: float | None = None
    svd: SvdMethod = SvdMethod.AUTO

    def __post_init__(self) -> None:
        if self.kind is Projection.APPROX:
            if self.rank is not None or self.energy is not None:
                raise UsageError("--rank and --energy only apply with --projection exact.")
            return
        if (self.rank is None) == (self.energy is None):
            raise UsageError(
                "--projection exact needs exactly one of --rank K or --energy E.",
                hint="Without a truncation the exact projector of a full-rank V is the identity.",
            )
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank must be 1 or more, got {self.rank}.")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UsageError(f"--energy is a fraction of Σσ² in (0, 1], got {self.energy}.")


@dataclass(frozen=True)
class RunConfig:
    """Everything one `patch` or `inspect` run needs."""

    base: str
    aligned: str | None  # None: the model named by the adapter's config
    adapter: str
    selection: SelectionRule = field(default_factory=SelectionRule)
    projection: ProjectionSettings = field(default_factory=ProjectionSettings)
    device: str = "auto"
    out: Path | None = None
    force: bool = False
    gates: Gates = field(default_factory=Gates)
    # PEFT's subfolder name of one of several adapters saved together (None: the top-level one).
    adapter_name: str | None = None
    # `REGEX=REPLACEMENT` rules applied to adapter module names before checkpoint lookup.
    key_map: tuple[str, ...] = ()
    # Hub revisions (branch, tag or commit) and token; None: default branch, HF_TOKEN / saved login.
    base_revision: str | None = None
    aligned_revision: str | None = None
    adapter_revision: str | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parse_key_map(self.key_map)  # refuse a malformed rule before reading anything

    def settings_record(self) -> dict[str, Any]:
        """The settings as plain JSON values, for the report and the provenance metadata."""
        selection = {"rule": self.selection.kind}
        if self.selection.threshold is not None:
            selection["threshold"] = self.selection.threshold  # type: ignore[assignment]
        else:
            selection["top_k"] = self.selection.top_k  # type: ignore[assignment]
        projection = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self.projection).items()}
        record = {"selection": selection, "projection": projection, "device": self.device}
        if self.adapter_name is not None:
            record["adapter_name"] = self.adapter_name
        if self.key_map:
            record["key_map"] = list(self.key_map)
        return record
