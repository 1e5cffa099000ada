"""Selection rules on hand-built cosines."""

from __future__ import annotations

import pytest

from safelora_cli.config import SelectionRule
from safelora_cli.errors import UsageError
from safelora_cli.selection import could_select, select


def test_threshold_is_inclusive() -> None:
    assert select([0.2, 0.5, 0.50001, 0.9], SelectionRule(threshold=0.5)) == [True, True, False, False]


def test_threshold_never_selects_undefined() -> None:
    assert select([None, 0.1, None], SelectionRule(threshold=1.0)) == [False, True, False]


def test_top_k_selects_exactly_k_lowest() -> None:
    assert select([0.9, 0.1, 0.5, 0.3], SelectionRule(threshold=None, top_k=2)) == [False, True, False, True]


def test_top_k_breaks_ties_by_layer_order() -> None:
    cosines = [0.4, 0.2, 0.2, 0.2, 0.9]
    assert select(cosines, SelectionRule(threshold=None, top_k=2)) == [False, True, True, False, False]


def test_top_k_zero_selects_nothing() -> None:
    assert select([0.1, 0.2], SelectionRule(threshold=None, top_k=0)) == [False, False]


def test_top_k_larger_than_defined_layers_takes_all_defined() -> None:
    assert select([None, 0.7, 0.3], SelectionRule(threshold=None, top_k=10)) == [False, True, True]


@pytest.mark.parametrize(
    ("threshold", "top_k"), [(0.5, 3), (None, None), (None, -1), (1.5, None), (-1.01, None)]
)
def test_invalid_rules_are_usage_errors(threshold: float | None, top_k: int | None) -> None:
    with pytest.raises(UsageError):
        SelectionRule(threshold=threshold, top_k=top_k)


def test_could_select_decides_alone_only_for_a_threshold() -> None:
    rule = SelectionRule(threshold=0.5)
    assert [could_select(c, rule) for c in (0.5, 0.51, None)] == [True, False, False]
    top_k = SelectionRule(threshold=None, top_k=1)
    assert [could_select(c, top_k) for c in (0.99, None)] == [True, False]
