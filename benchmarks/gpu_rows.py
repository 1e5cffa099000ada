"""The measured rows of gpu_check.py: every run a fresh process, measured like bench_patch.py does.

Free of torch on purpose (see bench_measure.py: the harness's RSS would count in every child's
peak RSS). A run that should also report torch's peak GPU memory goes through PEAK_WRAPPER,
which runs the CLI in-process and writes `torch.cuda.max_memory_allocated()` at exit.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import bench_data
import bench_measure as bm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
GB = 1e9
T0 = time.perf_counter()

PEAK_WRAPPER = """
import atexit, json, os, sys
import torch
def _report():
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    with open(os.environ["GPU_CHECK_PEAK_FILE"], "w") as fh:
        json.dump({"max_memory_allocated": peak}, fh)
atexit.register(_report)
sys.argv = ["safelora", *sys.argv[1:]]
from safelora_cli.cli import main
main()
"""


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", flush=True)


def child_env() -> dict[str, str]:
    """Children import safelora_cli from this checkout first, and print unbuffered."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), str(HERE), path) if p),
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


class Budget:
    """The time left of --budget-s, counted from the start of the check."""

    def __init__(self, seconds: float) -> None:
        self.end = T0 + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, estimate: float, what: str, skipped: list[str]) -> bool:
        if estimate <= self.left():
            return True
        skipped.append(f"{what}: skipped, about {estimate:.0f} s needed and {max(self.left(), 0):.0f} s left "
                       "of the time budget")
        say(skipped[-1])
        return False


def summary(samples: list[bm.Sample]) -> dict[str, float]:
    walls = [s.wall_s for s in samples]
    return {"runs": len(samples), "wall_s_median": statistics.median(walls), "wall_s_min": min(walls),
            "wall_s_max": max(walls), "peak_rss_gb_median": statistics.median(s.peak_rss for s in samples) / GB,
            "peak_rss_gb_max": max(s.peak_rss for s in samples) / GB,
            "peak_anon_gb_median": statistics.median(s.peak_anon for s in samples) / GB,
            "peak_anon_gb_max": max(s.peak_anon for s in samples) / GB}


def safelora_command() -> list[str]:
    script = Path(PY).parent / "safelora"
    return [str(script)] if script.is_file() else [PY, "-m", "safelora_cli"]


def peak_run(args: list[str], work: Path) -> tuple[bm.Sample, float | None]:
    """`safelora ARGS` through PEAK_WRAPPER: the sample and torch's peak GPU allocation (GB; None on a CPU)."""
    peak_file = work / "gpu-peak.json"
    peak_file.unlink(missing_ok=True)
    sample = bm.run([PY, "-c", PEAK_WRAPPER, *args], env={**child_env(), "GPU_CHECK_PEAK_FILE": str(peak_file)},
                    cwd=work)
    peak = json.loads(peak_file.read_text())["max_memory_allocated"] if peak_file.is_file() else None
    return sample, None if peak is None else peak / GB


def patch_args(root: Path, work: Path, device: str) -> list[str]:
    base, aligned, adapter = bench_data.trio_dirs(root)
    return ["patch", "--base", str(base), "--aligned", str(aligned), "--adapter", str(adapter),
            "--out", str(work / "patched"), "--force", "--quiet", "--device", device]


def speed_rows(root: Path, device: str, repeat: int, budget: Budget, work: Path,
               skipped: list[str]) -> tuple[dict[str, object], dict[str, object]]:
    """Rows (0), (a), (b) on `device`, warm then cold: (rows, extra facts)."""
    base = root / "base"
    groups = bench_data.needed_tensors(root)
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps(groups))
    init = "import torch, safetensors.torch" + (f"; torch.zeros(1, device={device!r})" if device != "cpu" else "")
    cmds = {"startup": [PY, "-c", init], "a": [PY, str(HERE / "io_floor.py"), str(manifest)],
            "b": [*safelora_command(), *patch_args(root, work, device)]}
    env = child_env()
    extra: dict[str, object] = {"needed_gb": bench_data.needed_bytes(groups) / GB,
                                "model_gb": sum(p.stat().st_size for p in base.glob("*.safetensors")) / GB}
    say(f"  warm-up: one untimed run of each row ({', '.join(cmds)})")
    first: dict[str, float] = {}
    for key, cmd in cmds.items():
        if key == "b":  # this run also records the GPU's peak allocation
            sample, extra["b_gpu_max_memory_allocated_gb"] = peak_run(patch_args(root, work, device), work)
        else:
            sample = bm.run(cmd, env=env, cwd=work)
        first[key] = sample.wall_s
        say(f"    {key}: {sample.wall_s:.2f} s")
    warm: dict[str, list[bm.Sample]] = {k: [] for k in cmds}
    for i in range(repeat):
        if not budget.allows(sum(first.values()) * 1.2, f"warm repetition {i + 1}", skipped):
            break
        for key, cmd in cmds.items():
            warm[key].append(bm.run(cmd, env=env, cwd=work))
        say(f"  warm repetition {i + 1}/{repeat}: " + ", ".join(f"{k} {s[-1].wall_s:.2f} s" for k, s in warm.items()))
    rows: dict[str, object] = {f"{k} warm": summary(s) for k, s in warm.items() if s}
    rows.update(_cold_rows(cmds, sorted(base.glob("*.safetensors")), extra, first["b"], repeat, budget, skipped, work))
    return rows, extra


