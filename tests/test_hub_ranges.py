"""Hub models read tensor by tensor: byte ranges into our own cache, served by the stand-in Hub."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import torch
from conftest import Trio
from helpers import read_adapter, run_cli, trio_args
from hub_server import FakeRepo, HubServer, files_of
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from test_hub import HUB_ARGS, cosines, inspect_json, point_hub_at

from safelora_cli import remote, sources
from safelora_cli.cache_dir import cache_root
from safelora_cli.checkpoint import INDEX_FILE, SINGLE_FILE, read_index
from safelora_cli.report import REPORT_NAME
from safelora_cli.subset import Header, header_length, parse_header


@contextlib.contextmanager
def serving(trio: Trio, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The trio as org/base, org/aligned, org/adapter on a stand-in Hub; caches under `cache`."""
    server = HubServer().start()
    for name in ("base", "aligned", "adapter"):
        server.repos[f"org/{name}"] = FakeRepo()
        server.repos[f"org/{name}"].add_commit(files_of(getattr(trio, name)))
    point_hub_at(monkeypatch, server.url, cache / "hf-cache", offline=False)
    monkeypatch.setattr(remote, "GAP", 0)  # exact byte counts: no neighbouring ranges merged across a gap
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub(sharded_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serving(sharded_trio, tmp_path, monkeypatch) as server:
        yield server


@pytest.fixture
def single_hub(llama_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A single-file model (model.safetensors)."""
    with serving(llama_trio, tmp_path, monkeypatch) as server:
        yield server


def local_header(path: Path) -> Header:
    raw = path.read_bytes()
    length = header_length(raw[:8], len(raw))
    return parse_header(raw[8:8 + length], len(raw) - 8 - length)


def needed_names(adapter: Path) -> set[str]:
    names = load_file(str(adapter / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight") for k in names if ".lora_A." in k}


def expected_bytes(model: Path, names: set[str], known: set[str] = frozenset(), seen: set[str] = frozenset()) -> int:
    """Bytes a run must fetch for `names` (those in `known` already cached): the needed tensors,
    plus each shard's header the first time the shard is read (`seen`: shards read before)."""
    weight_map = read_index(model / INDEX_FILE, "base")
    total = 0
    for shard in {weight_map[n] for n in names - known}:
        header = local_header(model / shard)
        total += 0 if shard in seen else header.data_start
        total += sum(header.tensors[n].size for n in names - known if weight_map[n] == shard)
    return total


def served_for(hub: HubServer, repo: str, suffix: str = ".safetensors") -> int:
    return sum(n for key, n in hub.served.items() if key.startswith(repo + "/") and key.endswith(suffix))


def subset_files() -> list[Path]:
    return sorted(p for p in cache_root().rglob("*.safetensors"))


def test_an_uncached_hub_patch_equals_the_local_one(hub: HubServer, sharded_trio: Trio, tmp_path: Path) -> None:
    remote_out, local_out = tmp_path / "from-hub", tmp_path / "from-disk"
    assert run_cli("patch", *HUB_ARGS, "--out", remote_out, "--device", "cpu", "--quiet").exit_code == 0
    assert run_cli("patch", *trio_args(sharded_trio), "--out", local_out, "--device", "cpu", "--quiet").exit_code == 0
    hub_report, local_report = (json.loads((out / REPORT_NAME).read_text()) for out in (remote_out, local_out))
    assert hub_report["layers"] == local_report["layers"] and hub_report["summary"] == local_report["summary"]
    hub_tensors, local_tensors = read_adapter(remote_out)[0], read_adapter(local_out)[0]
    assert hub_tensors.keys() == local_tensors.keys()
    assert all(torch.equal(hub_tensors[k], local_tensors[k]) for k in hub_tensors)
    assert subset_files() and all(p.is_relative_to(cache_root() / "hub") for p in subset_files())


def test_only_the_needed_tensors_and_headers_are_served(hub: HubServer, sharded_trio: Trio) -> None:
    report = inspect_json(*HUB_ARGS)
    needed = needed_names(sharded_trio.adapter)
    shards = {shard for shard in read_index(sharded_trio.base / INDEX_FILE, "base").values()}
    shard_bytes = sum((sharded_trio.base / shard).stat().st_size for shard in shards)
    for name, model in (("base", sharded_trio.base), ("aligned", sharded_trio.aligned)):
        served = served_for(hub, f"org/{name}")
        assert served == expected_bytes(model, needed)
        assert served >= sum(local_header(model / s).tensors[n].size for n in needed for s in shards
                             if n in local_header(model / s).tensors)
        assert served < shard_bytes / 2  # the test models are tiny: far below is "under half"
        small = served_for(hub, f"org/{name}", ".json")
        assert report["inputs"][name]["bytes_downloaded"] == served + small
    adapter_files = sum(n for key, n in hub.served.items() if key.startswith("org/adapter/"))
    assert report["inputs"]["adapter"]["bytes_downloaded"] == adapter_files > 0


def count_runs(header: Header, names: set[str]) -> int:
    """Maximal runs of back-to-back tensors among `names`: one request each."""
    ordered = sorted(header.tensors.values(), key=lambda e: e.begin)
    chosen = [any(header.tensors[n] is e for n in names if n in header.tensors) for e in ordered]
    return sum(1 for i, flag in enumerate(chosen) if flag and (i == 0 or not chosen[i - 1]))


def test_back_to_back_tensors_come_in_one_request(hub: HubServer, sharded_trio: Trio) -> None:
    inspect_json(*HUB_ARGS)
    needed = needed_names(sharded_trio.adapter)
    weight_map = read_index(sharded_trio.base / INDEX_FILE, "base")
    shards = {weight_map[n] for n in needed}
    runs = sum(count_runs(local_header(sharded_trio.base / s), needed) for s in shards)
    gets = [p for m, p in hub.log if m == "GET" and "/org/base/" in p and p.endswith(".safetensors")]
    assert len(gets) == 2 * len(shards) + runs  # two for each header, one per run
    assert runs < len(needed)  # q and v of a layer lie next to each other somewhere, or this means little


def test_coalescing_merges_neighbours_within_the_gap() -> None:
    header = parse_header(json.dumps({"a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]},
                                      "b": {"dtype": "U8", "shape": [5], "data_offsets": [10, 15]},
                                      "c": {"dtype": "U8", "shape": [100], "data_offsets": [15, 115]},
                                      "d": {"dtype": "U8", "shape": [3], "data_offsets": [115, 118]}}).encode(), 118)
    assert remote.coalesce(header, {"a", "b", "d"}, gap=0) == [(0, 15, ["a", "b"]), (115, 118, ["d"])]
    assert remote.coalesce(header, {"a", "d"}, gap=104) == [(0, 10, ["a"]), (115, 118, ["d"])]
    assert remote.coalesce(header, {"a", "d"}, gap=105) == [(0, 118, ["a", "d"])]


def test_a_rerun_makes_no_file_request_also_offline(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    first = inspect_json(*HUB_ARGS)
    hub.log.clear()
    again = inspect_json(*HUB_ARGS)
    assert hub.file_requests() == []
    assert {n: again["inputs"][n]["bytes_downloaded"] for n in ("base", "aligned", "adapter")} == dict.fromkeys(
        ("base", "aligned", "adapter"), 0)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = inspect_json(*HUB_ARGS)
    assert hub.file_requests() == []
    assert cosines(offline) == cosines(first)


def widen_adapter(adapter: Path, base: Path, out: Path) -> None:
    """A copy of `adapter` that also adapts k_proj and o_proj (random non-zero factors)."""
    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    weight_map = read_index(base / INDEX_FILE, "base")
    gen = torch.Generator().manual_seed(11)
    for layer in range(3):
        for module in ("k_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{module}.weight"
            rows, cols = local_header(base / weight_map[name]).tensors[name].shape
            prefix = f"base_model.model.{name.removesuffix('.weight')}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, cols, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, 4, generator=gen)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    (out / "adapter_config.json").write_text(json.dumps(config))


def test_an_adapter_needing_more_fetches_only_the_missing_tensors(hub: HubServer, sharded_trio: Trio,
                                                                  tmp_path: Path) -> None:
    widen_adapter(sharded_trio.adapter, sharded_trio.base, tmp_path / "wide")
    hub.repos["org/wide"] = FakeRepo()
    hub.repos["org/wide"].add_commit(files_of(tmp_path / "wide"))
    inspect_json(*HUB_ARGS)
    first = needed_names(sharded_trio.adapter)
    weight_map = read_index(sharded_trio.base / INDEX_FILE, "base")
    hub.served.clear()
    wide = inspect_json("--base", "org/base", "--aligned", "org/aligned", "--adapter", "org/wide")
    more = needed_names(tmp_path / "wide")
    assert more > first
    expected = expected_bytes(sharded_trio.base, more, known=first, seen={weight_map[n] for n in first})
    assert served_for(hub, "org/base") == expected > 0
    assert cosines(wide) == cosines(inspect_json("--base", sharded_trio.base, "--aligned", sharded_trio.aligned,
                                                 "--adapter", tmp_path / "wide"))


def test_a_pinned_revision_fetches_that_commits_bytes(hub: HubServer, sharded_trio: Trio) -> None:
    base = hub.repos["org/base"]
    old = base.refs["main"]
    base.refs["v1"] = old
    base.add_commit(files_of(sharded_trio.aligned))  # main moves on to other weights
    report = inspect_json("--base", "org/base@v1", "--aligned", "org/aligned", "--adapter", "org/adapter")
    assert report["inputs"]["base"]["commit"] == old
    files = [path for path in hub.downloads() if "/org/base/" in path]
    assert files and all(f"/resolve/{old}/" in path for path in files)
    assert cosines(report) == cosines(inspect_json(*trio_args(sharded_trio)))
    assert {p.parent.name for p in subset_files() if "models--org--base" in str(p)} == {old}


def test_a_gated_repository_needs_the_token_for_its_ranges(hub: HubServer) -> None:
    hub.repos["org/base"].token = "hf_secret"
    result = run_cli("inspect", *HUB_ARGS)
    assert result.exit_code == 1 and "is gated" in result.stderr
    assert cosines(inspect_json(*HUB_ARGS, "--token", "hf_secret"))
    assert served_for(hub, "org/base") > 0  # the range requests were answered: they carried the token


def test_whole_files_on_request_and_a_full_hf_cache_is_used_as_is(hub: HubServer, sharded_trio: Trio,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFELORA_HUB_DOWNLOAD", "full")
    full = inspect_json(*HUB_ARGS)
    weight_map = read_index(sharded_trio.base / INDEX_FILE, "base")
    shards = {weight_map[n] for n in needed_names(sharded_trio.adapter)}
    assert served_for(hub, "org/base") == sum((sharded_trio.base / s).stat().st_size for s in shards)
    assert not cache_root().exists()
    monkeypatch.delenv("SAFELORA_HUB_DOWNLOAD")
    hub.log.clear()
    again = inspect_json(*HUB_ARGS)
    assert hub.file_requests() == [] and not cache_root().exists()
    assert cosines(again) == cosines(full)


def test_shards_in_the_hf_cache_are_read_there_and_the_others_by_range(
        hub: HubServer, sharded_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFELORA_HUB_DOWNLOAD", "full")
    inspect_json(*HUB_ARGS)  # the q/v shards, whole, into the Hugging Face cache
    monkeypatch.delenv("SAFELORA_HUB_DOWNLOAD")
    widen_adapter(sharded_trio.adapter, sharded_trio.base, tmp_path / "wide")
    hub.repos["org/wide"] = FakeRepo()
    hub.repos["org/wide"].add_commit(files_of(tmp_path / "wide"))
    hub.served.clear()
    hub.log.clear()
    wide = inspect_json("--base", "org/base", "--aligned", "org/aligned", "--adapter", "org/wide")
    weight_map = read_index(sharded_trio.base / INDEX_FILE, "base")
    whole = {weight_map[n] for n in needed_names(sharded_trio.adapter)}
    more = needed_names(tmp_path / "wide")
    ranged = {weight_map[n] for n in more} - whole
    assert ranged  # some k/o tensors lie in shards q/v did not need, or this proves nothing
    base_files = {p.rsplit("/", 1)[-1] for m, p in hub.log if "/org/base/resolve/" in p}
    assert base_files == ranged
    assert served_for(hub, "org/base") == expected_bytes(sharded_trio.base, {n for n in more
                                                                             if weight_map[n] in ranged})
    assert cosines(wide) == cosines(inspect_json("--base", sharded_trio.base, "--aligned", sharded_trio.aligned,
                                                 "--adapter", tmp_path / "wide"))


def test_a_single_file_model_is_read_by_range_and_lists_every_name(single_hub: HubServer, llama_trio: Trio) -> None:
    report = inspect_json(*HUB_ARGS)
    assert cosines(report) == cosines(inspect_json(*trio_args(llama_trio)))
    header = local_header(llama_trio.base / SINGLE_FILE)
    needed = needed_names(llama_trio.adapter)
    assert served_for(single_hub, "org/base") == header.data_start + sum(header.tensors[n].size for n in needed)
    assert served_for(single_hub, "org/base") < (llama_trio.base / SINGLE_FILE).stat().st_size / 2
    assert ("HEAD", f"/org/base/resolve/{single_hub.repos['org/base'].refs['main']}/{SINGLE_FILE}") in single_hub.log
    single_hub.log.clear()
    checkpoint, origin = sources.resolve_model("org/base", None, None, "base", lambda names: [min(needed)])
    assert checkpoint.listed == set(header.tensors)  # every name, also those not fetched
    assert set(checkpoint.tensors) == needed  # the subset holds what the first run fetched
    assert origin.bytes_downloaded == 0 and single_hub.file_requests() == []


def test_config_quantization_is_still_seen(single_hub: HubServer, llama_trio: Trio) -> None:
    repo = single_hub.repos["org/base"]
    files = dict(repo.commits[repo.refs["main"]])
    config = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}).encode()
    repo.add_commit(files)
    result = run_cli("inspect", *HUB_ARGS)
    assert result.exit_code != 0 and "config.json quantization_config: gptq" in result.stderr


def test_local_inputs_record_no_bytes(sharded_trio: Trio) -> None:
    report = inspect_json(*trio_args(sharded_trio))
    assert {report["inputs"][n]["bytes_downloaded"] for n in ("base", "aligned", "adapter")} == {None}


def test_the_stand_in_serves_ranges_as_the_hub_does(hub: HubServer, sharded_trio: Trio) -> None:
    repo = hub.repos["org/base"]
    shard = sorted(set(read_index(sharded_trio.base / INDEX_FILE, "base").values()))[0]
    data = (sharded_trio.base / shard).read_bytes()
    url = f"{hub.url}/org/base/resolve/{repo.refs['main']}/{shard}"
    cases = {"bytes=0-7": (206, data[:8]), "bytes=10-": (206, data[10:]), "bytes=-5": (206, data[-5:]),
             f"bytes={len(data)}-": (416, b"")}
    for asked, (status, body) in cases.items():
        response = httpx2.get(url, headers={"Range": asked})
        assert (response.status_code, response.content) == (status, body), asked
    head = httpx2.head(url, headers={"Range": "bytes=2-5"})
    assert head.status_code == 206 and head.headers["Content-Range"] == f"bytes 2-5/{len(data)}"
    assert head.headers["Content-Length"] == "4" and head.content == b""
    assert struct.unpack("<Q", data[:8])[0] == local_header(sharded_trio.base / shard).length
