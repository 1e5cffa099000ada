"""Weights files read as what they are: every dtype written back byte for byte, named pipes,
links, and files the OS refuses to a user other than root (tested in a subprocess as `nobody`)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import read_adapter, run_cli, tree_digest, trio_args
from safetensors import safe_open
from test_bad_inputs import copy_trio, edit_tensors

from safelora_cli import safetensors_io

ROOT = Path(__file__).resolve().parents[1]
OTHER = "base_model.model.model.norm.weight"  # a tensor the patch copies without touching it


def _data_section(file: Path) -> tuple[dict, bytes]:  # type: ignore[type-arg]
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _random_bytes_tensor(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A (3, 4)-element tensor of `dtype` whose bytes are random (NaN patterns included)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (3, 4 * dtype.itemsize), generator=gen, dtype=torch.uint8)
    return raw.view(dtype)


@pytest.mark.parametrize("dtype", sorted(safetensors_io._DTYPE_NAMES, key=str), ids=str)
def test_every_dtype_round_trips_byte_for_byte(dtype: torch.dtype, tmp_path: Path) -> None:
    tensor = _random_bytes_tensor(dtype, seed=len(str(dtype)))
    path = tmp_path / "t.safetensors"
    safetensors_io.write_safetensors(path, {"t": tensor}, {"format": "pt"})
    header, data = _data_section(path)
    assert header["t"]["dtype"] == safetensors_io.dtype_name(dtype)
    assert data == tensor.contiguous().view(torch.uint8).numpy().tobytes()
    with safe_open(str(path), framework="pt") as handle:  # the library agrees on dtype, shape and bytes
        back = handle.get_tensor("t")
    assert back.dtype == dtype and back.shape == tensor.shape
    assert back.view(torch.uint8).numpy().tobytes() == data


@pytest.mark.parametrize("dtype", sorted(safetensors_io._DTYPE_NAMES, key=str), ids=str)
def test_every_dtype_is_read_back_by_the_tools_own_reader(dtype: torch.dtype, tmp_path: Path) -> None:
    """The pread backend of safetensors 0.8 cannot build packed F4 tensors; the reader still must."""
    tensor = _random_bytes_tensor(dtype, seed=3)
    path = tmp_path / "t.safetensors"
    safetensors_io.write_safetensors(path, {"t": tensor}, {})
    back, _ = safetensors_io.read_all_tensors(path)
    assert back["t"].dtype == dtype and back["t"].shape == tensor.shape
    assert back["t"].view(torch.uint8).numpy().tobytes() == tensor.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
                                   torch.uint64, torch.complex64, torch.int16, torch.bool], ids=str)
def test_a_tensor_the_patch_does_not_touch_is_copied_in_its_own_dtype(dtype: torch.dtype, llama_trio: Trio,
                                                                       tmp_path: Path) -> None:
    trio = copy_trio(llama_trio, tmp_path / "in")
    # Small values only: float8 NaN bit patterns are never equal to themselves (see the report).
    other = torch.arange(12, dtype=torch.uint8).reshape(3, 4).to(dtype) if dtype != torch.bool else \
        torch.arange(12).reshape(3, 4) % 3 == 0
    edit_tensors(trio.adapter / "adapter_model.safetensors", lambda t: t.update({OTHER: other}))
    result = run_cli("patch", *trio_args(trio), "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    tensors, _ = read_adapter(tmp_path / "out")
    assert tensors[OTHER].dtype == dtype
    assert tensors[OTHER].view(torch.uint8).numpy().tobytes() == other.view(torch.uint8).numpy().tobytes()


def test_lora_factors_in_fp8_are_refused_before_any_weight_is_read(llama_trio: Trio, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    trio = copy_trio(llama_trio, tmp_path / "in")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    edit_tensors(trio.adapter / "adapter_model.safetensors", lambda t: t.update({key: t[key].to(torch.float8_e5m2)}))
    monkeypatch.setattr(safetensors_io, "read_tensor", lambda *a: pytest.fail("a tensor was read"))
    result = run_cli("inspect", *trio_args(trio), "--device", "cpu")
    assert result.exit_code == 1
    assert f"{key} is stored as F8_E5M2" in result.stderr


def _fifo_in_place(file: Path) -> None:
    file.unlink()
    os.mkfifo(file)


@pytest.mark.parametrize("where", ["base/model.safetensors", "adapter/adapter_model.safetensors",
                                   "adapter/adapter_config.json"])
def test_a_named_pipe_is_refused_without_blocking(where: str, llama_trio: Trio, tmp_path: Path) -> None:
    trio = copy_trio(llama_trio, tmp_path / "in")
    _fifo_in_place(tmp_path / "in" / where)
    result = run_cli("inspect", *trio_args(trio), "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {tmp_path / 'in' / where} is a named pipe (FIFO), not a regular file.")


def test_a_named_pipe_passed_as_the_weights_file_is_refused(llama_trio: Trio, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    result = run_cli("inspect", "--base", tmp_path / "model.safetensors", "--aligned", llama_trio.aligned,
                     "--adapter", llama_trio.adapter, "--device", "cpu")
    assert result.exit_code == 1 and "is a named pipe (FIFO)" in result.stderr


def test_linked_inputs_are_followed(llama_trio: Trio, tmp_path: Path) -> None:
    (tmp_path / "adapter").symlink_to(llama_trio.adapter)
    (tmp_path / "base").mkdir()
    for name in ("model.safetensors", "config.json"):
        (tmp_path / "base" / name).symlink_to(llama_trio.base / name)
    result = run_cli("inspect", "--base", tmp_path / "base", "--aligned", llama_trio.aligned,
                     "--adapter", tmp_path / "adapter", "--device", "cpu", "--format", "json", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["layers"]) == 6


def test_a_link_to_a_git_lfs_pointer_names_the_path_given(llama_trio: Trio, tmp_path: Path) -> None:
    trio = copy_trio(llama_trio, tmp_path / "in")
    pointer = tmp_path / "pointer"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    (trio.base / "model.safetensors").unlink()
    (trio.base / "model.safetensors").symlink_to(pointer)
    result = run_cli("inspect", *trio_args(trio), "--device", "cpu")
    assert result.exit_code == 1
    assert f"{trio.base / 'model.safetensors'} is a git-lfs pointer" in result.stderr


# --- a user the OS refuses: root reads everything, so these run the CLI as `nobody` -----------


@pytest.fixture
def shared_trio(llama_trio: Trio) -> Iterator[Trio]:
    """A copy of the trio that another user can reach (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="safelora-perm-"))
    try:
        root.chmod(0o755)
        trio = copy_trio(llama_trio, root)
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
        yield trio
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root)


