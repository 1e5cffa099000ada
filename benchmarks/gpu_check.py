"""Check safelora on an NVIDIA GPU: agreement with the CPU, the 7B-shape speed rows, subspace and width rows.

    python benchmarks/gpu_check.py --out DIR              # on a machine with a CUDA GPU (about 8 minutes)
    python benchmarks/gpu_check.py --out DIR --rehearse   # tiny shapes, CPU on both sides (about 3 minutes)

Steps, most valuable first, each printed as it goes (unbuffered) and each skipped, saying so, when
what is left of the time budget (--budget-s, default 450) or of the disk would not hold it:
  1. agree: a small Llama-shaped trio (8 layers, LoRA r = 16 on all seven linear modules) is patched
     with `safelora_cli.patch` on the CPU and on the GPU, into two directories, for three rules
     (threshold 0.5, top-k 5, exact projection of rank 4): cosines within 1e-5, the same selection,
     patched lora_B close (relative Frobenius difference ≤ 1e-4), every other tensor identical;
  2. speed: the 7B-shape trio (hidden 4096, 32 layers, 4 shards of ~3.4 GB per model, bf16, LoRA r = 16
     on all seven linear modules; generated once, kept in --data-dir); rows as bench_patch.py measures
     them, each a fresh process: (0) start-up with CUDA initialised, (a) the I/O floor, (b) `safelora
     patch --device cuda`, warm, then cold when dropping the page cache works; targets (b)/(a) ≤ 1.25×
     warm and ≤ 1.05× cold. The untimed warm-up run of (b) records torch's peak GPU memory;
  3. subspace: on the agreement trio, `safelora_cli.subspace` exact and rank 8 on each device (exact:
     V bit for bit the same), then `inspect(subspace=...)` of each file on its device (cosines and
     bounds within 1e-5, the same selection); then `safelora subspace --rank 64` of the 7B trio's
     q_proj/v_proj weights on the GPU, timed (a float64 SVD per weight);
  4. width: one decoder layer of 70B and of 405B geometry (bench_wide.py; ~1.7 and ~6.4 GB per model,
     generated once), `safelora patch --device cuda`: wall, peak anonymous RSS, torch's peak GPU memory;
  5. cpu: (b) with `--device cpu` on the 7B trio, for comparison, while the budget lasts.
Results: DIR/gpu-check.json (every sample) and DIR/gpu-check.md (the tables). `--steps` runs a
subset (a second run with the data already generated can spend its budget on the later steps).
Nothing is downloaded or installed; the package is imported from this checkout. --rehearse swaps
in tiny shapes and uses the CPU for both sides, so that every step can be tried without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_measure as bm  # noqa: E402
import gpu_rows  # noqa: E402
from gpu_render import markdown  # noqa: E402
from gpu_rows import GB, Budget, child_env, say  # noqa: E402

PY = sys.executable
COS_TOL = 1e-5
B_TOL = 1e-4
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS = ("agree", "speed", "subspace", "width", "cpu")
GEN_GBPS = 0.25  # bytes written per second when generating, until a large trio was generated and timed
RANK64_ESTIMATE_S = {"gpu": 90.0, "rehearse": 20.0}  # `subspace --rank 64` of the 7B q/v weights (64 SVDs)


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> dict[str, int]:
    return {"hidden": hidden, "intermediate": inter, "layers": layers, "heads": heads, "kv_heads": kv,
            "vocab": vocab}


# Trios per mode: name → (kind, safelora_cli.demo.LlamaShape keyword arguments, layers per shard).
TRIOS: dict[str, dict[str, tuple[str, dict[str, int], int]]] = {
    "gpu": {"agree": ("llama", _llama(1024, 2816, 8, 16, 4, 8000), 2),
            "speed": ("llama", _llama(4096, 11008, 32, 32, 32, 32000), 8),  # demo.SHAPE_7B, as `make bench`
            "w70": ("wide", _llama(8192, 28672, 1, 64, 8, 256), 1),  # bench_wide.WIDE_SHAPES
            "w405": ("wide", _llama(16384, 53248, 1, 128, 8, 256), 1)},
    "rehearse": {"agree": ("llama", _llama(128, 352, 4, 4, 2, 512), 1),
                 "speed": ("llama", _llama(256, 688, 4, 4, 4, 2000), 1),
                 "w70": ("wide", _llama(384, 1344, 1, 4, 2, 64), 1),
                 "w405": ("wide", _llama(768, 2496, 1, 8, 2, 64), 1)},
}
WIDTH_LABELS = {"w70": "70B geometry", "w405": "405B geometry"}


def record(spec: tuple[str, dict[str, int], int]) -> dict[str, object]:
    """What a generated trio's marker file holds (gpu_steps.make_trio compares it before reusing data)."""
    kind, shape, per_shard = spec
    return {"kind": kind, "shape": shape, "per_shard": per_shard, "targets": list(ALL_LINEAR), "rank": 16}


