"""Check safelora on an NVIDIA GPU: agreement with the CPU, then the 7B-shape speed rows.

    python benchmarks/gpu_check.py --out DIR              # on a machine with a CUDA GPU (5–8 minutes)
    python benchmarks/gpu_check.py --out DIR --rehearse   # tiny shapes, CPU on both sides (about a minute)

Steps, each printed as it goes (unbuffered):
  1. agreement: a small Llama-shaped trio (~200 MB per model, 8 layers in 4 shards, LoRA r = 16 on all
     seven linear modules) is analysed in-process with `safelora_cli.pipeline.analyze`, once with
     RunConfig device "cpu" and once with "cuda", for three rules (threshold 0.5, top-k 5, exact
     projection of rank 4): cosines must agree within 1e-5, the selection must be identical and the
     patched lora_B tensors close (relative Frobenius difference ≤ 1e-4);
  2. data: the 7B-shape trio (hidden 4096, MLP 11008, 32 layers, 4 shards of ~3.4 GB per model, bf16;
     LoRA r = 16 on all seven linear modules) is generated with `safelora_cli.demo` (once; kept in
     --data-dir);
  3. rows, every one a fresh process measured like benchmarks/bench_patch.py does (wall time, peak
     RSS, peak anonymous RSS): (0) start-up with CUDA initialised, (a) the I/O floor, (b)
     `safelora patch --device cuda`, warm (one untimed run first), then cold when dropping the page
     cache works (root), each `--repeat` times; last, while the time budget lasts, (b) with
     `--device cpu` for comparison (warm). The untimed run of (b) also records torch's peak GPU
     memory allocation;
  4. results: DIR/gpu-check.json (every sample) and DIR/gpu-check.md (the tables).

A time budget (--budget-s, default 450) keeps the whole run within about 8 minutes: a step that
would not fit in what is left is skipped and says so. Nothing is downloaded or installed; the
package is imported from this checkout when it is not installed. --rehearse swaps in tiny shapes
and uses the CPU for both sides, so that every step can be tried on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
import bench_measure as bm  # noqa: E402

PY = sys.executable
GB = 1e9
COS_TOL = 1e-5
B_TOL = 1e-4
RULES = {  # name → RunConfig pieces, as keyword arguments for SelectionRule and ProjectionSettings
    "threshold 0.5": ({"threshold": 0.5}, {}),
    "top-k 5": ({"threshold": None, "top_k": 5}, {}),
    "exact, rank 4": ({"threshold": 0.5}, {"kind": "exact", "rank": 4}),
}
# Shapes as safelora_cli.demo.LlamaShape keyword arguments: (agreement trio, speed trio), layers per shard.
SHAPES = {
    "gpu": ({"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "kv_heads": 4, "vocab": 8000},
            {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000}),
    "rehearse": ({"hidden": 128, "intermediate": 352, "layers": 4, "heads": 4, "kv_heads": 2, "vocab": 512},
                 {"hidden": 512, "intermediate": 1376, "layers": 8, "heads": 8, "kv_heads": 8, "vocab": 4000}),
}
SHARDS = 4  # per model, for both trios (the 7B shape: 8 layers per shard, like the CPU benchmarks)
TARGETS = bench_data.ALL_LINEAR
RANK = 16
T0 = time.perf_counter()


def per_shard(shape: dict[str, int]) -> int:
    return max(1, shape["layers"] // SHARDS)


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", flush=True)


def child_env() -> dict[str, str]:
    """Children import safelora_cli from this checkout first, and print unbuffered."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def child(*args: str, timeout: float | None = None) -> str:
    """Run this script in a child process (torch is never imported here); return its stdout."""
    proc = subprocess.run([PY, str(Path(__file__).resolve()), *args], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"step {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


# ---------------------------------------------------------------- steps run in child processes


def env_info() -> dict[str, object]:
    import torch

    info: dict[str, object] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                               "cuda_version": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / GB, 1),
                    capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
    import safetensors

    import safelora_cli
    import safelora_cli.cli
    import safelora_cli.pipeline  # noqa: F401  (fails here, early, when a dependency is missing)
    info.update(safetensors=safetensors.__version__, safelora_cli=safelora_cli.__version__,
                safelora_cli_path=str(Path(safelora_cli.__file__).parent))
    return info


