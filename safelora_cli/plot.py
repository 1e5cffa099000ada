"""The picture of a report: cosine per layer for each module type, like Fig. 4 of the paper.

matplotlib is an optional extra (`pip install 'safelora-cli[plot]'`); it is imported only
when a plot is asked for, and `require_matplotlib` lets the CLI fail before any work is done.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any

from safelora_cli.errors import UsageError

INSTALL_HINT = "Install the plot extra: pip install 'safelora-cli[plot]' (or pip install matplotlib)."
_UNDEFINED_COLOR = "0.45"
_SELECTED_COLOR = "#d62728"


def require_matplotlib() -> None:
    """Raises:
        UsageError: when matplotlib is not installed, with the command that installs it.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed.", hint=INSTALL_HINT) from None


def module_type(module: str) -> str:
    """`model.layers.3.self_attn.q_proj` → `q_proj`."""
    return module.rsplit(".", 1)[-1]


def _positions(layers: list[dict[str, Any]]) -> dict[str, float]:
    """x of each module: its layer index; modules outside the blocks (lm_head…) go after the last."""
    indices = [r["layer_index"] for r in layers if r["layer_index"] is not None]
    after = (max(indices) + 1) if indices else 0
    extra = sorted({r["module"] for r in layers if r["layer_index"] is None})
    x = {r["module"]: float(r["layer_index"]) for r in layers if r["layer_index"] is not None}
    x.update({m: float(after + i) for i, m in enumerate(extra)})
    return x


def _cutoff(report: dict[str, Any]) -> tuple[float | None, str]:
    """The horizontal line: the threshold, or for top-k the highest selected cosine."""
    rule = report["settings"]["selection"]
    if rule["rule"] == "threshold":
        return float(rule["threshold"]), f"threshold τ = {rule['threshold']:g} (select cosine ≤ τ)"
    chosen = [r["cosine"] for r in report["layers"] if r["selected"] and r["cosine"] is not None]
    if not chosen:
        return None, ""
    return max(chosen), f"top-{rule['top_k']} cutoff ({max(chosen):.3f})"


# Up to this many module types share one panel; more get one panel each (7 lines on one axes tangle).
_TYPES_PER_SHARED_PANEL = 3


def render_png(report: dict[str, Any]) -> bytes:
    """Draw the report; return PNG bytes (deterministic for the same report).

    Cosine over the layer index, one line per module type (one panel per type when there are
    many), the selection cutoff dashed, selected layers ringed in red, undefined cosines as
    grey crosses on the bottom edge (the line breaks there).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display in CI; must precede pyplot
    import matplotlib.pyplot as plt

    layers = report["layers"]
    x = _positions(layers)
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in layers:
        by_type[module_type(row["module"])].append(row)
    names = sorted(by_type)
    panels = [names] if len(names) <= _TYPES_PER_SHARED_PANEL else [[n] for n in names]
    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    width = min(7 + 0.2 * len(set(x.values())), 18) if ncols == 1 else 14
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 1.0 + 3.2 * nrows), dpi=110, layout="constrained",
                             sharex=True, sharey=True, squeeze=False)
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    low = min([r["cosine"] for r in layers if r["cosine"] is not None] + [_cutoff(report)[0] or 1.0, 0.0]) - 0.05
    flat = list(axes.flat)
    for ax, group in zip(flat, panels, strict=False):
        rows = [r for n in group for r in by_type[n]]
        for name in group:
            _draw_series(ax, sorted(by_type[name], key=lambda r: x[r["module"]]), x, name, colors[name])
        _mark_selected(ax, rows, x)
        _mark_undefined(ax, rows, x, low)
        cutoff, label = _cutoff(report)
        if cutoff is not None:
            ax.axhline(cutoff, color="black", linestyle="--", linewidth=1, label=label)
        _decorate(ax, report, x, low, title=None if len(panels) == 1 else group[0])
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    summary = report["summary"]
    _legend(fig, flat[: len(panels)], summary)
    fig.suptitle(f"Safe LoRA: {summary['selected']} of {summary['layers']} layers selected, "
                 f"{summary['undefined']} undefined", fontsize=12)
    buffer = io.BytesIO()
    # No timestamp or software tag in the file, so the same report gives the same bytes.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _draw_series(ax: Any, rows: list[dict[str, Any]], x: dict[str, float], name: str, color: str) -> None:
    # NaN for an undefined cosine breaks the line instead of bridging the gap.
    ys = [r["cosine"] if r["cosine"] is not None else math.nan for r in rows]
    ax.plot([x[r["module"]] for r in rows], ys, marker="o", markersize=4, linewidth=1.3, color=color, label=name)


def _legend(fig: Any, axes: list[Any], summary: dict[str, Any]) -> None:
    """One legend for the figure, below the panels, each label once (counts are figure-wide)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    counts = {"selected": summary["selected"], "undefined cosine": summary["undefined"]}
    labels = [f"{label} ({counts[label]})" if label in counts else label for label in handles]
    fig.legend(list(handles.values()), labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8,
               frameon=False)


def _mark_selected(ax: Any, layers: list[dict[str, Any]], x: dict[str, float]) -> None:
    pts = [(x[r["module"]], r["cosine"]) for r in layers if r["selected"] and r["cosine"] is not None]
    if pts:
        ax.scatter(*zip(*pts, strict=True), s=110, facecolors="none", edgecolors=_SELECTED_COLOR, linewidths=1.8,
                   zorder=3, label="selected")


def _mark_undefined(ax: Any, layers: list[dict[str, Any]], x: dict[str, float], low: float) -> None:
    xs = [x[r["module"]] for r in layers if r["cosine"] is None]
    if xs:
        ax.scatter(xs, [low + 0.02] * len(xs), marker="x", s=40, color=_UNDEFINED_COLOR, zorder=3,
                   label="undefined cosine")


def _decorate(ax: Any, report: dict[str, Any], x: dict[str, float], low: float, title: str | None) -> None:
    ax.set_ylim(low, 1.03)
    ax.set_xlabel("layer index")
    ax.set_ylabel("cosine(CΔW, ΔW)")
    if title is not None:
        ax.set_title(title, fontsize=10)
    ticks = sorted(set(x.values()))
    step = max(1, -(-len(ticks) // 24))  # keep tick labels legible with many layers
    # Modules outside the blocks are named on the axis instead of numbered.
    labels = {x[r["module"]]: module_type(r["module"]) for r in report["layers"] if r["layer_index"] is None}
    ax.set_xticks(ticks[::step])
    ax.set_xticklabels([labels.get(t, f"{t:g}") for t in ticks[::step]], fontsize=8)
    ax.tick_params(labelbottom=True)
    ax.grid(True, alpha=0.3)
