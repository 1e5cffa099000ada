"""Inputs from the Hub, served by a stand-in on 127.0.0.1 or read from a pre-built offline cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Trio
from helpers import run_cli, trio_args
from hub_server import FakeRepo, HubServer, files_of
from huggingface_hub import constants

from safelora_cli.checkpoint import INDEX_FILE, read_index, shards_for
from safelora_cli.report import REPORT_NAME

NEEDED = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(3) for m in ("q_proj", "v_proj")}
HUB_ARGS = ["--base", "org/base", "--aligned", "org/aligned", "--adapter", "org/adapter"]


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path, offline: bool) -> None:
    """huggingface_hub reads these at import time: set the module constants, not the environment.
    Our own tensor cache goes beside the Hugging Face one."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("SAFELORA_CACHE", str(cache.parent / "safelora-cache"))
    monkeypatch.delenv("SAFELORA_HUB_DOWNLOAD", raising=False)


@pytest.fixture
def hub(sharded_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    server = HubServer().start()
    for name, folder in (("base", sharded_trio.base), ("aligned", sharded_trio.aligned),
                         ("adapter", sharded_trio.adapter)):
        server.repos[f"org/{name}"] = FakeRepo()
        server.repos[f"org/{name}"].add_commit(files_of(folder))
    point_hub_at(monkeypatch, server.url, tmp_path / "cache", offline=False)
    yield server
    server.stop()


def inspect_json(*args: object) -> dict:  # type: ignore[type-arg]
    result = run_cli("inspect", *args, "--format", "json", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def cosines(report: dict) -> list[float | None]:  # type: ignore[type-arg]
    return [layer["cosine"] for layer in report["layers"]]


def test_hub_inputs_give_the_same_result_as_local_ones(hub: HubServer, sharded_trio: Trio) -> None:
    assert cosines(inspect_json(*HUB_ARGS)) == cosines(inspect_json(*trio_args(sharded_trio)))


def test_only_the_index_and_the_needed_shards_are_downloaded(hub: HubServer, sharded_trio: Trio) -> None:
    inspect_json(*HUB_ARGS)
    weight_map = read_index(sharded_trio.base / INDEX_FILE, "base")
    needed = set(shards_for(weight_map, NEEDED))
    assert needed < set(weight_map.values())  # the test means something only if some shards are not needed
    fetched = {path.rsplit("/", 1)[-1] for path in hub.downloads() if "/org/base/" in path}
    assert fetched == {INDEX_FILE, "config.json", *needed}


def test_a_second_run_downloads_nothing(hub: HubServer) -> None:
    inspect_json(*HUB_ARGS)
    hub.log.clear()
    inspect_json(*HUB_ARGS)
    assert [entry for entry in hub.log if "/resolve/" in entry[1]] == []


def test_report_records_the_resolved_commits(hub: HubServer) -> None:
    report = inspect_json(*HUB_ARGS)
    for name in ("base", "aligned", "adapter"):
        record = report["inputs"][name]
        assert record["source"] == f"org/{name}"
        assert record["revision"] is None
        assert record["commit"] == hub.repos[f"org/{name}"].refs["main"]
    assert report["inputs"]["aligned"]["from_adapter_config"] is False


def test_a_revision_pins_every_file_to_its_commit(hub: HubServer, sharded_trio: Trio) -> None:
    base = hub.repos["org/base"]
    old = base.refs["main"]
    base.refs["v1"] = old
    broken = {**base.commits[old]}
    broken.pop(INDEX_FILE)  # main moves on to a commit without the sharded layout
    base.add_commit(broken)
    report = inspect_json("--base", "org/base@v1", "--aligned", "org/aligned", "--adapter", "org/adapter")
    assert report["inputs"]["base"]["revision"] == "v1"
    assert report["inputs"]["base"]["commit"] == old
    files = [path for path in hub.downloads() if "/org/base/" in path]
    assert files and all(f"/resolve/{old}/" in path for path in files)


def test_a_revision_given_twice_must_agree(hub: HubServer) -> None:
    result = run_cli("inspect", "--base", "org/base@v1", "--base-revision", "v2", "--aligned", "org/aligned",
                     "--adapter", "org/adapter")
    assert result.exit_code == 2
    assert "names revision 'v1' but --base-revision says 'v2'" in result.stderr


def set_adapter_repo_config(hub: HubServer, **changes: object) -> None:
    repo = hub.repos["org/adapter"]
    files = repo.commits[repo.refs["main"]]
    config = {**json.loads(files["adapter_config.json"]), **changes}
    repo.add_commit({**files, "adapter_config.json": json.dumps(config).encode()})


def test_aligned_defaults_to_the_adapter_configs_base_model(hub: HubServer) -> None:
    aligned = hub.repos["org/aligned"]
    aligned.refs["trained-on"] = aligned.refs["main"]
    set_adapter_repo_config(hub, base_model_name_or_path="org/aligned", revision="trained-on")
    report = inspect_json("--base", "org/base", "--adapter", "org/adapter")
    record = report["inputs"]["aligned"]
    assert record["source"] == "org/aligned"
    assert record["from_adapter_config"] is True
    assert (record["revision"], record["commit"]) == ("trained-on", aligned.refs["main"])


def test_without_aligned_anywhere_it_is_a_usage_error(hub: HubServer) -> None:
    set_adapter_repo_config(hub, base_model_name_or_path=None)
    result = run_cli("inspect", "--base", "org/base", "--adapter", "org/adapter")
    assert result.exit_code == 2
    assert "--aligned was not given" in result.stderr and "names no base_model_name_or_path" in result.stderr


def test_patch_from_the_hub_keeps_the_adapter_files(hub: HubServer, sharded_trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / "patched"
    result = run_cli("patch", *HUB_ARGS, "--out", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    expected = {p.name for p in sharded_trio.adapter.iterdir()} | {REPORT_NAME}
    assert {p.name for p in out.iterdir()} == expected
    card = (sharded_trio.adapter / "README.md").read_text()
    assert card.split("---\n", 2)[2].strip() in (out / "README.md").read_text()  # the repo's card, extended
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["inputs"]["adapter"]["commit"] == hub.repos["org/adapter"].refs["main"]


def test_a_gated_repository_opens_with_the_right_token(hub: HubServer) -> None:
    hub.repos["org/base"].token = "hf_secret"
    result = run_cli("inspect", *HUB_ARGS)
    assert result.exit_code == 1
    assert "is gated" in result.stderr and "--token" in result.stderr and "HF_TOKEN" in result.stderr
    assert cosines(inspect_json(*HUB_ARGS, "--token", "hf_secret"))


def drop_a_needed_shard(hub: HubServer) -> None:
    repo = hub.repos["org/base"]
    files = dict(repo.commits[repo.refs["main"]])
    weight_map = json.loads(files[INDEX_FILE])["weight_map"]
    files.pop(weight_map["model.layers.1.self_attn.q_proj.weight"])
    repo.add_commit(files)


ERRORS = {
    "repository not found": (["--base", "org/nothing"], "The base repository org/nothing was not found on the Hub"),
    "revision not found": (["--base", "org/base@nope"], "Revision 'nope' does not exist in the base repository"),
    "file missing": (["--base", "org/base"], "has no file model-0000"),
    "no weights at all": (["--base", "org/adapter"], "has none of model.safetensors.index.json"),
    "local path that is not there": (["--base", "./org/base"], "The base path ./org/base does not exist"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_hub_errors_are_one_clean_line(case: str, hub: HubServer, tmp_path: Path) -> None:
    flags, message = ERRORS[case]
    if case == "file missing":
        drop_a_needed_shard(hub)
    args = dict(zip(HUB_ARGS[::2], HUB_ARGS[1::2], strict=True)) | dict(zip(flags[::2], flags[1::2], strict=True))
    result = run_cli("patch", *[x for kv in args.items() for x in kv], "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) <= 2  # Error + Hint
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_says_so(sharded_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = HubServer()  # take a free port, then close it: connections to it are refused
    url = server.url
    server.stop()
    point_hub_at(monkeypatch, url, tmp_path / "cache", offline=False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
    result = run_cli("inspect", "--base", "org/base", "--aligned", sharded_trio.aligned, "--adapter",
                     sharded_trio.adapter)
    assert result.exit_code == 1
    assert "Cannot reach the Hub" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr


def test_offline_with_an_empty_cache_says_what_to_do(sharded_trio: Trio, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "empty-cache", offline=True)
    result = run_cli("inspect", "--base", "org/base", "--aligned", sharded_trio.aligned, "--adapter",
                     sharded_trio.adapter)
    assert result.exit_code == 1
    assert "is not in the local cache" in result.stderr and "HF_HUB_OFFLINE is set" in result.stderr


def build_cache(cache: Path, repo_id: str, folder: Path, commit: str) -> None:
    """The standard cache layout: blobs by hash, a snapshot of links, refs/main without a newline."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files_of(folder).items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_offline_run_from_a_prebuilt_cache_in_a_fresh_process(sharded_trio: Trio, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE and HF_HUB_CACHE are read when huggingface_hub is imported: use a real process."""
    cache = tmp_path / "hub-cache"
    commits = {"base": "1" * 40, "aligned": "2" * 40, "adapter": "3" * 40}
    for name, commit in commits.items():
        build_cache(cache, f"org/{name}", getattr(sharded_trio, name), commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "safelora_cli", "inspect", *HUB_ARGS, "--format", "json",
                           "--device", "cpu", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {name: report["inputs"][name]["commit"] for name in commits} == commits
    assert cosines(report) == cosines(inspect_json(*trio_args(sharded_trio)))


def test_an_existing_local_directory_wins_over_a_hub_id(hub: HubServer, sharded_trio: Trio, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "base").symlink_to(sharded_trio.base)
    monkeypatch.chdir(tmp_path)
    report = inspect_json("--base", "org/base", "--aligned", "org/aligned", "--adapter", "org/adapter")
    assert report["inputs"]["base"]["commit"] is None
    assert not [path for path in hub.downloads() if "/org/base/" in path]