def make_trio(root: Path, shape_kwargs: dict[str, int], per_shard: int) -> dict[str, object]:
    """base/, aligned/ and adapter/ under `root` (all linear modules, r = 16), unless already there."""
    from safelora_cli.demo import LlamaShape, write_adapter, write_models

    marker = root / "gpu-check-trio.json"
    record = {"shape": shape_kwargs, "per_shard": per_shard, "targets": list(TARGETS), "rank": RANK}
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return {"generated_s": None}
    if root.exists():
        shutil.rmtree(root)
    start = time.perf_counter()
    import torch

    shape = LlamaShape(**shape_kwargs)
    bases = write_models(root, shape, torch.bfloat16, layers_per_shard=per_shard)
    write_adapter(root / "adapter", shape, bases, TARGETS, RANK, base_model="synthetic-aligned")
    marker.write_text(json.dumps(record))
    return {"generated_s": time.perf_counter() - start}


def agreement(root: Path, devices: tuple[str, str]) -> dict[str, object]:
    """Analyse the trio on both devices for every rule; compare cosines, selections and patched B's."""
    import torch

    from safelora_cli.config import Projection, ProjectionSettings, RunConfig, SelectionRule
    from safelora_cli.pipeline import analyze

    results: dict[str, object] = {}
    for name, (selection, projection) in RULES.items():
        settings = ProjectionSettings(Projection(projection["kind"]), projection.get("rank")) if projection \
            else ProjectionSettings()
        runs = {}
        for device in devices:
            config = RunConfig(base=str(root / "base"), aligned=str(root / "aligned"), adapter=str(root / "adapter"),
                               selection=SelectionRule(**selection), projection=settings, device=device)
            start = time.perf_counter()
            runs[device] = analyze(config)
            runs[device + "_s"] = time.perf_counter() - start  # type: ignore[assignment]
        first, second = (runs[d] for d in devices)
        cos_diff = 0.0
        undefined_mismatch = 0
        for x, y in zip(first.layers, second.layers, strict=True):
            cx, cy = x.math.cosine, y.math.cosine
            if (cx is None) != (cy is None):
                undefined_mismatch += 1
            elif cx is not None and cy is not None:
                cos_diff = max(cos_diff, abs(cx - cy))
        same_modules = [x.plan.module for x in first.layers] == [y.plan.module for y in second.layers]
        same_selection = [x.selected for x in first.layers] == [y.selected for y in second.layers]
        b_diff = 0.0
        same_keys = first.patched_b.keys() == second.patched_b.keys()
        for key in first.patched_b.keys() & second.patched_b.keys():
            p, q = first.patched_b[key].double().cpu(), second.patched_b[key].double().cpu()
            b_diff = max(b_diff, float(torch.linalg.norm(p - q) / torch.linalg.norm(p).clamp_min(1e-30)))
        ok = (same_modules and same_selection and same_keys and not undefined_mismatch and cos_diff <= COS_TOL
              and b_diff <= B_TOL)
        results[name] = {
            "layers": len(first.layers), "selected": sum(x.selected for x in first.layers),
            "max_cosine_diff": cos_diff, "undefined_mismatch": undefined_mismatch, "same_modules": same_modules,
            "same_selection": same_selection, "same_patched_keys": same_keys, "max_rel_b_diff": b_diff,
            "seconds": {d: runs[d + "_s"] for d in devices}, "devices": [first.device, second.device], "ok": ok,
        }
    return results


def child_main(argv: list[str]) -> int:
    """Entry point of the child steps: `_env`, `_trio ROOT SHAPE_JSON PER_SHARD`, `_agree ROOT DEV DEV`."""
    step = argv[0]
    if step == "_env":
        out: object = env_info()
    elif step == "_trio":
        out = make_trio(Path(argv[1]), json.loads(argv[2]), int(argv[3]))
    elif step == "_agree":
        out = agreement(Path(argv[1]), (argv[2], argv[3]))
    else:
        raise SystemExit(f"unknown step {step}")
    print(json.dumps(out))
    return 0


