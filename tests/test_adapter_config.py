"""adapter_config.json fields typed as PEFT writes them: the value found, the type expected."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import Trio
from helpers import run_cli, tree_digest, trio_args
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_bad_inputs import copy_trio, set_adapter_config

from safelora_cli.adapter_config import BOOLEAN_FIELDS, describe, parse_config
from safelora_cli.errors import InputError

WHERE = Path("adapter")
VALID = {"peft_type": "LORA", "r": 8, "lora_alpha": 16}


def _refusal(**fields: object) -> str:
    with pytest.raises(InputError) as info:
        parse_config({**VALID, **fields}, WHERE)
    return info.value.message


@pytest.mark.parametrize("name", BOOLEAN_FIELDS)
@pytest.mark.parametrize(("value", "found"), [("false", 'the string "false"'), ("true", 'the string "true"'),
                                              (0, "the number 0"), (None, "null"), ([], "a list")])
def test_a_boolean_field_must_be_a_json_boolean(name: str, value: object, found: str) -> None:
    assert _refusal(**{name: value}) == f"adapter/adapter_config.json: {name} must be true or false, found {found}."


@pytest.mark.parametrize(("value", "found"), [
    (0, "the number 0"), (-4, "the number -4"), (2.5, "the number 2.5"), (8.0, "the number 8.0"),
    (True, "the boolean true"), ("8", 'the string "8"'), (math.inf, "the number Infinity"),
    (math.nan, "the number NaN"), (None, "null"), ({}, "an object"),
])
def test_a_rank_must_be_a_positive_json_integer(value: object, found: str) -> None:
    assert _refusal(r=value) == f"adapter/adapter_config.json: r must be a positive whole number, found {found}."
    assert _refusal(rank_pattern={"q_proj": value}) == (
        f"adapter/adapter_config.json: rank_pattern['q_proj'] must be a positive whole number, found {found}.")


@pytest.mark.parametrize(("value", "found"), [(True, "the boolean true"), ("16", 'the string "16"'),
                                              (-math.inf, "the number -Infinity"), (None, "null")])
def test_an_alpha_must_be_a_finite_json_number(value: object, found: str) -> None:
    expected = f"adapter/adapter_config.json: lora_alpha must be a finite number, found {found}."
    assert _refusal(lora_alpha=value) == expected
    assert "alpha_pattern['v_proj'] must be a finite number" in _refusal(alpha_pattern={"v_proj": value})


def test_typed_values_are_kept_and_absent_fields_take_peft_defaults() -> None:
    config = parse_config({**VALID, "lora_alpha": 2.5, "use_rslora": True, "rank_pattern": {"q": 4},
                           "alpha_pattern": None}, WHERE)
    assert (config.r, config.lora_alpha, config.use_rslora, config.rank_pattern, config.alpha_pattern) == (
        8, 2.5, True, {"q": 4}, {})
    defaults = parse_config({"peft_type": "LORA"}, WHERE)
    assert (defaults.r, defaults.lora_alpha, defaults.fan_in_fan_out, defaults.use_dora) == (8, 8.0, False, False)


def test_huge_numbers_are_described_briefly() -> None:
    assert describe(10**400) == f"the number {str(10**400)[:12]}… (401 digits)"
    assert describe("x" * 100) == f'the string "{"x" * 40}…"'


def test_string_false_no_longer_transposes_v(llama_trio: Trio, tmp_path: Path) -> None:
    """bool("false") is True: before this check the string made every layer a Conv1D."""
    trio = copy_trio(llama_trio, tmp_path / "in")
    set_adapter_config(trio, fan_in_fan_out="false")
    result = run_cli("inspect", *trio_args(trio), "--device", "cpu")
    assert result.exit_code == 1
    assert 'fan_in_fan_out must be true or false, found the string "false"' in result.stderr


# --- a sweep of typed mutations through the CLI -------------------------------------------------

# Beyond every key PEFT wrote into the trio's config: the fields this tool reads, present or not.
CHECKED = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type", "target_parameters",
           "base_model_name_or_path", "revision", *BOOLEAN_FIELDS]
numbers = st.sampled_from([0, -1, 1, 4, 8, 2.5, 4.0, -0.0, 1e-300, 1e308, 2**63, 10**30, math.inf, -math.inf,
                           math.nan]) | st.integers(-(2**70), 2**70) | st.floats()
scalars = st.none() | st.booleans() | numbers | st.sampled_from(["false", "true", "8", "", "q_proj", "("])
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["q_proj", "v_proj", ".*", "("]), inner, max_size=3),
                    max_leaves=6)
SWEEP = settings(derandomize=True, deadline=None, database=None, max_examples=80,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sweep_trio(llama_trio: Trio, tmp_path_factory: pytest.TempPathFactory) -> Trio:
    return copy_trio(llama_trio, tmp_path_factory.mktemp("sweep"))


@SWEEP
@given(data=st.data())
def test_typed_mutations_end_in_a_result_or_one_error_line(sweep_trio: Trio, tmp_path: Path,
                                                           data: st.DataObject) -> None:
    """Invariants: exit 0, 1 or 2; never a traceback (run_cli re-raises); one `Error:` line when
    non-zero and then nothing written; every input file unchanged."""
    path = sweep_trio.adapter / "adapter_config.json"
    original = path.read_bytes()
    fields = sorted({*json.loads(original), *CHECKED})
    edits = data.draw(st.dictionaries(st.sampled_from(fields), junk, min_size=1, max_size=3), label="edits")
    try:
        path.write_text(json.dumps({**json.loads(original), **edits}))
        before = tree_digest(sweep_trio.base.parent)
        out = tmp_path / "out"
        result = run_cli("patch", *trio_args(sweep_trio), "--out", out, "--device", "cpu", "--quiet", "--force")
        assert result.exit_code in (0, 1, 2), result.stderr
        event(f"exit {result.exit_code}")
        if result.exit_code != 0:
            assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.stderr
            assert list(tmp_path.iterdir()) == []  # no output, no staging directory left behind
        shutil.rmtree(out, ignore_errors=True)  # examples share tmp_path
        assert tree_digest(sweep_trio.base.parent) == before
    finally:
        path.write_bytes(original)