# The interpreter lives under root's home, which `nobody` cannot enter: the child runs the command
# once as root with its output discarded (so that every module it needs is imported), then drops to
# `nobody` and runs it again (chmod binds only users other than root).
_DEMOTED = """
import contextlib, os, sys
from safelora_cli.cli import app
with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
    with contextlib.suppress(SystemExit):
        app(sys.argv[1:], prog_name="safelora")
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
app(sys.argv[1:], prog_name="safelora")
"""


def _as_other_user(*args: object) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process, as `nobody` when this runs as root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": tempfile.gettempdir() + "/hf-x"}
    return subprocess.run([sys.executable, "-c", _DEMOTED, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=180, cwd="/")


def test_os_refusals_say_permission_denied(shared_trio: Trio) -> None:
    """Four refusals in one process each: an unreadable checkpoint, an unreadable config, a model
    directory that cannot be searched, and a path under a directory that cannot be searched."""
    t = shared_trio
    before = tree_digest(t.base.parent)
    cases = [
        (t.base / "model.safetensors", 0o000, trio_args(t), f"Permission denied reading {t.base}/model.safetensors"),
        (t.adapter / "adapter_config.json", 0o000, trio_args(t),
         f"Permission denied reading {t.adapter}/adapter_config.json"),
        (t.aligned, 0o644, trio_args(t), f"Permission denied opening the files of the aligned directory {t.aligned}"),
        (t.base.parent, 0o700, ["--base", t.base, "--aligned", t.aligned, "--adapter", t.adapter],
         f"Permission denied looking up the adapter path {t.adapter}"),
    ]
    for path, mode, args, message in cases:
        old = path.stat().st_mode
        path.chmod(mode)
        try:
            proc = _as_other_user("inspect", *args, "--device", "cpu")
        finally:
            path.chmod(old)
        assert proc.returncode == 1, (path, proc.stderr)
        assert proc.stderr.startswith("Error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert message in proc.stderr, (message, proc.stderr)
        assert "does not exist" not in proc.stderr and "not found" not in proc.stderr
    assert tree_digest(t.base.parent) == before