# GPU peak memory of one (b) run: the CLI run in-process, torch's peak allocation written at exit.
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


# ---------------------------------------------------------------- the orchestrating process


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


class Budget:
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


def measure_rows(root: Path, device: str, repeat: int, budget: Budget, work: Path,
                 skipped: list[str]) -> tuple[dict[str, object], dict[str, object]]:
    """Rows (0), (a), (b) on `device`, warm then cold, then (b) on the CPU; (rows, extra facts)."""
    base, aligned, adapter = bench_data.trio_dirs(root)
    groups = bench_data.needed_tensors(root)
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps(groups))
    patch = [*safelora_command(), "patch", "--base", str(base), "--aligned", str(aligned), "--adapter", str(adapter),
             "--out", str(work / "patched"), "--force", "--quiet", "--device"]
    init = "import torch, safetensors.torch" + (f"; torch.zeros(1, device={device!r})" if device != "cpu" else "")
    cmds = {"startup": [PY, "-c", init], "a": [PY, str(HERE / "io_floor.py"), str(manifest)],
            "b": [*patch, device]}
    env = child_env()
    extra: dict[str, object] = {"needed_gb": bench_data.needed_bytes(groups) / GB,
                                "model_gb": sum(p.stat().st_size for p in base.glob("*.safetensors")) / GB}

    say(f"warm-up: one untimed run of each row ({', '.join(cmds)})")
    first: dict[str, float] = {}
    for key, cmd in cmds.items():
        peak_file = work / "gpu-peak.json"
        if key == "b":  # this run also records the GPU's peak allocation
            cmd = [PY, "-c", PEAK_WRAPPER, *cmd[len(safelora_command()):]]
        sample = bm.run(cmd, env={**env, "GPU_CHECK_PEAK_FILE": str(peak_file)}, cwd=work)
        first[key] = sample.wall_s
        say(f"  {key}: {sample.wall_s:.2f} s")
        if key == "b" and peak_file.is_file():
            peak = json.loads(peak_file.read_text())["max_memory_allocated"]
            extra["b_gpu_max_memory_allocated_gb"] = peak / GB if peak is not None else None
    rows: dict[str, object] = {}
    warm: dict[str, list[bm.Sample]] = {k: [] for k in cmds}
    for i in range(repeat):
        if not budget.allows(sum(first.values()) * 1.2, f"warm repetition {i + 1}", skipped):
            break
        say(f"warm repetition {i + 1}/{repeat}")
        for key, cmd in cmds.items():
            warm[key].append(bm.run(cmd, env=env, cwd=work))
            say(f"  {key}: {warm[key][-1].wall_s:.2f} s")
    rows.update({f"{k} warm": summary(s) for k, s in warm.items() if s})

    works, evidence = bm.check_drop_caches(sorted(base.glob("*.safetensors"))[:1])
    extra["drop_caches"] = evidence
    say(f"cold rows: {evidence}")
    if works:
        cold: dict[str, list[bm.Sample]] = {"a": [], "b": []}
        estimate = extra["needed_gb"] / 1.0 + first["b"] + 5  # type: ignore[operator]  # ~1 GB/s from disk
        for i in range(repeat):
            if not budget.allows(2 * estimate, f"cold repetition {i + 1}", skipped):
                break
            say(f"cold repetition {i + 1}/{repeat}")
            for key in cold:
                bm.drop_page_cache()
                cold[key].append(bm.run(cmds[key], env=env, cwd=work))
                say(f"  {key}: {cold[key][-1].wall_s:.2f} s")
        rows.update({f"{k} cold": summary(s) for k, s in cold.items() if s})

    # (b) on the CPU for comparison, while the budget lasts (in a rehearsal it repeats (b), to try the step).
    bm.read_files(sorted(p for d in (base, aligned, adapter) for p in d.iterdir() if p.is_file()))
    cpu_runs: list[bm.Sample] = []
    estimate = 30.0
    for i in range(repeat):
        if not budget.allows(estimate * 1.2, f"(b) --device cpu, run {i + 1}", skipped):
            break
        cpu_runs.append(bm.run([*patch, "cpu"], env=env, cwd=work))
        estimate = cpu_runs[-1].wall_s
        say(f"(b) --device cpu, warm, run {i + 1}/{repeat}: {estimate:.2f} s")
    if cpu_runs:
        rows["b_cpu warm"] = summary(cpu_runs)
    return rows, extra


