"""Two commits of safelora-cli on the same data, interleaved in one run: wall time against the I/O floor.

    python benchmarks/versus.py OLD_CODE_DIR NEW_CODE_DIR SETUP [REPEAT]

Each code directory holds an exported `safelora_cli` package (e.g. `git archive <commit>
safelora_cli | tar -x -C DIR`). The setup's data must exist under bench-data/ (bench_patch.py
generates it). Rows (a), (b, old), (b, new) run interleaved REPEAT times after one untimed run
each; medians and ratios to (a) are printed as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
import bench_measure as bm  # noqa: E402


def main(old: str, new: str, name: str, repeat: int = 5) -> None:
    setup = bench_data.SETUPS[name]
    root = HERE.parent / "bench-data" / setup.root_name
    base, aligned, adapter = bench_data.trio_dirs(root, setup.adapter_dir)
    floor = [sys.executable, str(HERE / "io_floor.py"), str(root / f"manifest-{name}.json")]
    patch = [str(Path(sys.executable).parent / "safelora"), "patch", "--base", str(base), "--aligned", str(aligned),
             "--adapter", str(adapter), "--force", "--quiet", "--device", "cpu", "--out"]
    rows = {"a": (floor, None), "b_old": ([*patch, f"/tmp/versus-old-{name}"], old),
            "b_new": ([*patch, f"/tmp/versus-new-{name}"], new)}
    samples: dict[str, list[bm.Sample]] = {k: [] for k in rows}
    for i in range(repeat + 1):
        for key, (cmd, code) in rows.items():
            env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())} if code else None
            sample = bm.run(cmd, env=env, cwd=Path(code) if code else None)
            if i:
                samples[key].append(sample)
    medians = {k: bm.Summary(s) for k, s in samples.items()}
    a = medians["a"].wall_s
    print(json.dumps({"setup": name, "repeat": repeat, "load": Path("/proc/loadavg").read_text().split()[0],
                      **{k: {"wall_s": round(m.wall_s, 2), "over_floor": round(m.wall_s / a, 2),
                             "peak_anon_gb": round(m.peak_anon / 1e9, 2)} for k, m in medians.items()}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 5)
