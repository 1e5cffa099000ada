"""`safelora subspace` and `patch/inspect --subspace`: the file stands in for the two models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import read_adapter, run_cli, tree_digest, trio_args
from safetensors import safe_open

import safelora_cli
from safelora_cli.subspace_file import METADATA_KEY


def write_subspace(trio: Trio, out: Path, *extra: object) -> dict:  # type: ignore[type-arg]
    result = run_cli("subspace", "--base", trio.base, "--aligned", trio.aligned, "--adapter", trio.adapter,
                     "--out", out, "--device", "cpu", "--json", "--quiet", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def inspect_report(*args: object) -> dict:  # type: ignore[type-arg]
    result = run_cli("inspect", *args, "--json", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_exact_file_gives_the_two_model_run_bit_for_bit(llama_trio: Trio, tmp_path: Path) -> None:
    document = write_subspace(llama_trio, tmp_path / "sub")
    assert document["mode"] == "exact" and document["dtype"] == "float32"
    before = tree_digest(tmp_path / "sub")
    two = run_cli("patch", *trio_args(llama_trio), "--out", tmp_path / "two", "--device", "cpu", "--quiet")
    one = run_cli("patch", "--subspace", tmp_path / "sub", "--adapter", llama_trio.adapter, "--out", tmp_path / "one",
                  "--device", "cpu", "--quiet")
    assert two.exit_code == one.exit_code == 0, one.stderr
    reports = [json.loads((tmp_path / name / "safelora_report.json").read_text()) for name in ("two", "one")]
    fields = ("cosine", "selected", "alignment_cosine", "update_retained", "v_norm", "b_distance")
    assert [[layer[f] for f in fields] for layer in reports[0]["layers"]] == \
        [[layer[f] for f in fields] for layer in reports[1]["layers"]]
    assert sum(layer["selected"] for layer in reports[1]["layers"]) > 0
    tensors = [read_adapter(tmp_path / name)[0] for name in ("two", "one")]
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    # The report says what was read, and where the models the file stands for came from.
    inputs = reports[1]["inputs"]
    assert inputs["subspace"]["path"] == str(tmp_path / "sub")
    assert inputs["aligned"]["via_subspace"] is True and inputs["aligned"]["path"] == str(llama_trio.aligned)
    assert tree_digest(tmp_path / "sub") == before


def test_exact_file_holds_v_itself(llama_trio: Trio, tmp_path: Path) -> None:
    write_subspace(llama_trio, tmp_path / "sub")
    key = "model.layers.1.self_attn.q_proj.weight"
    with safe_open(str(tmp_path / "sub" / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor(key)
        record = json.loads(f.metadata()[METADATA_KEY])
    with safe_open(str(llama_trio.base / "model.safetensors"), framework="pt") as b, \
            safe_open(str(llama_trio.aligned / "model.safetensors"), framework="pt") as a:
        v = a.get_tensor(key).float() - b.get_tensor(key).float()
    assert stored.dtype == torch.float32 and torch.equal(stored, v)
    assert record["inputs"]["base"]["path"] == str(llama_trio.base) and record["modules"] == ["q_proj", "v_proj"]
    assert record["tool"]["name"] == "safelora-cli"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_v_changes_cosines_only_slightly(llama_trio: Trio, tmp_path: Path, dtype: str) -> None:
    write_subspace(llama_trio, tmp_path / "sub", "--dtype", dtype)
    exact = inspect_report(*trio_args(llama_trio))
    half = inspect_report("--subspace", tmp_path / "sub", "--adapter", llama_trio.adapter)
    errors = [abs(a["cosine"] - b["cosine"]) for a, b in zip(exact["layers"], half["layers"], strict=True)]
    assert max(errors) < 5e-3
    size = (tmp_path / "sub" / "model.safetensors").stat().st_size
    write_subspace(llama_trio, tmp_path / "full")
    assert size < 0.55 * (tmp_path / "full" / "model.safetensors").stat().st_size


def test_low_rank_bounds_contain_the_two_model_cosine(llama_trio: Trio, tmp_path: Path) -> None:
    exact = inspect_report(*trio_args(llama_trio))
    for rank in (1, 2, 3, 8):
        document = write_subspace(llama_trio, tmp_path / f"r{rank}", "--rank", rank)
        assert {entry["rank"] for entry in document["entries"].values()} == {rank}
        low = inspect_report("--subspace", tmp_path / f"r{rank}", "--adapter", llama_trio.adapter, "--threshold", 0.6)
        exact_sel = inspect_report(*trio_args(llama_trio), "--threshold", 0.6)
        for true, approx, chosen in zip(exact["layers"], low["layers"], exact_sel["layers"], strict=True):
            bound = approx["cosine_error_bound"]
            assert bound is not None and bound >= 0
            assert approx["cosine"] - 1e-5 <= true["cosine"] <= approx["cosine"] + bound + 1e-5
            assert approx["alignment_cosine"] is None  # needs V, which the factor does not hold
            if approx["selected"] != chosen["selected"]:
                assert approx["selection_decided"] is False
        assert low["summary"]["selection_undecided"] == sum(not r["selection_decided"] for r in low["layers"])


def test_low_rank_at_full_rank_has_no_error(demo_trio: Trio, tmp_path: Path) -> None:
    write_subspace(demo_trio, tmp_path / "full", "--rank", 10_000)
    exact = inspect_report(*trio_args(demo_trio))
    low = inspect_report("--subspace", tmp_path / "full", "--adapter", demo_trio.adapter)
    for true, approx in zip(exact["layers"], low["layers"], strict=True):
        assert approx["cosine"] == pytest.approx(true["cosine"], abs=1e-5)
        assert approx["cosine_error_bound"] <= 2e-6  # the rounding allowance only
        assert approx["selection_decided"] is True and approx["selected"] == true["selected"]


def test_energy_mode_and_the_modules_option(llama_trio: Trio, tmp_path: Path) -> None:
    result = run_cli("subspace", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--modules",
                     "q_proj,o_proj", "--energy", 0.9, "--out", tmp_path / "s", "--device", "cpu", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert {k.rsplit(".", 2)[-2] for k in document["entries"]} == {"q_proj", "o_proj"}
    assert all(entry["energy_kept"] >= 0.9 - 1e-9 for entry in document["entries"].values())
    # The adapter also adapts v_proj, which this file does not cover: one line, nothing written.
    missing = run_cli("patch", "--subspace", tmp_path / "s", "--adapter", llama_trio.adapter, "--out",
                      tmp_path / "o", "--device", "cpu")
    assert missing.exit_code == 1 and "holds no weight for 3 module(s)" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_api_writes_the_same_file_as_the_cli(llama_trio: Trio, tmp_path: Path) -> None:
    result = safelora_cli.subspace(base=llama_trio.base, aligned=llama_trio.aligned, adapter=llama_trio.adapter,
                                   out=tmp_path / "api", rank=2, device="cpu")
    write_subspace(llama_trio, tmp_path / "cli", "--rank", 2)
    assert result.out == tmp_path / "api" and result.nbytes == (tmp_path / "api" / "model.safetensors").stat().st_size
    written = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("api", "cli")]
    assert written[0] == written[1]
    report = safelora_cli.inspect(subspace=tmp_path / "api", adapter=llama_trio.adapter, device="cpu").report
    assert report["inputs"]["subspace"]["source"] == str(tmp_path / "api")


def test_force_replaces_a_subspace_file_but_nothing_else(llama_trio: Trio, tmp_path: Path) -> None:
    write_subspace(llama_trio, tmp_path / "s")
    write_subspace(llama_trio, tmp_path / "s", "--force", "--rank", 2)
    (tmp_path / "s" / "notes.txt").write_text("mine")
    again = run_cli("subspace", *trio_args(llama_trio), "--out", tmp_path / "s", "--force", "--device", "cpu")
    assert again.exit_code == 1 and "not a subspace file" in again.stderr
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("args", "message"), [
    (["--base", "B", "--subspace", "S"], "--subspace replaces the base and aligned models"),
    (["--subspace", "S", "--aligned", "A"], "drop --aligned"),
    ([], "Give the base model (--base), or a subspace file"),
])
def test_subspace_and_models_are_exclusive(llama_trio: Trio, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("inspect", "--adapter", llama_trio.adapter, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_a_model_directory_is_not_a_subspace_file(llama_trio: Trio) -> None:
    result = run_cli("inspect", "--subspace", llama_trio.aligned, "--adapter", llama_trio.adapter)
    assert result.exit_code == 1 and "is not a safelora subspace file" in result.stderr


def test_a_dora_adapter_cannot_use_a_subspace_file(llama_trio: Trio, tmp_path: Path) -> None:
    from conftest import save_llama_pair, save_peft_adapter

    model = save_llama_pair(tmp_path, torch.float32, shard=None, seed=11)
    save_peft_adapter(model, tmp_path / "dora", use_dora=True)
    write_subspace(Trio(tmp_path / "base", tmp_path / "aligned", tmp_path / "dora"), tmp_path / "s")
    result = run_cli("inspect", "--subspace", tmp_path / "s", "--adapter", tmp_path / "dora")
    assert result.exit_code == 1 and "is a DoRA adapter; its magnitude vectors are recomputed from W_aligned" in \
        result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("name", ["gpt2-conv1d", "embedding", "gemma-tied-lm-head", "phi3-fused"])
def test_layouts_pair_against_the_file_as_against_the_models(variant_cases, name: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Transposed storage (Conv1D, embeddings), a tied output layer and fused weights: exact equals
    the two-model run, and a full-rank factor matches it too."""
    case = variant_cases.case(name)
    trio = Trio(case.base, case.aligned, case.adapter)
    two = inspect_report(*trio_args(trio))
    for mode in ((), ("--rank", 10_000)):
        out = tmp_path / ("low" if mode else "exact")
        write_subspace(trio, out, *mode)
        one = inspect_report("--subspace", out, "--adapter", trio.adapter)
        for a, b in zip(two["layers"], one["layers"], strict=True):
            assert a["module"] == b["module"] and a["selected"] == b["selected"]
            assert (a["cosine"] == b["cosine"]) if not mode else b["cosine"] == pytest.approx(a["cosine"], abs=1e-5)


