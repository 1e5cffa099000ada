"""Property tests: mutated adapter configs, index files and safetensors headers give either a
result or the tool's one-line error (exit 1 or 2) — never a traceback.

The CLI runs in-process on a micro model so that 1,000+ cases stay within seconds. Examples
are derandomized so CI sees the same cases every run.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import typer.main
import typer.testing
from helpers import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safelora_cli.cli import app
from safelora_cli.demo import LlamaShape, write_trio
from safelora_cli.report import json_schema

MICRO = LlamaShape(hidden=8, intermediate=8, layers=2, heads=2, kv_heads=2, vocab=16)
FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values that have broken parsers before: zero, negatives, infinities, regex metacharacters, huge ints.
edge_values = st.sampled_from([0, -1, 0.5, 1e400, -1e400, 2**70, "", "abc", "(", None, True, [], {}, {"(": 2},
                               {"q_proj": "x"}, {".*": 0}, ["q_proj"], [-1], "all-linear"])
json_values = edge_values | st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONFIG_FIELDS = ["r", "lora_alpha", "peft_type", "use_dora", "fan_in_fan_out", "target_parameters",
                 "alpha_pattern", "rank_pattern", "use_rslora", "target_modules", "layers_to_transform",
                 "layers_pattern", "modules_to_save", "lora_bias", "base_model_name_or_path", "exclude_modules"]
SCHEMA = jsonschema.Draft202012Validator(json_schema())
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X9", 7]


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro trio with a sharded base (so there is an index to mutate)."""
    root = tmp_path_factory.mktemp("micro")
    write_trio(root, MICRO, dtype=__import__("torch").float32, layers_per_shard=1)
    return root


class Workspace:
    """Fresh copies of the micro trio's inputs for each example; only mutated copies are written."""

    def __init__(self, micro: Path, work: Path) -> None:
        self.micro, self.work = micro, work

    def fresh(self, name: str) -> Path:
        target = self.work / name
        shutil.rmtree(target, ignore_errors=True)
        return Path(shutil.copytree(self.micro / name, target))

    def run(self, base: Path | None = None, adapter: Path | None = None):  # type: ignore[no-untyped-def]
        return run_cli("inspect", "--base", base or self.micro / "base", "--aligned", self.micro / "aligned",
                       "--adapter", adapter or self.micro / "adapter", "--device", "cpu", "--format", "json",
                       "--quiet")


def assert_clean(result) -> None:  # type: ignore[no-untyped-def]
    """Success, or exactly one 'Error:' line and exit 1/2 (a bug would have raised out of run_cli)."""
    if result.exit_code == 0:
        # Strict JSON (no NaN/Infinity) that matches the published schema.
        report = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in the report"))
        SCHEMA.validate(report)
        return
    assert result.exit_code in (1, 2), (result.exit_code, result.stderr)
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stdout == ""


@pytest.fixture
def ws(micro: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    # Building the click command from the Typer app costs more than a micro run: build it once.
    command = typer.main.get_command(app)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: command)
    return Workspace(micro, tmp_path)


def test_micro_trio_is_valid(ws: Workspace) -> None:
    result = ws.run()
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["layers"]) == 4


config_edits = st.dictionaries(st.sampled_from(CONFIG_FIELDS), st.just("<delete>") | edge_values | json_values,
                               min_size=1, max_size=3)


@settings(FUZZ, max_examples=400)
@given(edits=config_edits, whole=st.none() | json_values)
def test_mutated_adapter_config(ws: Workspace, edits: dict, whole: object) -> None:  # type: ignore[type-arg]
    adapter = ws.fresh("adapter")
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in edits.items():
        if value == "<delete>":
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config if whole is None else whole))
    assert_clean(ws.run(adapter=adapter))


def _index_mutations(index: dict, shards: list[str]) -> st.SearchStrategy[object]:  # type: ignore[type-arg]
    names = list(index["weight_map"])
    shard_names = st.sampled_from([*shards, "", "nope.safetensors", "../aligned/model-00001-of-00003.safetensors",
                                   "/etc/hostname", "config.json", "."])
    remap = st.dictionaries(st.sampled_from(names), shard_names | json_values, max_size=4).map(
        lambda m: {**index, "weight_map": {**index["weight_map"], **m}})
    drop = st.sets(st.sampled_from(names), max_size=4).map(
        lambda gone: {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if k not in gone}})
    extra = st.dictionaries(st.text(min_size=1, max_size=10), shard_names, max_size=3).map(
        lambda m: {**index, "weight_map": {**index["weight_map"], **m}})
    structure = st.dictionaries(st.sampled_from(["metadata", "weight_map", "x"]), json_values, max_size=3)
    return remap | drop | extra | structure | json_values


@settings(FUZZ, max_examples=250)
@given(data=st.data(), raw=st.none() | st.binary(max_size=40))
def test_mutated_index(ws: Workspace, data: st.DataObject, raw: bytes | None) -> None:
    base = ws.fresh("base")
    path = base / "model.safetensors.index.json"
    if raw is not None and data.draw(st.booleans()):
        path.write_bytes(raw)
    else:
        index = json.loads(path.read_text())
        shards = sorted({*index["weight_map"].values()})
        path.write_text(json.dumps(data.draw(_index_mutations(index, shards))))
    assert_clean(ws.run(base=base))


def _header_entry() -> st.SearchStrategy[object]:
    shape = st.lists(st.integers(-2, 40), max_size=3) | json_values
    offsets = st.lists(st.integers(-4, 5000), min_size=0, max_size=3) | json_values
    entry = st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": shape, "data_offsets": offsets})
    return entry | json_values


def _header_bytes(header: object) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded


@st.composite
def mutated_safetensors(draw: st.DrawFn, original: bytes) -> bytes:
    """Garbage, truncations, byte flips, lying lengths, and well-formed JSON of the wrong structure."""
    header_len = struct.unpack("<Q", original[:8])[0]
    header = json.loads(original[8 : 8 + header_len])
    kind = draw(st.sampled_from(["garbage", "truncate", "flip", "length", "entries", "retype"]))
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "flip":
        data = bytearray(original)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 8 + header_len - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + original[8:]
    body = original[8 + header_len :]
    keys = [k for k in header if k != "__metadata__"]
    if kind == "entries":
        changes = draw(st.dictionaries(st.sampled_from(keys), _header_entry(), min_size=1, max_size=3))
        return _header_bytes({**header, **changes}) + body
    # retype: keep offsets consistent with the data but change dtype/shape, or use a foreign structure.
    key = draw(st.sampled_from(keys))
    entry = dict(header[key])
    entry[draw(st.sampled_from(["dtype", "shape"]))] = draw(st.sampled_from(DTYPES) | st.lists(st.integers(0, 9),
                                                                                                 max_size=3))
    whole = draw(st.none() | json_values)
    return _header_bytes({**header, key: entry} if whole is None else whole) + body


def _fuzz_file(ws: Workspace, data: st.DataObject, which: str, pick: Callable[[Path], Path]) -> None:
    root = ws.fresh(which)
    target = pick(root)
    target.write_bytes(data.draw(mutated_safetensors(target.read_bytes())))
    assert_clean(ws.run(**{which: root}))


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_mutated_adapter_safetensors(ws: Workspace, data: st.DataObject) -> None:
    _fuzz_file(ws, data, "adapter", lambda root: root / "adapter_model.safetensors")


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_mutated_checkpoint_shard(ws: Workspace, data: st.DataObject) -> None:
    _fuzz_file(ws, data, "base", lambda root: data.draw(st.sampled_from(sorted(root.glob("model-*.safetensors")))))