def _cold_rows(cmds: dict[str, list[str]], shards: list[Path], extra: dict[str, object], b_warm_s: float,
               repeat: int, budget: Budget, skipped: list[str], work: Path) -> dict[str, object]:
    """(a) and (b) with the page cache dropped before each run, when that works here (root)."""
    works, evidence = bm.check_drop_caches(shards[:1])
    extra["drop_caches"] = evidence
    say(f"  cold rows: {evidence}")
    if not works:
        return {}
    cold: dict[str, list[bm.Sample]] = {"a": [], "b": []}
    estimate = float(extra["needed_gb"]) / 1.0 + b_warm_s + 5  # type: ignore[arg-type]  # ~1 GB/s from disk
    for i in range(repeat):
        if not budget.allows(2 * estimate, f"cold repetition {i + 1}", skipped):
            break
        for key in cold:
            bm.drop_page_cache()
            cold[key].append(bm.run(cmds[key], env=child_env(), cwd=work))
        say(f"  cold repetition {i + 1}/{repeat}: a {cold['a'][-1].wall_s:.2f} s, b {cold['b'][-1].wall_s:.2f} s")
    return {f"{k} cold": summary(s) for k, s in cold.items() if s}


def _repeated(args: list[str], repeat: int, budget: Budget, work: Path, skipped: list[str], what: str,
              fresh: Path | None = None, warm_up: bool = True) -> dict[str, object]:
    """An untimed run when `warm_up` (it fills the page cache), then up to `repeat` timed ones while the
    budget lasts, each after the one before fitted in it: summary and GPU peaks."""
    samples: list[bm.Sample] = []
    peaks: list[float | None] = []
    first = 0.0
    for i in range(0 if warm_up else 1, repeat + 1):
        if first and not budget.allows(1.2 * first, f"{what}, run {i}", skipped):
            break
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        sample, peak = peak_run(args, work)
        first = first or sample.wall_s
        if i:
            samples.append(sample)
        peaks.append(peak)
        say(f"  {what}, {'untimed' if i == 0 else f'run {i}/{repeat}'}: {sample.wall_s:.2f} s, "
            f"peak anon RSS {sample.peak_anon / GB:.2f} GB" + (f", GPU peak {peak:.2f} GB" if peak else ""))
    known = [p for p in peaks if p is not None]
    return {**(summary(samples) if samples else {"runs": 0, "first_wall_s": first}),
            "gpu_max_memory_allocated_gb": max(known) if known else None}


def width_row(root: Path, device: str, repeat: int, budget: Budget, work: Path,
              skipped: list[str]) -> dict[str, object]:
    """`safelora patch --device DEVICE` on a one-layer wide trio: wall, peak anon RSS, GPU peak."""
    groups = bench_data.needed_tensors(root)
    row = _repeated(patch_args(root, work, device), repeat, budget, work, skipped, f"{root.name} patch")
    model = sum(p.stat().st_size for p in (root / "base").glob("*.safetensors"))
    return {**row, "needed_gb": bench_data.needed_bytes(groups) / GB, "model_gb": model / GB}


def rank64_row(root: Path, device: str, repeat: int, budget: Budget, work: Path,
               skipped: list[str]) -> dict[str, object]:
    """`safelora subspace --modules q_proj,v_proj --rank 64` of the speed trio, timed, with the file's size."""
    out = work / "subspace-rank64"
    args = ["subspace", "--base", str(root / "base"), "--aligned", str(root / "aligned"), "--modules",
            "q_proj,v_proj", "--rank", "64", "--device", device, "--out", str(out), "--force", "--quiet"]
    # No untimed run: the speed rows just read these weights, and each run is dozens of SVDs.
    row = _repeated(args, repeat, budget, work, skipped, "subspace --rank 64", fresh=out, warm_up=False)
    index = json.loads((root / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    weights = sum(k.endswith(("q_proj.weight", "v_proj.weight")) for k in index)
    return {**row, "weights": weights, "file_mb": (out / "model.safetensors").stat().st_size / 1e6}


def cpu_row(root: Path, repeat: int, budget: Budget, work: Path, skipped: list[str]) -> dict[str, float] | None:
    """(b) with --device cpu, warm, while the budget lasts (in a rehearsal it repeats (b), to try the step)."""
    bm.read_files(bench_data.trio_files(root))
    runs: list[bm.Sample] = []
    estimate = 30.0
    cmd = [*safelora_command(), *patch_args(root, work, "cpu")]
    for i in range(repeat):
        if not budget.allows(estimate * 1.2, f"(b) --device cpu, run {i + 1}", skipped):
            break
        runs.append(bm.run(cmd, env=child_env(), cwd=work))
        estimate = runs[-1].wall_s
        say(f"  (b) --device cpu, warm, run {i + 1}/{repeat}: {estimate:.2f} s")
    return summary(runs) if runs else None
