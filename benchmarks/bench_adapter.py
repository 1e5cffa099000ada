"""Peak memory against the adapter's size: the same models, an all-linear adapter at r = 8 and r = 64.

    python benchmarks/bench_adapter.py DATA_DIR                       # generate if missing, measure HEAD
    python benchmarks/bench_adapter.py DATA_DIR --ref OLD --ref HEAD \
        --top-k 8 896                                              # two commits, interleaved

The models are narrow and deep (hidden 512, MLP 1408, 256 layers: 0.82 B parameters, 1.6 GB
per model in bf16), so that an all-linear r = 64 adapter in float32 (1792 layers, 0.65 GB) is
large beside the weights, and the r = 8 one (81 MB) small. If peak anonymous RSS follows the
adapter, the two rows differ by about the adapter's size; streamed, by what the run must hold:
the projected B's of the selected layers until the selection is known (K of them for top-K), so a
small K isolates the rest. Each row is the median of `--runs` fresh `safelora patch` processes
(warm page cache) on a commit exported with `git archive`, so changes in the working tree do
not leak into a long run; the commits' runs are interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bench_measure as bm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
GB = 1e9
Row = tuple[str, int, int]  # (commit, --top-k, rank)
# Keyword arguments of `safelora_cli.demo.LlamaShape` (kept as data: this harness never imports torch,
# whose memory would count in the children's ru_maxrss).
SHAPE = {"hidden": 512, "intermediate": 1408, "layers": 256, "heads": 8, "kv_heads": 8, "vocab": 256}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (8, 64)
_GENERATE = """
import sys, torch
from pathlib import Path
from safelora_cli import demo
root, shape = Path(sys.argv[1]), demo.LlamaShape(**{shape!r})
bases = demo.write_models(root, shape, torch.bfloat16, layers_per_shard=32)
for rank in {ranks!r}:
    demo.write_adapter(root / f"adapter-r{{rank}}", shape, bases, {linear!r}, rank, base_model=str(root / "aligned"))
"""


def ensure_data(root: Path) -> None:
    """Generate the models and both adapters once (a marker records the setup they were made for)."""
    marker = root / "setup.json"
    record = {"shape": SHAPE, "ranks": list(RANKS), "targets": list(LINEAR)}
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    print(f"generating {root} (a few minutes)", file=sys.stderr, flush=True)
    script = _GENERATE.format(shape=SHAPE, ranks=RANKS, linear=LINEAR)
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    marker.write_text(json.dumps(record))


def export_code(ref: str, into: Path) -> tuple[str, dict[str, str]]:
    """`ref`'s safelora_cli in `into`, and the environment that imports it ahead of any install."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    code = into / f"code-{commit}"
    if code.exists():
        shutil.rmtree(code)
    code.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "safelora_cli"], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    return commit, {**os.environ, "PYTHONPATH": str(code)}


def patch_cmd(root: Path, rank: int, top_k: int) -> list[str]:
    return [str(BIN / "safelora"), "patch", "--base", str(root / "base"), "--aligned", str(root / "aligned"),
            "--adapter", str(root / f"adapter-r{rank}"), "--out", str(root / "out"), "--top-k", str(top_k),
            "--device", "cpu", "--quiet"]


def measure(root: Path, envs: dict[str, dict[str, str]], top_ks: list[int], runs: int) -> dict[Row, bm.Summary]:
    """Every (commit, K, rank) row `runs` times, interleaved, so that load from other processes on
    the machine falls on all rows alike."""
    samples: dict[Row, list[bm.Sample]] = {}
    for n in range(runs):
        for commit, env in envs.items():
            for top_k in top_ks:
                for rank in RANKS:
                    shutil.rmtree(root / "out", ignore_errors=True)
                    sample = bm.run(patch_cmd(root, rank, top_k), env=env, cwd=root)
                    samples.setdefault((commit, top_k, rank), []).append(sample)
                    print(f"run {n + 1}/{runs} {commit} K={top_k} r={rank}: {sample.peak_anon / GB:.2f} GB, "
                          f"{sample.wall_s:.1f} s", file=sys.stderr, flush=True)
    return {row: bm.Summary(s) for row, s in samples.items()}


def adapter_mb(root: Path, rank: int) -> float:
    return (root / f"adapter-r{rank}" / "adapter_model.safetensors").stat().st_size / 1e6


def render(root: Path, results: dict[Row, bm.Summary], runs: int) -> str:
    """A Markdown table of the rows, and per (commit, K) how peak memory changes with the adapter."""
    lines = [f"Medians of {runs} warm runs, interleaved.", "",
             "| commit | --top-k | adapter | adapter (MB) | peak anon RSS, median (GB) | worst (GB) "
             "| peak RSS, median (GB) | wall, median (s) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for (commit, top_k, rank), s in results.items():
        lines.append(f"| {commit} | {top_k} | all linear, r = {rank} | {adapter_mb(root, rank):.0f} | "
                     f"{s.peak_anon / GB:.2f} | {s.peak_anon_max / GB:.2f} | {s.peak_rss / GB:.2f} | {s.wall_s:.1f} |")
    lines += ["", "| commit | --top-k | peak anon RSS, r = 64 against r = 8 | difference (GB) |",
              "|---|---:|---:|---:|"]
    for commit, top_k in dict.fromkeys((c, k) for c, k, _ in results):
        low, high = (results[(commit, top_k, r)].peak_anon for r in RANKS)
        lines.append(f"| {commit} | {top_k} | {high / low:.2f}× | {(high - low) / GB:+.2f} |")
    grown = (adapter_mb(root, RANKS[1]) - adapter_mb(root, RANKS[0])) / 1e3
    lines.append(f"\nThe r = 64 adapter is {grown:.2f} GB larger than the r = 8 one.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--ref", action="append", help="a commit to measure (repeatable; default HEAD)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[8], help="--top-k values of the rows")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = args.data_dir.absolute() / "adapter-size"
    ensure_data(root)
    envs = dict(export_code(ref, args.data_dir.absolute()) for ref in args.ref or ["HEAD"])
    print(render(root, measure(root, envs, args.top_k, args.runs), args.runs))


if __name__ == "__main__":
    main()
