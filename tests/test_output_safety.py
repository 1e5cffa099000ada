"""Outputs that cannot touch inputs: placement at, inside and around every input, links and special
files in the adapter, outputs that appear or fail mid-run, signals, and results that must not be written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import run_cli, tree_digest, trio_args
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from safelora_cli import placement, writer
from safelora_cli.demo import write_trio
from safelora_cli.report import REPORT_NAME


@pytest.fixture()
def trio(demo_trio: Trio, tmp_path: Path) -> Trio:
    """A private copy of the demo trio under tmp_path/in, free to be attacked."""
    root = tmp_path / "in"
    for name in ("base", "aligned", "adapter"):
        shutil.copytree(getattr(demo_trio, name), root / name)
    return Trio(root / "base", root / "aligned", root / "adapter")


def _tree(root: Path) -> dict[str, str]:
    """Every path below `root` with what it is (file digest, link target, directory), links not followed."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_file():
            found[key] = tree_digest(path.parent)[path.name]
        else:
            found[key] = "dir"
    return found


def test_out_equal_to_input_is_refused(llama_trio: Trio) -> None:
    before = tree_digest(llama_trio.adapter)
    result = run_cli("patch", "--base", llama_trio.base, "--aligned", llama_trio.aligned,
                     "--adapter", llama_trio.adapter, "--out", llama_trio.adapter, "--force")
    assert result.exit_code == 1
    assert "is the adapter; inputs are never modified" in result.stderr
    assert tree_digest(llama_trio.adapter) == before


def test_out_inside_input_is_refused(llama_trio: Trio) -> None:
    out = llama_trio.adapter / "patched"
    result = run_cli("patch", "--base", llama_trio.base, "--aligned", llama_trio.aligned,
                     "--adapter", llama_trio.adapter, "--out", out)
    assert result.exit_code == 1
    assert "lies inside the adapter" in result.stderr
    assert not out.exists()


def test_existing_out_needs_force(llama_trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("patch", "--base", llama_trio.base, "--aligned", llama_trio.aligned,
                     "--adapter", llama_trio.adapter, "--out", out)
    assert result.exit_code == 1
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


PLACES = ("base", "aligned", "adapter", "in")


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(PLACES), how=st.sampled_from(("at", "inside", "link-at", "link-inside", "home")),
       force=st.booleans(), option=st.sampled_from(("--out", "--report-md", "--plot")))
def test_no_output_lands_at_or_in_an_input(trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str,
                                           how: str, force: bool, option: str) -> None:
    # `in` holds the inputs: writing beside them is fine, only replacing the whole folder is not.
    assume(where != "in" or how in ("at", "link-at"))
    root = trio.base.parent
    target = root if where == "in" else getattr(trio, where)
    links = tmp_path / "links"
    links.mkdir(exist_ok=True)
    if how in ("at", "inside"):
        path = str(target if how == "at" else target / "x")
    elif how.startswith("link"):
        link = links / f"to-{where}"
        if not link.is_symlink():
            link.symlink_to(target)
        path = str(link if how == "link-at" else link / "x")
    else:
        monkeypatch.setenv("HOME", str(target.parent))
        path = f"~/{target.name}/x"
    before = _tree(tmp_path)
    args = ["patch", *trio_args(trio), "--out", tmp_path / "safe", *(["--force"] if force else [])]
    if option == "--out":
        args[args.index("--out") + 1] = path
    else:
        args += [option, path]
    result = run_cli(*args)
    assert result.exit_code == 1, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert _tree(tmp_path) == before  # inputs untouched, nothing written anywhere


def test_out_already_there_with_force_refuses_what_it_did_not_write(trio: Trio, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "data.txt").write_text("keep")
    before = _tree(tmp_path)
    result = run_cli("patch", *trio_args(trio), "--out", precious, "--force")
    assert result.exit_code == 1 and "is not a patched adapter left as safelora patch wrote it" in result.stderr
    assert _tree(tmp_path) == before


def test_links_and_special_files_in_the_adapter_are_not_copied(trio: Trio, tmp_path: Path) -> None:
    secret = tmp_path / "secret.key"
    secret.write_text("do not publish")
    (trio.adapter / "key.txt").symlink_to(secret)
    (trio.adapter / "README.md").unlink(missing_ok=True)
    (trio.adapter / "README.md").symlink_to(secret)
    (trio.adapter / "etc").symlink_to(tmp_path)
    (trio.adapter / "zero").symlink_to("/dev/zero")
    os.mkfifo(trio.adapter / "pipe")
    (trio.adapter / "notes.txt").write_text("mine")
    (trio.adapter / "notes-link.txt").symlink_to("notes.txt")  # stays inside the adapter: copied
    out = tmp_path / "safe"
    result = run_cli("patch", *trio_args(trio), "--out", out)
    assert result.exit_code == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "README.md", REPORT_NAME, "notes.txt",
                     "notes-link.txt"}
    assert not (out / "notes-link.txt").is_symlink() and (out / "notes-link.txt").read_text() == "mine"
    assert "do not publish" not in "".join(p.read_text(errors="replace") for p in out.iterdir() if p.is_file())
    skipped = json.loads((out / REPORT_NAME).read_text())["skipped_files"]
    assert sorted(s["path"] for s in skipped) == ["README.md", "etc", "key.txt", "pipe", "zero"]
    assert result.stderr.count("Warning: ") == 5