def model_bytes(shape: dict[str, int]) -> int:
    """Bytes of one bf16 model of this shape (linear weights of every layer, embeddings and head)."""
    h, m, kv = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    return 2 * (shape["layers"] * (2 * h * h + 2 * kv * h + 3 * m * h) + 2 * shape["vocab"] * h)


def child(*args: str) -> dict:  # type: ignore[type-arg]
    """Run a gpu_steps.py step in a child process (torch is never imported here); its JSON line."""
    proc = subprocess.run([PY, str(HERE / "gpu_steps.py"), *args], env=child_env(), cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class Run:
    """The state of one check: where things go, the budget, what was found and what was skipped."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.mode = "rehearse" if args.rehearse else "gpu"
        self.device = "cpu" if args.rehearse else "cuda"
        self.repeat: int = args.repeat or (1 if args.rehearse else 3)
        self.steps = set(args.steps.split(","))
        self.data = Path(args.data_dir or REPO / "bench-data" / f"gpu-{'rehearse' if args.rehearse else 'check'}")
        self.work = self.data / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.budget = Budget(args.budget_s)
        self.skipped: list[str] = []
        self.gen_gbps = GEN_GBPS
        self.result: dict[str, object] = {"rehearse": args.rehearse, "device": self.device, "repeat": self.repeat,
                                          "steps": sorted(self.steps, key=STEPS.index), "generated": {}}

    def root(self, name: str) -> Path:
        return self.data / name

    def ready(self, name: str) -> bool:
        marker = self.root(name) / "gpu-check-trio.json"
        return marker.is_file() and json.loads(marker.read_text()) == record(TRIOS[self.mode][name])

    def ensure(self, name: str, after_s: float = 0.0, what: str = "") -> bool:
        """Generate trio `name` unless it is there; False (skipped, saying why) when disk or budget is short.
        `after_s`: what must still fit once it is made, the step `what` that uses it."""
        what = what or f"{name} rows"
        spec = TRIOS[self.mode][name]
        need = 2 * model_bytes(spec[1])
        if not self.ready(name):
            free = shutil.disk_usage(self.data).free
            if free < 1.1 * need:
                self.skip(f"{name} trio: skipped, {need / GB:.1f} GB to write and {free / GB:.1f} GB free on disk")
                return False
            if not self.budget.allows(need / GB / self.gen_gbps + after_s, f"{name} trio and {what}",
                                      self.skipped):
                return False
            say(f"  generating the {name} trio ({need / GB:.2f} GB of bf16; kept in {self.root(name)})")
        elif not self.budget.allows(after_s, what, self.skipped):
            return False
        made = child("_trio", str(self.root(name)), json.dumps(record(spec)))
        if made["generated_s"] is not None:
            self.result["generated"][name] = made["generated_s"]  # type: ignore[index]
            if made["bytes"] > GB:
                self.gen_gbps = made["bytes"] / GB / made["generated_s"]
            say(f"  generated in {made['generated_s']:.1f} s")
        return True

    def skip(self, message: str) -> None:
        self.skipped.append(message)
        say(message)


def step_agree(run: Run) -> None:
    say("step agree: CPU vs GPU, `safelora_cli.patch` into two directories, three rules")
    run.ensure("agree")
    devices = ("cpu", run.device)
    agree = child("_agree", str(run.root("agree")), str(run.work), *devices, str(COS_TOL), str(B_TOL))
    for name, r in agree.items():
        say(f"  {name}: max cosine diff {r['max_cosine_diff']:.1e}, same selection {r['same_selection']}, "
            f"max rel B diff {r['max_rel_b_diff']:.1e}, ok {r['ok']}")
    run.result.update(agreement_devices=list(devices), agreement=agree)


def step_speed(run: Run) -> None:
    say(f"step speed: rows (0), (a), (b) on {run.device}, warm then cold, up to {run.repeat} runs each")
    needed = 2 * model_bytes(TRIOS[run.mode]["speed"][1]) / GB
    if not run.ensure("speed", after_s=3 * needed / 2.0 + 20):  # at least one warm repetition
        return
    rows, extra = gpu_rows.speed_rows(run.root("speed"), run.device, run.repeat, run.budget, run.work, run.skipped)
    run.result.update(rows=rows, extra=extra)


def step_subspace(run: Run) -> None:
    say("step subspace: exact and rank 8 on both devices, then `subspace --rank 64` of the 7B q/v weights")
    agree = run.result.get("agreement")
    estimate = 2 * sum(sum(r["seconds"]) for r in agree.values()) if isinstance(agree, dict) else 60.0
    if run.ensure("agree", after_s=estimate, what="the subspace agreement (exact, rank 8)"):
        found = child("_subspace", str(run.root("agree")), str(run.work), "cpu", run.device, str(COS_TOL))
        for name, r in found.items():
            say(f"  {name}: tensors identical {r['tensors_identical']}, max cosine diff {r['max_cosine_diff']:.1e}, "
                f"max bound diff {r['max_bound_diff']:.1e}, same selection {r['same_selection']}, ok {r['ok']}")
        run.result["subspace"] = found
    if not run.ready("speed"):
        run.skip("subspace --rank 64 of the 7B q/v weights: skipped, the speed trio was not generated")
        return
    if run.budget.allows(RANK64_ESTIMATE_S[run.mode], "subspace --rank 64 of the 7B q/v weights", run.skipped):
        run.result["rank64"] = gpu_rows.rank64_row(run.root("speed"), run.device, run.repeat, run.budget, run.work,
                                                   run.skipped)


def step_width(run: Run) -> None:
    say(f"step width: one layer of 70B and of 405B geometry, `safelora patch --device {run.device}`")
    width: dict[str, object] = {}
    for name in ("w70", "w405"):
        needed = 2 * model_bytes(TRIOS[run.mode][name][1]) / GB
        if run.ensure(name, after_s=(1 + run.repeat) * (needed / 2.0 + 6)):
            width[name] = gpu_rows.width_row(run.root(name), run.device, run.repeat, run.budget, run.work,
                                             run.skipped)
            width[name]["label"] = WIDTH_LABELS[name]  # type: ignore[index]
            width[name]["shape"] = TRIOS[run.mode][name][1]  # type: ignore[index]
    run.result["width"] = width


def step_cpu(run: Run) -> None:
    say("step cpu: (b) with --device cpu on the 7B trio, for comparison, while the budget lasts")
    if not run.ready("speed"):
        run.skip("(b) --device cpu: skipped, the speed trio was not generated")
        return
    row = gpu_rows.cpu_row(run.root("speed"), run.repeat, run.budget, run.work, run.skipped)
    if row:
        run.result.setdefault("rows", {})["b_cpu warm"] = row  # type: ignore[index]


def machine() -> dict[str, str]:
    info = {"nproc": str(os.cpu_count()), "cpu": platform.processor() or platform.machine(),
            "ram": f"{bm.meminfo_bytes('MemTotal') / 2**30:.0f} GiB"}
    with open("/proc/cpuinfo") as fh:
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                           info["cpu"])
    return info


def describe(spec: tuple[str, dict[str, int], int]) -> str:
    kind, shape, per_shard = spec
    shards = shape["layers"] // per_shard if kind == "llama" else 8
    return (f"hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['layers']} layers, {shards} shards per "
            f"model, bf16; LoRA r = 16 on all seven linear modules")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="directory for gpu-check.json and gpu-check.md")
    parser.add_argument("--rehearse", action="store_true", help="tiny shapes, CPU on both sides (no GPU needed)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per row (default 3; 1 with --rehearse)")
    parser.add_argument("--budget-s", type=float, default=450, help="time budget in seconds (default 450)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--data-dir", default=None,
                        help="where the trios are generated and kept (default: bench-data/gpu-check in the "
                             "repository, or bench-data/gpu-rehearse with --rehearse)")
    args = parser.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    say(f"gpu_check ({run.mode}): results go to {out}, data to {run.data}, budget {args.budget_s:.0f} s")
    env = child("_env")
    say(f"environment: {json.dumps(env)}")
    if run.device == "cuda" and not env["cuda_available"]:
        raise SystemExit("no CUDA device is visible to torch; run with --rehearse to try the steps on the CPU")
    for name, step in (("agree", step_agree), ("speed", step_speed), ("subspace", step_subspace),
                       ("width", step_width), ("cpu", step_cpu)):
        if name in run.steps:
            step(run)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    checks = [r["ok"] for key in ("agreement", "subspace") for r in run.result.get(key, {}).values()]  # type: ignore[attr-defined]
    run.result.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), environment=env,
        machine=machine(), commit=commit, trios={k: describe(v) for k, v in TRIOS[run.mode].items()},
        agreement_ok=all(checks), skipped=run.skipped, total_s=time.perf_counter() - gpu_rows.T0)
    (out / "gpu-check.json").write_text(json.dumps(run.result, indent=1))
    text = markdown(run.result)
    (out / "gpu-check.md").write_text(text)
    print(text, flush=True)
    say(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
