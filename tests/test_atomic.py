"""Crash safety and determinism of `safelora patch`, run as a real process.

SIGKILL at several moments (during the analysis and at random delays after the staging
directory appears, i.e. during the write) must leave either no output directory or a
complete one, byte-identical to an uninterrupted run; the next run cleans up the staging
directories the killed runs could not.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import run_cli, tree_digest, trio_args
from safetensors.torch import load_file

from safelora_cli.demo import LlamaShape, write_trio
from safelora_cli.placement import remove_stale_staging

# Small models but a large adapter (r = 128 on every linear module, ~9 MB): the write takes long
# enough to be hit.
SHAPE = LlamaShape(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=4, vocab=64)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def big_adapter_trio(tmp_path_factory: pytest.TempPathFactory) -> Trio:
    root = tmp_path_factory.mktemp("big")
    write_trio(root, SHAPE, targets=ALL_LINEAR, rank=128, dtype=torch.float32)
    return Trio(root / "base", root / "aligned", root / "adapter")


def patch_command(trio: Trio, out: Path) -> list[str]:
    return [sys.executable, "-m", "safelora_cli", "patch", *map(str, trio_args(trio)), "--out", str(out),
            "--device", "cpu", "--quiet", "--top-k", "10", "--force"]


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*-*"))


def kill_during(command: list[str], out: Path, delay: float | None, seconds: float) -> int | None:
    """Start `command`; SIGKILL it `delay` s after staging appears (or at `seconds` when delay is None)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < 120:
        if delay is None and time.monotonic() - start >= seconds:
            break
        if delay is not None and staging_dirs(out):
            time.sleep(delay)
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_sigkill_leaves_nothing_or_a_complete_output(big_adapter_trio: Trio, tmp_path: Path) -> None:
    inputs = [tree_digest(p) for p in (big_adapter_trio.base, big_adapter_trio.aligned, big_adapter_trio.adapter)]
    reference = tmp_path / "reference"
    started = time.monotonic()
    assert subprocess.run(patch_command(big_adapter_trio, reference), check=False).returncode == 0
    duration = time.monotonic() - started
    expected = tree_digest(reference)

    out = tmp_path / "out"
    rng = random.Random(20240)  # fixed seed: the same kill moments on every CI run
    plans = [(None, rng.uniform(0.3, 0.9) * duration)] + [(rng.uniform(0, d), 0.0) for d in (0.0, 0.02, 0.08, 0.3)]
    outcomes = []
    for delay, seconds in plans:
        code = kill_during(patch_command(big_adapter_trio, out), out, delay, seconds)
        if out.exists():
            assert tree_digest(out) == expected  # complete and identical, never partial
            load_file(str(out / "adapter_model.safetensors"))
        outcomes.append((code, out.exists(), len(staging_dirs(out))))
    assert any(code == -signal.SIGKILL for code, _, _ in outcomes), outcomes
    assert any(left for _, _, left in outcomes), f"no kill landed during the write: {outcomes}"

    # The next run finishes, and removes what the killed runs left behind.
    assert subprocess.run(patch_command(big_adapter_trio, out), check=False).returncode == 0
    assert tree_digest(out) == expected
    assert staging_dirs(out) == []
    assert [tree_digest(p) for p in (big_adapter_trio.base, big_adapter_trio.aligned,
                                     big_adapter_trio.adapter)] == inputs


def test_stale_cleanup_spares_live_runs_and_other_outputs(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    stale_old = tmp_path / f".out.old-{dead.pid}-def"
    live = tmp_path / f".out.partial-{os.getppid()}-ghi"  # the parent of this process is alive
    other = tmp_path / f".other.partial-{dead.pid}-jkl"
    for path in (stale, stale_old, live, other):
        (path / "x").mkdir(parents=True)
    assert remove_stale_staging(out) == [stale_old, stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_two_runs_give_byte_identical_outputs_and_reports(llama_trio: Trio, tmp_path: Path) -> None:
    before = [tree_digest(p) for p in (llama_trio.base, llama_trio.aligned, llama_trio.adapter)]
    trees = []
    for name in ("one", "two"):
        run = tmp_path / name
        result = run_cli("patch", *trio_args(llama_trio), "--out", run / "adapter", "--device", "cpu",
                         "--report-md", run / "report.md", "--plot", run / "plot.png", "--max-selected", "100%")
        assert result.exit_code == 0, result.stderr
        trees.append(tree_digest(run))
    assert trees[0] == trees[1]
    assert set(trees[0]) == {"report.md", "plot.png", "adapter/README.md", "adapter/adapter_config.json",
                             "adapter/adapter_model.safetensors", "adapter/safelora_report.json"}
    assert [tree_digest(p) for p in (llama_trio.base, llama_trio.aligned, llama_trio.adapter)] == before
