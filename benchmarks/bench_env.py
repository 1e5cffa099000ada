"""Where and on what the measured processes run: the machine, the exported code, the data.

Free of torch on purpose (see bench_data.py): only children of this process import it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_data
import bench_measure as bm
from bench_results import GB

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BIN = Path(sys.executable).parent
# What (c2) holds besides its four float32 model copies and the dense C's (interpreter, libraries).
PUBLISHED_OVERHEAD = int(1.5 * GB)

# Where and how every measured process runs: set by `prepare_code`.
RUN_ENV: dict[str, str] | None = None
RUN_CWD: Path | None = None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = bm.meminfo_bytes("MemTotal") // 1024
    versions = subprocess.run(
        [PY, "-c", "import torch, safetensors, transformers, peft; print(torch.__version__, "
         "safetensors.__version__, torch.cuda.is_available(), transformers.__version__, peft.__version__)"],
        capture_output=True, text=True, check=True).stdout.split()
    return {"nproc": str(os.cpu_count()), "ram": f"{mem_kb / 2**20:.1f} GiB", "cpu": cpu,
            "python": platform.python_version(), "kernel": platform.release(), "torch": versions[0],
            "safetensors": versions[1], "cuda": versions[2], "transformers": versions[3], "peft": versions[4]}


def run(cmd: list[str]) -> bm.Sample:
    return bm.run(cmd, env=RUN_ENV, cwd=RUN_CWD)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def prepare_code(data_dir: Path, worktree: bool) -> str:
    """Measure the committed code (HEAD, exported to bench-data/code) unless `worktree`; describe it.

    Other changes may land in the working tree while a long run goes on; an exported commit
    keeps every repetition on the same code. The children run from that directory with it
    first on PYTHONPATH, ahead of the editable install.
    """
    global RUN_ENV, RUN_CWD
    out = data_dir / "out"
    out.mkdir(parents=True, exist_ok=True)
    if worktree:
        RUN_CWD = out
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        return f"{commit} + local changes" if git("status", "--porcelain", "--", "safelora_cli") else commit
    commit = git("rev-parse", "--short", "HEAD")
    code_dir = data_dir / "code"
    if code_dir.exists():
        shutil.rmtree(code_dir)
    code_dir.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD", "safelora_cli"], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(code_dir)], input=archive, check=True)
    RUN_ENV = {**os.environ, "PYTHONPATH": str(code_dir)}
    RUN_CWD = code_dir
    where = subprocess.run([str(BIN / "python"), "-c", "import safelora_cli; print(safelora_cli.__file__)"],
                           env=RUN_ENV, cwd=RUN_CWD, capture_output=True, text=True, check=True).stdout
    if not Path(where.strip()).is_relative_to(code_dir.resolve()):
        raise SystemExit(f"the exported code is not the one imported ({where.strip()})")
    return commit


def load_average() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def _generate(data_dir: Path, name: str, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run([PY, str(HERE / "bench_generate.py"), str(data_dir.resolve()), name, *extra], check=True,
                   env=RUN_ENV, cwd=RUN_CWD)
    return time.perf_counter() - start


def ensure_data(data_dir: Path, name: str) -> tuple[Path, float | None]:
    """Generate the trio in a child process (this one never imports torch); return (root, seconds or None)."""
    setup = bench_data.SETUPS[name]
    root = data_dir / setup.root_name
    if bench_data.is_ready(root, setup):
        return root, None
    models_ready = setup.models_from is not None and bench_data.is_ready(root, bench_data.SETUPS[setup.models_from])
    free = shutil.disk_usage(data_dir).free
    need = 1 * GB if models_ready else 2 * setup.model_gb * 1.1 * GB
    if free < need:
        raise SystemExit(f"not enough disk for the {name} data: {need / GB:.0f} GB needed, {free / GB:.0f} GB free")
    return root, _generate(data_dir, name)


def ensure_multi(data_dir: Path, name: str) -> tuple[list[Path], float | None]:
    """The multi-adapter row's adapters, generated in a child process when missing."""
    setup = bench_data.SETUPS[name]
    root = data_dir / setup.root_name
    if bench_data.multi_ready(root, setup):
        return bench_data.multi_dirs(root), None
    return bench_data.multi_dirs(root), _generate(data_dir, name, "--multi")


def published_memory(root: Path, adapter_dir: str) -> tuple[int, int]:
    """(what (c2) needs, what is available) in bytes: four float32 models, every dense C, overhead."""
    need = 4 * bench_data.fp32_model_bytes(root / "base") + bench_data.dense_c_bytes(root, adapter_dir)
    return need + PUBLISHED_OVERHEAD, bench_data.available_memory()
