"""Frozen settings, split by what they are: inputs (what to read), method (how to compute),
outputs (where to write). The policy (gates) lives in `gates`. Each is validated once, when it
is made; messages name the setting as both the Python API and the CLI call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from safelora_cli.errors import UsageError, expand_user
from safelora_cli.naming import KeyRule, parse_key_map

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
            raise UsageError("Choose one selection rule: threshold or top-k, not both.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 0):
            raise UsageError(f"top-k must be 0 or more, got {self.top_k}.")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise UsageError(f"threshold is a cosine and must lie in [-1, 1], got {self.threshold}.")

    @classmethod
    def of(cls, threshold: float | None, top_k: int | None) -> SelectionRule:
        """The rule for the two options as a user gives them: neither means the default threshold."""
        if threshold is not None and top_k is not None:
            raise UsageError("Choose one selection rule: threshold or top-k, not both.")
        if top_k is not None:
            return cls(threshold=None, top_k=top_k)
        return cls(threshold=DEFAULT_THRESHOLD if threshold is None else threshold)

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
        try:
            object.__setattr__(self, "kind", Projection(self.kind))
            object.__setattr__(self, "svd", SvdMethod(self.svd))
        except ValueError as exc:
            raise UsageError(f"{exc}; projection is approx or exact, svd is auto, full or randomized.") from None
        if self.kind is Projection.APPROX:
            if self.rank is not None or self.energy is not None:
                raise UsageError("rank and energy only apply with projection exact.")
            return
        if (self.rank is None) == (self.energy is None):
            raise UsageError(
                "projection exact needs exactly one of rank K or energy E.",
                hint="Without a truncation the exact projector of a full-rank V is the identity.",
            )
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"rank must be 1 or more, got {self.rank}.")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UsageError(f"energy is a fraction of Σσ² in (0, 1], got {self.energy}.")


@dataclass(frozen=True)
class Inputs:
    """What to read: the two models (or a subspace file in their place), one or more adapters of
    them, and how to find their files."""

    base: str | None
    adapters: tuple[str, ...]
    aligned: str | None = None  # None: the model named by the adapters' configs
    base_revision: str | None = None
    aligned_revision: str | None = None
    adapter_revision: str | None = None
    # PEFT's subfolder name of one of several adapters saved together (None: the top-level one).
    adapter_name: str | None = None
    # `REGEX=REPLACEMENT` rules applied to adapter module names before checkpoint lookup.
    key_map: tuple[str, ...] = ()
    token: str | None = field(default=None, repr=False)
    # A file written by `safelora subspace`, read instead of base and aligned.
    subspace: str | None = None
    subspace_revision: str | None = None
    key_rules: tuple[KeyRule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.subspace is None and self.base is None:
            raise UsageError("Give the base model (--base), or a subspace file (--subspace) in place of the models.")
        if self.subspace is not None:
            given = [f"--{n.replace('_', '-')}" for n in ("base", "aligned", "base_revision", "aligned_revision")
                     if getattr(self, n) is not None]
            if given:
                raise UsageError(f"--subspace replaces the base and aligned models; drop {', '.join(given)}.")
        elif self.subspace_revision is not None:
            raise UsageError("--subspace-revision applies to --subspace.")
        named = (("base", self.base), ("aligned", self.aligned), ("subspace", self.subspace),
                 *(("adapter", a) for a in self.adapters))
        for name, value in named:
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UsageError(f"{name} must be a non-empty path or Hub id, got {value!r}.")
        object.__setattr__(self, "key_rules", parse_key_map(self.key_map))  # parsed once, here


@dataclass(frozen=True)
class Method:
    """How to compute: which layers to select, which projection, on which device."""

    selection: SelectionRule = field(default_factory=SelectionRule)
    projection: ProjectionSettings = field(default_factory=ProjectionSettings)
    device: str = "auto"

    def record(self) -> dict[str, Any]:
        """The settings as plain JSON values, for the report and the provenance metadata."""
        selection: dict[str, Any] = {"rule": self.selection.kind}
        if self.selection.threshold is not None:
            selection["threshold"] = self.selection.threshold
        else:
            selection["top_k"] = self.selection.top_k
        projection = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self.projection).items()}
        return {"selection": selection, "projection": projection, "device": self.device}


@dataclass(frozen=True)
class Outputs:
    """Where to write: the patched adapter directory (patch only) and the optional side files."""

    out: Path | None = None
    force: bool = False
    report_md: Path | None = None
    plot: Path | None = None

    def __post_init__(self) -> None:
        for name in ("out", "report_md", "plot"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, expand_user(value))
