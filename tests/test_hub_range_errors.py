"""Hub models read by range, when things go wrong: a misbehaving server, a damaged cache, bad names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Trio
from helpers import run_cli
from hub_server import HubServer
from test_errors_table import doc_rows, matches
from test_hub import HUB_ARGS, cosines, inspect_json
from test_hub_ranges import served_for, serving, subset_files

from safelora_cli.cache_dir import cache_root
from safelora_cli.checkpoint import INDEX_FILE, SINGLE_FILE


@pytest.fixture
def hub(sharded_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serving(sharded_trio, tmp_path, monkeypatch) as server:
        yield server


@pytest.fixture
def single_hub(llama_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serving(llama_trio, tmp_path, monkeypatch) as server:
        yield server


def documented(case: str, stderr: str, code: int, exit_code: int) -> None:
    """The error is the documented row: one line, its message, its exit code."""
    message, expected_code = doc_rows()[case]
    assert exit_code == expected_code == code, stderr
    assert stderr.startswith("Error: ") and len(stderr.splitlines()) == 1, stderr
    assert matches(message, stderr), (message, stderr)


FAULTS = [("short", "hub-short-read"), ("cut", "hub-short-read"), ("ignore-range", "hub-range-ignored"),
          ("wrong-range", "hub-wrong-range")]


@pytest.mark.parametrize("where", ["headers", "tensors"])
@pytest.mark.parametrize(("fault", "case"), FAULTS)
def test_a_misbehaving_server_caches_nothing(fault: str, case: str, where: str, hub: HubServer,
                                             tmp_path: Path) -> None:
    hub.fault = fault
    hub.fault_from = 0 if where == "headers" else 9  # a tensor's range starts after the 8 + header bytes
    result = run_cli("patch", *HUB_ARGS, "--out", tmp_path / "out", "--quiet")
    documented(case, result.stderr, 1, result.exit_code)
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in cache_root().rglob("*") if p.is_file()] if cache_root().exists() else []
    assert leftovers == []
    hub.fault = None
    assert cosines(inspect_json(*HUB_ARGS))


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_subset_file_is_fetched_again(damage: str, hub: HubServer, sharded_trio: Trio) -> None:
    first = inspect_json(*HUB_ARGS)
    victim = next(p for p in subset_files() if "models--org--base" in str(p))
    raw = victim.read_bytes()
    victim.write_bytes(raw[:-3] if damage == "truncate" else raw[:8] + b"#" + raw[9:])
    hub.served.clear()
    again = inspect_json(*HUB_ARGS)
    assert cosines(again) == cosines(first)
    shard = victim.name
    assert hub.served[f"org/base/{shard}"] > 0 and served_for(hub, "org/aligned") == 0
    assert victim.read_bytes() == raw


def test_out_inside_our_cache_is_refused(hub: HubServer, tmp_path: Path) -> None:
    inspect_json(*HUB_ARGS)
    inside = cache_root() / "hub" / "patched"
    result = run_cli("patch", *HUB_ARGS, "--out", inside, "--quiet")
    assert result.exit_code == 1 and "lies inside the safelora cache" in result.stderr
    assert not inside.exists()


def test_a_garbled_remote_header_is_one_line(single_hub: HubServer, tmp_path: Path) -> None:
    repo = single_hub.repos["org/base"]
    files = dict(repo.commits[repo.refs["main"]])
    data = bytearray(files[SINGLE_FILE])
    data[8:9] = b"["  # a JSON array, not an object
    files[SINGLE_FILE] = bytes(data)
    repo.add_commit(files)
    result = run_cli("patch", *HUB_ARGS, "--out", tmp_path / "out", "--quiet")
    documented("hub-bad-header", result.stderr, 1, result.exit_code)


def test_a_shard_outside_the_repository_is_refused(hub: HubServer, tmp_path: Path) -> None:
    repo = hub.repos["org/base"]
    files = dict(repo.commits[repo.refs["main"]])
    index = json.loads(files[INDEX_FILE])
    index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = "../../escape.safetensors"
    files[INDEX_FILE] = json.dumps(index).encode()
    repo.add_commit(files)
    result = run_cli("patch", *HUB_ARGS, "--out", tmp_path / "out", "--quiet")
    documented("hub-shard-outside", result.stderr, 1, result.exit_code)
    assert not (cache_root().parent / "escape.safetensors").exists()


def test_an_unwritable_cache_is_one_line(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("SAFELORA_CACHE", str(tmp_path / "a-file"))
    result = run_cli("patch", *HUB_ARGS, "--out", tmp_path / "out", "--quiet")
    documented("hub-cache-unwritable", result.stderr, 1, result.exit_code)


def test_an_unknown_download_mode_is_a_usage_error(hub: HubServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFELORA_HUB_DOWNLOAD", "some")
    result = run_cli("patch", *HUB_ARGS, "--out", tmp_path / "out", "--quiet")
    documented("hub-download-mode", result.stderr, 2, result.exit_code)


@pytest.mark.parametrize("inside", ["base", "adapter"])
def test_the_tensor_cache_may_not_lie_in_a_local_input(inside: str, llama_trio: Trio, hub: HubServer,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local base or adapter with a Hub aligned model: fetching would write into the local input."""
    import shutil

    from helpers import tree_digest

    local = tmp_path / "local"
    for name in ("base", "adapter"):
        shutil.copytree(getattr(llama_trio, name), local / name)
    before = tree_digest(local)
    monkeypatch.setenv("SAFELORA_CACHE", str(local / inside / "cache"))
    result = run_cli("inspect", "--base", local / "base", "--aligned", "org/aligned", "--adapter", local / "adapter")
    if inside == "base":
        documented("hub-cache-in-input", result.stderr, 1, result.exit_code)
    else:
        assert result.exit_code == 1 and "lies inside the adapter (" in result.stderr
    assert tree_digest(local) == before