LABELS = {
    "startup": "(0) start-up: import torch, safetensors{init}",
    "a": "(a) I/O floor: read the needed tensors",
    "b": "(b) `safelora patch --device {device}`",
    "b_cpu": "(b) on the CPU, for comparison: `safelora patch --device cpu`",
}


def markdown(result: dict) -> str:  # type: ignore[type-arg]
    env, device = result["environment"], result["device"]
    lines = [
        f"# GPU check{' (rehearsal: tiny shapes, CPU on both sides)' if result['rehearse'] else ''}",
        "",
        f"Run {result['date']} (UTC); {result['machine']['nproc']} CPUs ({result['machine']['cpu']}), "
        f"{result['machine']['ram']} RAM; GPU: {env.get('gpu', 'none')}"
        + (f" ({env.get('gpu_memory_gb')} GB, compute capability {env.get('capability')})" if env.get("gpu") else "")
        + f"; torch {env['torch']} (CUDA {env.get('cuda_version')}); safelora-cli {env['safelora_cli']}"
        + (f" at commit {result['commit']}" if result.get("commit") else "") + f"; total {result['total_s']:.0f} s.",
        "",
        f"## {' vs '.join(result['agreement_devices'])}: `safelora_cli.pipeline.analyze` on the same trio",
        "",
        f"Trio: {result['agreement_trio']}.",
        "",
        f"| rule | layers | selected | max cosine difference (≤ {COS_TOL:g}) | same selection | max relative "
        f"difference of patched B (≤ {B_TOL:g}) | {' / '.join(result['agreement_devices'])} time (s) | ok |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, r in result["agreement"].items():
        secs = " / ".join(f"{r['seconds'][d]:.2f}" for d in result["agreement_devices"])
        lines.append(f"| {name} | {r['layers']} | {r['selected']} | {r['max_cosine_diff']:.1e} | "
                     f"{'yes' if r['same_selection'] and r['same_patched_keys'] else '**no**'} | "
                     f"{r['max_rel_b_diff']:.1e} | {secs} | {'yes' if r['ok'] else '**no**'} |")
    extra = result["extra"]
    lines += [
        "",
        f"## Speed: {result['speed_trio']}",
        "",
        f"A patch reads {extra['needed_gb']:.2f} GB (base and aligned weights of the adapted modules, and the "
        f"adapter) of the {2 * extra['model_gb']:.2f} GB of both models. "
        f"Medians of up to {result['repeat']} runs per row, each a fresh process.",
        "",
        "| row | page cache | runs | wall, median (s) | wall, min–max (s) | peak RSS, median (GB) | "
        "peak anon RSS, median (max) (GB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    init = ", CUDA initialised" if device != "cpu" else ""
    for key, row in result["rows"].items():
        name, cache = key.split(" ")
        label = LABELS[name].format(init=init, device=device)
        lines.append(f"| {label} | {cache} | {row['runs']} | {row['wall_s_median']:.2f} | "
                     f"{row['wall_s_min']:.2f}–{row['wall_s_max']:.2f} | {row['peak_rss_gb_median']:.2f} | "
                     f"{row['peak_anon_gb_median']:.2f} ({row['peak_anon_gb_max']:.2f}) |")
    rows = result["rows"]
    lines.append("")
    facts = []
    wall = {key: row["wall_s_median"] for key, row in rows.items()}
    for cache in ("warm", "cold"):
        if f"a {cache}" in wall and f"b {cache}" in wall:
            facts.append(f"(b)/(a) wall time, {cache}: {wall[f'b {cache}'] / wall[f'a {cache}']:.2f}×")
    if "b warm" in wall and "startup warm" in wall:
        facts.append(f"(b) warm, less the start-up row: {wall['b warm'] - wall['startup warm']:.2f} s")
    if "b_cpu warm" in wall and "b warm" in wall:
        facts.append(f"(b) on the CPU / (b) on {device}, warm: {wall['b_cpu warm'] / wall['b warm']:.1f}×")
    if extra.get("b_gpu_max_memory_allocated_gb") is not None:
        facts.append(f"(b) peak GPU memory allocated by torch: {extra['b_gpu_max_memory_allocated_gb']:.2f} GB")
    facts.append(f"Cold rows: {extra.get('drop_caches', 'not tried')}")
    facts += result["skipped"]
    if result.get("generated_s"):
        facts.append(f"The speed trio was generated in {result['generated_s']:.1f} s by this run")
    lines += [f"- {f}." for f in facts]
    lines += ["", f"Agreement: {'all rules pass' if result['agreement_ok'] else '**FAILED**'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        return child_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="directory for gpu-check.json and gpu-check.md")
    parser.add_argument("--rehearse", action="store_true", help="tiny shapes, CPU on both sides (no GPU needed)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (default 3)")
    parser.add_argument("--budget-s", type=float, default=450, help="time budget in seconds (default 450)")
    parser.add_argument("--data-dir", default=None,
                        help="where the trios are generated and kept (default: bench-data/gpu-check in the "
                             "repository, or bench-data/gpu-rehearse with --rehearse)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "rehearse" if args.rehearse else "gpu"
    data_dir = Path(args.data_dir or REPO / "bench-data" / f"gpu-{'rehearse' if args.rehearse else 'check'}")
    data_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    skipped: list[str] = []

    say(f"gpu_check ({mode}): results go to {out}, data to {data_dir}")
    env = json.loads(child("_env"))
    say(f"environment: {json.dumps(env)}")
    device = "cpu" if args.rehearse else "cuda"
    if device == "cuda" and not env["cuda_available"]:
        raise SystemExit("no CUDA device is visible to torch; run with --rehearse to try the steps on the CPU")
    agree_shape, speed_shape = SHAPES[mode]

    say("step 1/3: CPU vs GPU agreement (making the small trio first)")
    agree_root = data_dir / "agree"
    child("_trio", str(agree_root), json.dumps(agree_shape), str(per_shard(agree_shape)))
    devices = ("cpu", device)
    agree = json.loads(child("_agree", str(agree_root), *devices))
    for name, r in agree.items():
        say(f"  {name}: max cosine diff {r['max_cosine_diff']:.1e}, same selection {r['same_selection']}, "
            f"max rel B diff {r['max_rel_b_diff']:.1e}, ok {r['ok']}")
    agreement_ok = all(r["ok"] for r in agree.values())

    say("step 2/3: the speed trio (generated once, then kept)")
    speed_root = data_dir / "speed"
    gen = json.loads(child("_trio", str(speed_root), json.dumps(speed_shape), str(per_shard(speed_shape))))
    if gen["generated_s"] is not None:
        say(f"  generated in {gen['generated_s']:.0f} s")

    say(f"step 3/3: rows (a) and (b) on {device}, warm then cold, {args.repeat} runs each")
    work = data_dir / "work"
    work.mkdir(exist_ok=True)
    rows, extra = measure_rows(speed_root, device, args.repeat, budget, work, skipped)

    machine = {"nproc": str(os.cpu_count()), "cpu": platform.processor() or platform.machine(), "ram": "?"}
    with open("/proc/cpuinfo") as fh:
        machine["cpu"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                              machine["cpu"])
    machine["ram"] = f"{bm.meminfo_bytes('MemTotal') / 2**30:.0f} GiB"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()

    def describe(shape: dict[str, int]) -> str:
        shards = -(-shape["layers"] // per_shard(shape))
        return (f"hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['layers']} layers, {shards} shards "
                f"per model, bf16; LoRA r = {RANK} on all seven linear modules")

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rehearse": args.rehearse,
        "device": device, "environment": env, "machine": machine, "commit": commit, "repeat": args.repeat,
        "agreement_devices": list(devices), "agreement_trio": describe(agree_shape),
        "agreement": agree, "agreement_ok": agreement_ok,
        "speed_trio": describe(speed_shape), "generated_s": gen["generated_s"],
        "rows": rows, "extra": extra, "skipped": skipped, "total_s": time.perf_counter() - T0,
    }
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "gpu-check.md").write_text(text)
    print(text, flush=True)
    say(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    return 0 if agreement_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
