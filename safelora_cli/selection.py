"""Which layers get projected: threshold or exactly-K lowest cosines."""

from __future__ import annotations

from collections.abc import Sequence

from safelora_cli.config import SelectionRule


def select(cosines: Sequence[float | None], rule: SelectionRule) -> list[bool]:
    """One flag per layer, in the order given (which is the layer order used to break ties).

    Undefined cosines (None) are never selected. Threshold: cosine ≤ τ (inclusive, like the
    official code, but without its rounding to 5 decimals). Top-K: exactly min(K, defined)
    layers with the lowest cosines; equal cosines are taken in layer order.
    """
    if rule.threshold is not None:
        return [c is not None and c <= rule.threshold for c in cosines]
    defined = sorted((c, i) for i, c in enumerate(cosines) if c is not None)
    chosen = {i for _, i in defined[: rule.top_k]}
    return [i in chosen for i in range(len(cosines))]


def could_select(cosine: float | None, rule: SelectionRule) -> bool:
    """Whether a layer may still be selected before the other layers' cosines are known.

    A threshold decides each layer alone; top-K needs them all, so anything defined may be.
    """
    if cosine is None:
        return False
    return rule.threshold is None or cosine <= rule.threshold