def test_an_output_that_appears_during_the_run_is_not_replaced(trio: Trio, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "safe"
    build = writer._build

    def other_run_wins(staging: Path, *args: object) -> None:
        build(staging, *args)  # type: ignore[arg-type]
        out.mkdir()
        (out / "theirs.txt").write_text("other run")

    monkeypatch.setattr(writer, "_build", other_run_wins)
    result = run_cli("patch", *trio_args(trio), "--out", out)
    assert result.exit_code == 1 and "changed while this run was writing" in result.stderr
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "safe"]


def test_a_failed_forced_replacement_keeps_the_previous_output(trio: Trio, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "safe"
    assert run_cli("patch", *trio_args(trio), "--out", out).exit_code == 0
    before = _tree(out)
    real = placement.rename_noreplace

    def fail_placing_new(src: Path, dst: Path) -> None:
        if ".partial-" in src.name:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(placement, "rename_noreplace", fail_placing_new)
    result = run_cli("patch", *trio_args(trio), "--out", out, "--force", "--top-k", "1")
    assert result.exit_code == 1 and "No space left" in result.stderr
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "safe"]


def test_parents_created_for_out_are_removed_when_the_run_fails(trio: Trio, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def enospc(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_safetensors", enospc)
    result = run_cli("patch", *trio_args(trio), "--out", tmp_path / "a" / "b" / "safe")
    assert result.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_killed_forced_run_gets_its_previous_output_back(trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / "safe"
    assert run_cli("patch", *trio_args(trio), "--out", out).exit_code == 0
    before = _tree(out)
    dead = tmp_path / ".safe.old-999999999-abc"  # a pid no process has
    dead.mkdir()
    out.rename(dead / "previous")
    placement.remove_stale_staging(out)
    assert _tree(out) == before and not dead.exists()


@pytest.mark.parametrize("length", [200, 255, 256])
def test_long_output_names(trio: Trio, tmp_path: Path, length: int) -> None:
    out = tmp_path / ("n" * length)
    result = run_cli("patch", *trio_args(trio), "--out", out)
    if length <= 255:
        assert result.exit_code == 0, result.stderr
        assert (out / "adapter_model.safetensors").is_file()
    else:
        assert result.exit_code == 1 and "255 bytes per component" in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# A shell that starts a job in the background sets SIGINT to "ignore", and Python then keeps it
# ignored (as it should): the child restores the default handler, as an interactive terminal has it.
_SIGNAL_RUN = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from safelora_cli import cli, writer
build = writer._build
def build_then_signal(staging, *args):
    build(staging, *args)
    os.kill(os.getpid(), signal.{name})
writer._build = build_then_signal
sys.argv = ["safelora", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signals_remove_staging_and_exit_with_their_code(trio: Trio, tmp_path: Path, name: str, code: int) -> None:
    out = tmp_path / "safe"
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_RUN.format(name=name), "patch", *map(str, trio_args(trio)),
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert getattr(signal, name)  # the signal exists on this platform


def test_base_and_aligned_the_same_model_is_an_error(trio: Trio, tmp_path: Path) -> None:
    result = run_cli("patch", "--base", trio.base, "--aligned", trio.base, "--adapter", trio.adapter,
                     "--out", tmp_path / "safe")
    assert result.exit_code == 1 and "are the same" in result.stderr
    config = json.loads((trio.adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(trio.base)
    (trio.adapter / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli("patch", "--base", trio.base, "--adapter", trio.adapter, "--out", tmp_path / "safe")
    assert result.exit_code == 1 and "are the same" in result.stderr
    assert not (tmp_path / "safe").exists()


def _edit_adapter(adapter: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: edit(k, v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def test_a_run_with_no_layer_evaluated_is_not_a_success(trio: Trio, tmp_path: Path) -> None:
    _edit_adapter(trio.adapter, lambda k, v: torch.zeros_like(v) if "lora_B" in k else v)
    result = run_cli("patch", *trio_args(trio), "--out", tmp_path / "safe", "--max-selected", "100%")
    assert result.exit_code == 1 and "No layer of" in result.stderr and "lora_B = 0" in result.stderr
    assert not (tmp_path / "safe").exists()


def test_a_patched_b_that_overflows_float16_is_an_error(tmp_path: Path) -> None:
    write_trio(tmp_path, dtype=torch.float32)
    aligned = tmp_path / "aligned" / "model.safetensors"
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    # A huge rank-one alignment step: C = V·Vᵀ/‖V‖ then stretches by ‖V‖ ~ 2e5, beyond float16 for B ~ 10.
    save_file({k: v + 3000.0 * torch.ones_like(v) if k.endswith("q_proj.weight") else load_file(str(aligned))[k]
               for k, v in base.items()}, str(aligned))
    _edit_adapter(tmp_path / "adapter", lambda k, v: (v * 1000).to(torch.float16))
    result = run_cli("patch", "--base", tmp_path / "base", "--aligned", tmp_path / "aligned", "--adapter",
                     tmp_path / "adapter", "--out", tmp_path / "safe", "--threshold", "1")
    assert result.exit_code == 1, result.stderr
    assert "exceeds the range of the adapter's torch.float16" in result.stderr and "q_proj" in result.stderr
    assert not (tmp_path / "safe").exists()


def test_factors_beyond_float64_are_an_error_not_nan(trio: Trio, tmp_path: Path) -> None:
    _edit_adapter(trio.adapter, lambda k, v: v.double() * 1e200 if "lora_B" in k else v.double())
    result = run_cli("inspect", *trio_args(trio), "--json")
    assert result.exit_code == 1 and "too large to analyse" in result.stderr
    assert result.stdout == ""


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "safelora_cli", *args], text=True, timeout=120,
                          **kwargs)  # type: ignore[call-overload]


def test_stdout_errors_are_one_line(trio: Trio) -> None:
    args = ["inspect", *map(str, trio_args(trio)), "--json"]
    with open("/dev/full", "w") as full:
        proc = _run(args, stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: Cannot write to standard output: No space left")
    assert proc.stderr.count("\n") == 1
    closed = _run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True,
                  preexec_fn=lambda: os.close(1))
    assert closed.returncode == 1 and closed.stderr.startswith("Error: Cannot write to standard output")


def test_a_reader_that_goes_away_ends_the_output_quietly(trio: Trio) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "safelora_cli", "inspect", *map(str, trio_args(trio)),
                             "--format", "csv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_demo_into_a_file_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = run_cli("demo", target)
    assert result.exit_code == 2 and result.stderr == f"Error: {target} exists and is not a directory. Choose a " \
        "new directory.\n"
    assert target.read_text() == "x"


def test_an_output_name_that_is_not_utf8_is_written(trio: Trio, tmp_path: Path) -> None:
    out = Path(os.fsdecode(bytes(tmp_path) + b"/safe-\xfe"))
    result = run_cli("patch", *trio_args(trio), "--out", out)
    assert result.exit_code == 0, result.stderr
    assert (out / "adapter_model.safetensors").is_file()
    assert "safe-\\xfe" in result.stderr  # shown as an escape, on one line


def test_an_input_name_that_is_not_utf8_is_one_line(trio: Trio, tmp_path: Path) -> None:
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/lora-\xff"))
    shutil.copytree(trio.adapter, odd)
    result = run_cli("patch", "--base", trio.base, "--aligned", trio.aligned, "--adapter", odd, "--out",
                     tmp_path / "safe")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "safe").exists()


def test_out_in_the_hub_cache_is_refused(trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    (cache / "models--org--lora" / "snapshots" / "abc").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    result = run_cli("patch", *trio_args(trio), "--out", cache / "models--org--lora" / "snapshots" / "abc", "--force")
    assert result.exit_code == 1 and "lies inside the Hugging Face cache" in result.stderr
    assert not any((cache / "models--org--lora" / "snapshots" / "abc").iterdir())


def test_out_at_the_aligned_model_named_by_the_adapter_config(trio: Trio, tmp_path: Path) -> None:
    config = json.loads((trio.adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(trio.aligned)
    (trio.adapter / "adapter_config.json").write_text(json.dumps(config))
    before = _tree(tmp_path)
    result = run_cli("patch", "--base", trio.base, "--adapter", trio.adapter, "--out", trio.aligned, "--force")
    assert result.exit_code == 1 and "is the aligned model" in result.stderr
    assert _tree(tmp_path) == before


def test_several_adapters_cannot_write_over_one_another(trio: Trio, tmp_path: Path) -> None:
    second = trio.adapter.parent / "other"
    shutil.copytree(trio.adapter, second)
    before = _tree(tmp_path)
    # --out/<name> of each adapter would be the adapter itself.
    result = run_cli("patch", "--base", trio.base, "--aligned", trio.aligned, "--adapter", trio.adapter,
                     "--adapter", second, "--out", trio.adapter.parent, "--force")
    assert result.exit_code == 1 and "is the adapter" in result.stderr
    assert _tree(tmp_path) == before


def test_version_control_folders_and_stray_links_never_reach_the_output(trio: Trio, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-KEY")
    git = trio.adapter / ".git"
    git.mkdir()
    (git / "config").write_text('[remote "origin"]\n\turl = https://user:hf_TOKEN@example.invalid/x\n')
    (trio.adapter / "sub").mkdir()
    (trio.adapter / "sub" / "adapter_config.json").symlink_to(secret)  # not the config that was read
    (trio.adapter / "model.safetensors").symlink_to("adapter_model.safetensors")  # the unpatched weights
    (trio.adapter / "loop-a").symlink_to("loop-b")
    (trio.adapter / "loop-b").symlink_to("loop-a")
    out = tmp_path / "safe"
    result = run_cli("patch", *trio_args(trio), "--out", out)
    assert result.exit_code == 0, result.stderr
    everything = [p for p in out.rglob("*") if p.is_file()]
    assert not (out / ".git").exists() and not (out / "model.safetensors").exists()
    assert all(b"hf_TOKEN" not in p.read_bytes() and b"SECRET-KEY" not in p.read_bytes() for p in everything)
    reasons = {s["path"]: s["reason"] for s in json.loads((out / REPORT_NAME).read_text())["skipped_files"]}
    assert reasons[".git"] == "a version-control or download-tool folder"
    assert reasons["model.safetensors"] == "a symbolic link to the unpatched weights"
    assert reasons["sub/adapter_config.json"] == "a symbolic link to outside the adapter"
    assert "loop" in reasons["loop-a"]
    assert "Not copied from the adapter directory" in (out / "README.md").read_text()


def test_out_as_the_current_directory_is_refused(trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = run_cli("patch", *trio_args(trio), "--out", ".", "--force")
    assert result.exit_code == 1 and "is the current directory" in result.stderr
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["here", "in"]


def test_outputs_are_written_where_their_path_really_leads(trio: Trio, tmp_path: Path) -> None:
    result = run_cli("patch", *trio_args(trio), "--out", tmp_path / "missing" / ".." / "safe",
                     "--report-md", tmp_path / "gone" / ".." / "r.md")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "r.md", "safe"]
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    looped = run_cli("patch", *trio_args(trio), "--out", tmp_path / "safe2", "--report-md", tmp_path / "loop1" / "r.md")
    assert looped.exit_code == 1 and "loop of symbolic links" in looped.stderr


def test_an_unknown_user_home_is_one_line(trio: Trio) -> None:
    result = run_cli("patch", *trio_args(trio), "--out", "~no-such-user-here/safe")
    assert result.exit_code == 2 and result.stderr.startswith("Error: Cannot expand ~no-such-user-here/safe")


def test_ctrl_c_during_a_forced_replacement_puts_the_previous_output_back(trio: Trio, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "safe"
    assert run_cli("patch", *trio_args(trio), "--out", out).exit_code == 0
    before = _tree(out)
    real = placement.rename_noreplace

    def interrupted(src: Path, dst: Path) -> None:
        if ".partial-" in src.name:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(placement, "rename_noreplace", interrupted)
    result = run_cli("patch", *trio_args(trio), "--out", out, "--force", "--top-k", "1")
    assert result.exit_code == 130
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in", "safe"]


def test_a_later_output_failing_says_what_is_already_written(trio: Trio, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    second = trio.adapter.parent / "other"
    shutil.copytree(trio.adapter, second)
    calls = []
    real = writer.write_safetensors

    def second_fails(path: Path, *args: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "write_safetensors", second_fails)
    result = run_cli("patch", "--base", trio.base, "--aligned", trio.aligned, "--adapter", trio.adapter,
                     "--adapter", second, "--out", tmp_path / "safe")
    assert result.exit_code == 1
    assert "Already written, whole: " in result.stderr and "nothing was written" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "safe").iterdir()) == ["adapter"]


def test_a_bind_mount_of_an_input_is_still_the_input(trio: Trio, tmp_path: Path) -> None:
    view = tmp_path / "view"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(trio.adapter), str(view)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    try:
        result = run_cli("patch", *trio_args(trio), "--out", view / "safe")
        assert result.exit_code == 1 and "lies inside the adapter" in result.stderr
        assert not (trio.adapter / "safe").exists()
    finally:
        subprocess.run(["umount", str(view)], check=True)
