"""Subspace files against the two-model run: sizes, times, and how far their cosines are from it.

    python benchmarks/bench_subspace.py --shape 1b                # exact (float32, bfloat16) and --rank 8, 64
    python benchmarks/bench_subspace.py --shape 7b-qv --ranks ""   # exact modes only (see docs/benchmarks.md)

For each shape (the synthetic bf16 trios of `make bench`): `inspect` with the two models, then for
each file kind `safelora subspace` and `inspect --subspace`, each timed (median of --repeat runs,
warm page cache) with its peak anonymous RSS. Every cosine is compared with the two-model run's:
exact float32 must agree exactly, and for low-rank files the two-model cosine must lie inside
[cosine, cosine + cosine_error_bound]; a violation stops the benchmark. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import bench_data
import bench_env as env
import bench_measure as bm


def _cli(*args: object) -> list[str]:
    return [str(env.BIN / "safelora"), *(str(a) for a in args)]


def _timed(cmd: list[str], repeat: int, fresh: Path | None = None) -> bm.Summary:
    samples = []
    for _ in range(repeat):
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        samples.append(bm.run(cmd))
    return bm.Summary(samples)


def _report(cmd: list[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def _document(out: Path) -> dict:  # type: ignore[type-arg]
    """The file's header record (read without torch)."""
    with open(out / "model.safetensors", "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        return json.loads(json.loads(file.read(size))["__metadata__"]["safelora_subspace"])


def _compare(two: dict, one: dict, low_rank: bool) -> dict[str, object]:  # type: ignore[type-arg]
    pairs = list(zip(two["layers"], one["layers"], strict=True))
    worst = max(abs(a["cosine"] - b["cosine"]) for a, b in pairs)
    same = sum(a["selected"] == b["selected"] for a, b in pairs)
    found: dict[str, object] = {"max_cos_diff": worst, "same_selection": same, "layers": len(pairs)}
    if low_rank:
        for a, b in pairs:
            if not b["cosine"] - 1e-5 <= a["cosine"] <= b["cosine"] + b["cosine_error_bound"] + 1e-5:
                raise SystemExit(f"bound violated in {b['module']}: {b['cosine']} + {b['cosine_error_bound']} "
                                 f"does not hold the two-model {a['cosine']}")
        found["max_bound"] = max(b["cosine_error_bound"] for _, b in pairs)
        found["undecided"] = one["summary"]["selection_undecided"]
    return found


def bench(name: str, data_dir: Path, repeat: int, ranks: list[int]) -> list[str]:
    root, _ = env.ensure_data(data_dir, name)
    base, aligned, adapter = bench_data.trio_dirs(root, bench_data.SETUPS[name].adapter_dir)
    work = data_dir / "subspace-out"
    work.mkdir(exist_ok=True)
    two_cmd = _cli("inspect", "--base", base, "--aligned", aligned, "--adapter", adapter, "--json", "-q",
                   "--device", "cpu")
    env.run(two_cmd)
    two_time, two = _timed(two_cmd, repeat), _report(two_cmd)
    groups = bench_data.needed_tensors(root, bench_data.SETUPS[name].adapter_dir)
    needed = bench_data.needed_bytes(groups[:-1])  # the two models' weights the adapter adapts
    rows = [f"| {name} | two models | {needed / 1e9:.2f} GB read | — | {two_time.wall_s:.2f} s, "
            f"{two_time.peak_anon / 1e9:.2f} GB | — |"]
    kinds = [("exact float32", ["--dtype", "float32"], False), ("exact bfloat16", ["--dtype", "bfloat16"], False)]
    kinds += [(f"rank {k}", ["--rank", k], True) for k in ranks]
    for label, extra, low_rank in kinds:
        out = work / f"{name}-{label.replace(' ', '-')}"
        write = _cli("subspace", "--base", base, "--aligned", aligned, "--adapter", adapter, "--out", out, "-q",
                     "--device", "cpu", *extra)
        written = _timed(write, 1 if low_rank else repeat, fresh=out)
        size = (out / "model.safetensors").stat().st_size
        use = _cli("inspect", "--subspace", out, "--adapter", adapter, "--json", "-q", "--device", "cpu")
        env.run(use)
        used, report = _timed(use, repeat), _report(use)
        found = _compare(two, report, low_rank)
        agree = f"cosines within {found['max_cos_diff']:.1e}; same selection in {found['same_selection']} of " \
                f"{found['layers']}"
        if low_rank:
            kept = [e["energy_kept"] for e in _document(out)["entries"].values()]
            agree += (f"; largest bound {found['max_bound']:.3f}, {found['undecided']} undecided; C's energy kept "
                      f"{min(kept):.7f}–{max(kept):.7f}")
        rows.append(f"| {name} | {label} | {size / 1e9:.3f} GB | {written.wall_s:.1f} s | {used.wall_s:.2f} s, "
                    f"{used.peak_anon / 1e9:.2f} GB | {agree} |")
        env.log(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", nargs="+", default=["1b"], choices=sorted(bench_data.SETUPS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ranks", default="8,64", help="comma-separated ranks of the low-rank rows ('' for none)")
    parser.add_argument("--data-dir", default=str(env.REPO / "bench-data"))
    args = parser.parse_args(argv)
    ranks = [int(k) for k in args.ranks.split(",") if k]
    print("| shape | file | size | written in | inspect from it (wall, peak anon RSS) | against the two-model run |")
    print("|---|---|---|---|---|---|")
    for name in args.shape:
        for row in bench(name, Path(args.data_dir).resolve(), args.repeat, ranks):
            print(row)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
