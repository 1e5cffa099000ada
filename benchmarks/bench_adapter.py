"""Peak memory against the adapter's size: the same models, an all-linear adapter at r = 8 and r = 64.

    python benchmarks/bench_adapter.py DATA_DIR                 # generate if missing, measure HEAD
    python benchmarks/bench_adapter.py DATA_DIR --ref 689de89   # the same rows for another commit

The models are narrow and deep (hidden 512, MLP 1408, 256 layers: 0.82 B parameters, 1.6 GB
per model in bf16), so that an all-linear r = 64 adapter in float32 (1792 layers, 0.65 GB) is
large beside the weights, and the r = 8 one (81 MB) small. If peak anonymous RSS follows the
adapter, the two rows differ by about the adapter's size; streamed, they match. Each row is the
median of `--runs` fresh `safelora patch` processes (warm page cache) on the commit exported with
`git archive`, so changes in the working tree do not leak into a long run.
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


def measure(root: Path, rank: int, env: dict[str, str], runs: int) -> bm.Summary:
    adapter = root / f"adapter-r{rank}"
    out = root / "out"
    samples = []
    for _ in range(runs):
        if out.exists():
            shutil.rmtree(out)
        cmd = [str(BIN / "safelora"), "patch", "--base", str(root / "base"), "--aligned", str(root / "aligned"),
               "--adapter", str(adapter), "--out", str(out), "--top-k", "896", "--device", "cpu"]
        samples.append(bm.run(cmd, env=env, cwd=root))
    return bm.Summary(samples)


def adapter_mb(root: Path, rank: int) -> float:
    return (root / f"adapter-r{rank}" / "adapter_model.safetensors").stat().st_size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--ref", default="HEAD", help="the commit to measure (default HEAD)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = args.data_dir.absolute() / "adapter-size"
    ensure_data(root)
    commit, env = export_code(args.ref, args.data_dir.absolute())
    print(f"commit {commit}, medians of {args.runs} warm runs, top-K 896 (half the layers)")
    print("| adapter | size (MB) | peak anon RSS, median (GB) | worst (GB) | peak RSS, median (GB) "
          "| wall, median (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    summaries = {}
    for rank in RANKS:
        s = summaries[rank] = measure(root, rank, env, args.runs)
        print(f"| all linear, r = {rank} | {adapter_mb(root, rank):.0f} | {s.peak_anon / GB:.2f} | "
              f"{s.peak_anon_max / GB:.2f} | {s.peak_rss / GB:.2f} | {s.wall_s:.1f} |", flush=True)
    low, high = (summaries[r].peak_anon for r in RANKS)
    grown = (adapter_mb(root, RANKS[1]) - adapter_mb(root, RANKS[0])) * 1e6
    print(f"r = {RANKS[1]} against r = {RANKS[0]}: peak anon RSS {high / low:.2f}× "
          f"({(high - low) / GB:+.2f} GB for {grown / GB:.2f} GB more adapter)")


if __name__ == "__main__":
    main()