def test_a_factor_made_for_another_orientation_is_refused(variant_cases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    case = variant_cases.case("gpt2-conv1d")
    result = run_cli("subspace", "--base", case.base, "--aligned", case.aligned, "--modules", "c_attn,c_proj",
                     "--rank", 4, "--out", tmp_path / "s", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    used = run_cli("inspect", "--subspace", tmp_path / "s", "--adapter", case.adapter)
    assert used.exit_code == 1 and "for the other orientation" in used.stderr


def test_outputs_never_land_in_the_inputs(llama_trio: Trio, tmp_path: Path) -> None:
    before = {name: tree_digest(path) for name, path in (("base", llama_trio.base), ("adapter", llama_trio.adapter))}
    for out in (llama_trio.base / "s", llama_trio.adapter, llama_trio.base.parent):
        result = run_cli("subspace", *trio_args(llama_trio), "--out", out, "--force", "--device", "cpu")
        assert result.exit_code == 1 and "inputs are never modified" in result.stderr or "would delete an input" in \
            result.stderr, result.stderr
    write_subspace(llama_trio, tmp_path / "s")
    inside = run_cli("patch", "--subspace", tmp_path / "s", "--adapter", llama_trio.adapter, "--out",
                     tmp_path / "s" / "out")
    assert inside.exit_code == 1 and "subspace file" in inside.stderr
    assert before == {name: tree_digest(path) for name, path in (("base", llama_trio.base),
                                                                 ("adapter", llama_trio.adapter))}


def test_a_subspace_file_resolves_from_the_hub_like_a_model(llama_trio: Trio, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from hub_server import FakeRepo, HubServer, files_of
    from test_hub import point_hub_at

    write_subspace(llama_trio, tmp_path / "sub", "--rank", 2)
    local = inspect_report("--subspace", tmp_path / "sub", "--adapter", llama_trio.adapter)
    server = HubServer().start()
    try:
        server.repos["org/sub"] = FakeRepo()
        commit = server.repos["org/sub"].add_commit(files_of(tmp_path / "sub"))
        point_hub_at(monkeypatch, server.url, tmp_path / "cache", offline=False)
        remote = inspect_report("--subspace", "org/sub", "--adapter", llama_trio.adapter)
        point_hub_at(monkeypatch, server.url, tmp_path / "cache", offline=True)
        cached = inspect_report("--subspace", f"org/sub@{commit}", "--adapter", llama_trio.adapter)
    finally:
        server.stop()
    assert [r["cosine"] for r in remote["layers"]] == [r["cosine"] for r in local["layers"]] == \
        [r["cosine"] for r in cached["layers"]]
    assert remote["inputs"]["subspace"]["commit"] == commit and remote["inputs"]["subspace"]["source"] == "org/sub"
    assert remote["inputs"]["aligned"]["path"] == str(llama_trio.aligned)
    # Fetched tensor by tensor like a model the first time, nothing the second; the models cost nothing.
    assert remote["inputs"]["subspace"]["bytes_downloaded"] > 0
    assert cached["inputs"]["subspace"]["bytes_downloaded"] == 0
    assert remote["inputs"]["base"]["bytes_downloaded"] is None  # local when the file was written


def _edited(source: Path, target: Path, tensors=None, document=None) -> Path:  # type: ignore[no-untyped-def]
    """A copy of a subspace file with `tensors(dict)` and `document(dict)` applied to its contents."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = dict(f.metadata())
    loaded = load_file(str(weights))
    if tensors is not None:
        tensors(loaded)
    record = json.loads(metadata[METADATA_KEY])
    if document is not None:
        document(record)
    metadata[METADATA_KEY] = json.dumps(record)
    save_file(loaded, str(weights), metadata=metadata)
    return target


KEY = "model.layers.1.self_attn.q_proj.weight"
EDITS = {
    "every Q zero": ({"tensors": lambda t: [v.zero_() for v in t.values()]}, "not orthogonal"),
    "one Q scaled": ({"tensors": lambda t: t[KEY].mul_(10)}, "disagree with the recorded"),
    "Q columns repeated": ({"tensors": lambda t: t[KEY].copy_(t[KEY][:, :1].expand_as(t[KEY]))}, "not orthogonal"),
    "NaN in Q": ({"tensors": lambda t: t[KEY].view(-1)[0].fill_(float("nan"))}, "NaN or Inf"),
    "negative dropped": ({"document": lambda d: d["entries"][KEY].update(dropped=-1.0)}, "finite non-negative"),
    "dropped a string": ({"document": lambda d: d["entries"][KEY].update(dropped="0.1")}, "finite non-negative"),
    "dropped above the kept": ({"document": lambda d: d["entries"][KEY].update(dropped=1e9)}, "disagree with"),
    "version a string": ({"document": lambda d: d.update(version="1")}, "not a positive integer"),
    "inputs not an object": ({"document": lambda d: d.update(inputs="x")}, "base and aligned models is malformed"),
    "modules not a list": ({"document": lambda d: d.update(modules=3)}, "modules is malformed"),
    "rank without norm": ({"document": lambda d: d["entries"][KEY].update(v_norm=0.0)}, "inconsistent"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_low_rank_file_is_refused(llama_trio: Trio, tmp_path: Path, edit: str) -> None:
    """What the bound rests on is checked when the file is read: no wrong cosine with a 'decided' verdict."""
    write_subspace(llama_trio, tmp_path / "s", "--rank", 2)
    changes, message = EDITS[edit]
    edited = _edited(tmp_path / "s", tmp_path / "e", **changes)
    result = run_cli("patch", "--subspace", edited, "--adapter", llama_trio.adapter, "--out", tmp_path / "o")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
    assert "is not a safelora subspace file" in result.stderr and message in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_modules_naming_no_matrix_are_refused(llama_trio: Trio, tmp_path: Path) -> None:
    result = run_cli("subspace", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--modules",
                     "input_layernorm", "--out", tmp_path / "s")
    assert result.exit_code == 1 and "has no weight for the modules input_layernorm" in result.stderr
    assert not (tmp_path / "s").exists()


def test_read_ahead_gives_held_weights_whole_and_leaves_the_others(llama_trio: Trio) -> None:
    from safelora_cli.checkpoint import TensorStream, open_checkpoint
    from safelora_cli.subspace_analysis import ReadAhead

    checkpoint = open_checkpoint(llama_trio.base, "base")
    keys = sorted(k for k in checkpoint.tensors if k.endswith("proj.weight"))[:5]
    held = [True, False, True, True, False]
    with TensorStream() as stream, ReadAhead(checkpoint, keys, held) as ahead:
        for index, key in enumerate(keys):
            got = ahead.take(index)
            assert (got is None) == (not held[index])
            if got is not None:
                assert torch.equal(got, stream.read(checkpoint, key))
