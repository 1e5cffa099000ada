"""Benchmark `safelora patch` against the I/O floor and two dense implementations.

    python benchmarks/bench_patch.py                      # 1.1B shape (default), 5 runs per row
    python benchmarks/bench_patch.py --shape 7b           # 7B shape, all 7 linear modules, r=16 (3 runs)
    python benchmarks/bench_patch.py --shape 7b-qv        # 7B shape, q_proj/v_proj, r=8 (3 runs)
    python benchmarks/bench_patch.py --shape all --write-docs

Every row is a fresh process (imports included), repeated `--repeat` times (default: 5 for
1.1B, 3 for the 7B shapes); the tables show medians. Rows:
  (0) start-up only: `python -c "import torch, safetensors.torch"`;
  (a) the I/O floor: read exactly the tensors a patch needs (benchmarks/io_floor.py);
  (b) `safelora patch ... --device cpu` (the installed console script);
  (b×8) the same with 8 `--adapter` of the same base (1.1B only);
  (c) a lean dense fp32 implementation (benchmarks/direct_dense.py), 1.1B only;
  (c2) the published code's structure: transformers and peft model objects, four float32
       copies of the model, every dense C kept (benchmarks/published_style.py), 1.1B only,
       when the memory it needs is available.
Warm rows run after one untimed run of each command; cold rows drop the page cache before each
run (root only; checked to work first). Synthetic data is generated once under bench-data/.
The code measured is the last commit (HEAD, exported to bench-data/code so that edits made
during a long run do not mix in), or the working tree as it is with --worktree.
Results are printed as Markdown; --write-docs also rewrites the matching sections of
docs/benchmarks.md, and every run saves bench-data/results-<shape>.json.
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
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
import bench_measure as bm  # noqa: E402

REPO = HERE.parent
DOC = REPO / "docs" / "benchmarks.md"
PY = sys.executable
BIN = Path(sys.executable).parent
GB = 1e9
DIRECT_THRESHOLD = 0.5  # safelora's default threshold, so (b), (c) and (c2) select the same way
SHAPES = ("1b", "7b-qv", "7b")  # the order of --shape all: the 26 GB of 7b last, as it empties the page cache
# What (c2) holds besides its four float32 model copies and the dense C's (interpreter, libraries).
PUBLISHED_OVERHEAD = int(1.5 * GB)

TARGETS = {
    "c2_over_b_time": 20.0,  # (b) ≥ 20× faster than (c2), the published code's structure
    "c2_over_b_rss": 15.0,  # (b) ≥ 15× less peak RSS than (c2)
    "c_over_b_time": 20.0,  # the same against the lean (c): the stricter comparison
    "c_over_b_rss": 15.0,
    "b_over_a_warm": 3.0,  # (b) within 3× of (a), warm, 1.1B CPU
    "b_over_a_warm_later": 2.0,  # later milestone: ≤ 2× the floor
    "multi_over_one": 1.5,  # 8 adapters in one run ≤ 1.5× the time of 1
    "anon_7b_gb": 1.5,  # peak anonymous RSS of (b) at 7B
    "anon_7b_vs_1b": 0.10,  # ... and within ±10% of the 1.1B value
    "help_s": 0.5,  # `safelora --help`
}

LABELS = {
    "startup": "(0) start-up only: `import torch, safetensors`",
    "a": "(a) I/O floor: read the needed tensors",
    "b": "(b) `safelora patch --device cpu`",
    "b8": "(b×8) `safelora patch --device cpu`, 8 `--adapter`",
    "c": "(c) lean direct: dense fp32 tensors, both full models",
    "c2": "(c2) published structure: transformers + peft, 4 fp32 model copies",
    "b_gpu": "(b) `safelora patch --device cuda`",
}


@dataclass
class Row:
    key: str
    label: str
    cache: str
    summary: bm.Summary | None = None
    note: str = ""


@dataclass
class ShapeResult:
    name: str
    label: str
    date: str
    command: str
    repeat: int
    data: dict[str, object]
    rows: list[Row] = field(default_factory=list)
    cold_note: str = ""
    crosscheck: str = ""  # (b) against (c)
    crosscheck_c2: str = ""  # (b) against (c2)
    code: str = ""  # safelora-cli commit measured
    load: str = ""  # 1-minute load average before and after
    same_run: bool = True  # False when loaded from an earlier run's results file
    info: dict[str, str] = field(default_factory=dict)  # the machine

    def get(self, key: str, cache: str) -> bm.Summary | None:
        for row in self.rows:
            if row.key == key and row.cache == cache:
                return row.summary
        return None

    def where(self) -> str:
        return "this run" if self.same_run else f"run of {self.date}, commit {self.code}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine and data


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


# Where and how every measured process runs: set by `prepare_code`.
RUN_ENV: dict[str, str] | None = None
RUN_CWD: Path | None = None


def run(cmd: list[str]) -> bm.Sample:
    return bm.run(cmd, env=RUN_ENV, cwd=RUN_CWD)


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
        return code_version()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
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


def code_version() -> str:
    """The commit of the measured code, with `+ local changes` when the package differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    dirty = git("status", "--porcelain", "--", "safelora_cli")
    return f"{commit} + local changes" if dirty else commit


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
    start = time.perf_counter()
    subprocess.run([PY, str(HERE / "bench_generate.py"), str(data_dir.resolve()), name], check=True, env=RUN_ENV,
                   cwd=RUN_CWD)
    return root, time.perf_counter() - start


def ensure_multi(data_dir: Path, name: str) -> tuple[list[Path], float | None]:
    """The multi-adapter row's adapters, generated in a child process when missing."""
    setup = bench_data.SETUPS[name]
    root = data_dir / setup.root_name
    if bench_data.multi_ready(root, setup):
        return bench_data.multi_dirs(root), None
    start = time.perf_counter()
    subprocess.run([PY, str(HERE / "bench_generate.py"), str(data_dir.resolve()), name, "--multi"], check=True,
                   env=RUN_ENV, cwd=RUN_CWD)
    return bench_data.multi_dirs(root), time.perf_counter() - start


def published_memory(root: Path, adapter_dir: str) -> tuple[int, int]:
    """(what (c2) needs, what is available) in bytes: four float32 models, every dense C, overhead."""
    need = 4 * bench_data.fp32_model_bytes(root / "base") + bench_data.dense_c_bytes(root, adapter_dir)
    return need + PUBLISHED_OVERHEAD, bench_data.available_memory()


# ---------------------------------------------------------------- running rows


def measure(cmd: list[str], repeat: int, cold: bool = False) -> bm.Summary:
    samples = []
    for _ in range(repeat):
        if cold:
            bm.drop_page_cache()
        samples.append(run(cmd))
    return bm.Summary(samples)


def bench_shape(name: str, args: argparse.Namespace, command: str) -> ShapeResult:
    setup = bench_data.SETUPS[name]
    repeat = args.repeat or setup.repeat
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    root, gen_s = ensure_data(data_dir, name)
    base, aligned, adapter = bench_data.trio_dirs(root, setup.adapter_dir)
    groups = bench_data.needed_tensors(root, setup.adapter_dir)
    manifest = root / f"manifest-{name}.json"
    manifest.write_text(json.dumps(groups))
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    shards = len(list(base.glob("*.safetensors")))
    data: dict[str, object] = {
        "model_bytes": model_bytes, "shards": shards, "needed_bytes": bench_data.needed_bytes(groups),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
        "modules": sum(len(keys) for file, keys in groups if Path(file).parent == base),
        "generated_s": gen_s, "fp32_model_bytes": bench_data.fp32_model_bytes(base),
        "dense_c_bytes": bench_data.dense_c_bytes(root, setup.adapter_dir),
    }
    result = ShapeResult(name, setup.label, datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                         command, repeat, data, code=args.code, info=args.info)
    out_dir = data_dir / "out"
    out_dir.mkdir(exist_ok=True)
    patched, direct_out = out_dir / f"patched-{name}", out_dir / f"direct-{name}"
    published_out, multi_out = out_dir / f"published-{name}", out_dir / f"multi-{name}"
    cmds = {
        "startup": [PY, "-c", "import torch, safetensors.torch"],
        "a": [PY, str(HERE / "io_floor.py"), str(manifest)],
        "b": [str(BIN / "safelora"), "patch", "--base", str(base), "--aligned", str(aligned), "--adapter",
              str(adapter), "--out", str(patched), "--force", "--quiet", "--device", "cpu"],
        "c": [PY, str(HERE / "direct_dense.py"), str(base), str(aligned), str(adapter), str(direct_out),
              str(DIRECT_THRESHOLD)],
        "c2": [PY, str(HERE / "published_style.py"), str(base), str(aligned), str(adapter), str(published_out),
               str(DIRECT_THRESHOLD)],
    }
    keys = ["startup", "a", "b"]
    notes: dict[str, str] = {}
    if name == "1b" and not args.skip_multi:
        adapters, multi_s = ensure_multi(data_dir, name)
        data["multi_generated_s"] = multi_s
        data["multi_count"] = len(adapters)
        cmds["b8"] = [str(BIN / "safelora"), "patch", "--base", str(base), "--aligned", str(aligned),
                      *(x for a in adapters for x in ("--adapter", str(a))), "--out", str(multi_out), "--force",
                      "--quiet", "--device", "cpu"]
        keys.append("b8")
    if setup.direct_fits and not args.skip_direct:
        keys.append("c")
    else:
        notes["c"] = (f"not run: two fp32 models are {2 * data['fp32_model_bytes'] / GB:.0f} GB, more than "  # type: ignore[operator]
                      f"this machine's {args.info['ram']}" if not setup.direct_fits else "skipped (--skip-direct)")
    if args.skip_published:
        notes["c2"] = "skipped (--skip-published)"
    elif not setup.direct_fits:
        notes["c2"] = (f"not run: four fp32 copies of the model and every dense C are "
                       f"{(4 * data['fp32_model_bytes'] + data['dense_c_bytes']) / GB:.0f} GB")  # type: ignore[operator]
    else:
        need, available = published_memory(root, setup.adapter_dir)
        data["published_need_bytes"], data["available_bytes"] = need, available
        if need > available:
            notes["c2"] = (f"not run: needs about {need / GB:.0f} GB, only {available / GB:.0f} GB available now")
        else:
            keys.append("c2")
    load_before = load_average()

    def published_fits() -> bool:
        need, available = published_memory(root, setup.adapter_dir)
        if need <= available:
            return True
        log(f"[{name}] (c2) skipped this time: needs ~{need / GB:.0f} GB, {available / GB:.0f} GB available")
        data["published_skipped"] = int(data.get("published_skipped", 0)) + 1  # type: ignore[call-overload]
        return False

    def rewarm() -> None:
        if name == "1b":  # the whole trio fits in the page cache: keep it there
            bm.read_files(bench_data.trio_files(root, setup.adapter_dir))

    log(f"[{name}] warming up: one untimed run of each command ({', '.join(keys)})")
    rewarm()
    for key in keys:
        if key == "c2" and not published_fits():
            continue
        run(cmds[key])
        if key == "c2":
            rewarm()  # (c2) holds ~20 GB: the kernel may have evicted part of the data from the page cache
    samples: dict[str, list[bm.Sample]] = {k: [] for k in keys}
    for i in range(repeat):
        log(f"[{name}] warm repetition {i + 1}/{repeat}")
        for key in keys:  # interleaved, so slow drifts of the machine hit every row alike
            if key == "c2" and not published_fits():  # other work took the memory meanwhile
                continue
            samples[key].append(run(cmds[key]))
            if key == "c2":
                rewarm()
    if "c2" in samples and not samples["c2"]:
        notes["c2"] = "not run: the memory it needs was never available"
        del samples["c2"]
        keys.remove("c2")
    for key in ("startup", "a", "b", "b8", "c", "c2"):
        if key in samples:
            result.rows.append(Row(key, LABELS[key], "warm", bm.Summary(samples[key])))
        elif key in notes:
            result.rows.append(Row(key, LABELS[key], "warm", None, notes[key]))

    if args.cold:
        works, evidence = bm.check_drop_caches([p for p in base.glob("*.safetensors")][:2])
        result.cold_note = evidence
        if works:
            cold: dict[str, list[bm.Sample]] = {k: [] for k in ("startup", "a", "b")}
            for i in range(repeat):
                log(f"[{name}] cold repetition {i + 1}/{repeat}")
                for key in cold:
                    bm.drop_page_cache()
                    cold[key].append(run(cmds[key]))
            for key, s in cold.items():
                result.rows.append(Row(key, LABELS[key], "cold", bm.Summary(s)))
        else:
            for key in ("a", "b"):
                result.rows.append(Row(key, LABELS[key], "cold", None, "not measured: " + evidence))
    else:
        result.cold_note = "skipped (--no-cold)"

    if args.cuda:
        gpu_cmd = [*cmds["b"][:-1], "cuda"]
        run(gpu_cmd)
        result.rows.append(Row("b_gpu", LABELS["b_gpu"], "warm", measure(gpu_cmd, repeat)))
    else:
        result.rows.append(Row("b_gpu", LABELS["b_gpu"], "warm", None, "not measured (no GPU in this run)"))

    result.load = f"{load_before:.1f} before, {load_average():.1f} after"
    if "c" in keys:
        result.crosscheck = crosscheck(patched, direct_out, base, aligned, adapter, "(c)")
    if "c2" in keys:
        result.crosscheck_c2 = crosscheck(patched, published_out, base, aligned, adapter, "(c2)")
    return result


def crosscheck(patched: Path, reference: Path, base: Path, aligned: Path, adapter: Path, name: str) -> str:
    """Compare (b)'s report and adapter with a reference row's cosines and adapter, as a sentence."""
    out = subprocess.run([PY, str(HERE / "crosscheck.py"), str(patched), str(reference), str(base), str(aligned),
                          str(adapter), str(DIRECT_THRESHOLD)], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    same = "the same" if r["same_selection"] and r["keys_equal"] and r["same_modules"] else "DIFFERENT"
    text = (f"(b) and {name} select {same} layers ({r['sel_b']} and {r['sel_ref']} of {r['layers']}); their "
            f"cosines differ by at most {r['max_cos_diff']:.1e}")
    if r["worst_f64"] is not None:
        text += (f" (in {r['worst_module']}: (b) {r['worst_b']:.6f}, {name} {r['worst_ref']:.5f}, float64 "
                 f"recomputation {r['worst_f64']:.6f}; {name} rounds to 5 decimals, as the published code does, "
                 f"and forms C·ΔW densely in fp32)")
    return text + (f"; the patched lora_B tensors differ by at most {r['max_rel_b']:.1e} (relative Frobenius "
                   f"norm).")


def help_time(repeat: int) -> tuple[bm.Summary, bm.Summary]:
    cmd = [str(BIN / "safelora"), "--help"]
    run(cmd)
    helps = measure(cmd, repeat)
    version = measure([str(BIN / "safelora"), "--version"], repeat)
    return helps, version


# ---------------------------------------------------------------- formatting


def fmt_s(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def fmt_gb(x: float) -> str:
    return f"{x / GB:.2f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def rows_table(res: ShapeResult) -> list[str]:
    lines = ["| row | page cache | wall, median (s) | wall, min–max (s) | peak RSS, median (max) (GB) | "
             "peak anon RSS, median (max) (GB) |",
             "|---|---|---:|---:|---:|---:|"]
    for row in res.rows:
        s = row.summary
        if s is None:
            lines.append(f"| {row.label} | {row.cache} | {row.note} | | | |")
            continue
        lo, hi = s.wall_range
        lines.append(f"| {row.label} | {row.cache} | {fmt_s(s.wall_s)} | {fmt_s(lo)}–{fmt_s(hi)} | "
                     f"{fmt_gb(s.peak_rss)} ({fmt_gb(s.peak_rss_max)}) | "
                     f"{fmt_gb(s.peak_anon)} ({fmt_gb(s.peak_anon_max)}) |")
    return lines


def _versus(lines: list[str], name: str, what: str, ref: bm.Summary | None, b: bm.Summary | None,
            time_key: str, rss_key: str) -> None:
    if ref is None or b is None:
        return
    t, m = ref.wall_s / b.wall_s, ref.peak_rss / b.peak_rss
    lines.append(f"| {name}/(b) wall time, warm ({what}) | {t:.1f}× | ≥ {TARGETS[time_key]:.0f}× | "
                 f"{verdict(t >= TARGETS[time_key])} |")
    lines.append(f"| {name}/(b) peak RSS, warm ({what}) | {m:.1f}× | ≥ {TARGETS[rss_key]:.0f}× | "
                 f"{verdict(m >= TARGETS[rss_key])} |")


def ratio_lines(res: ShapeResult) -> list[str]:
    lines = ["| ratio (same run) | measured | target | met |", "|---|---:|---|---|"]
    a, b = res.get("a", "warm"), res.get("b", "warm")
    if res.name == "1b":
        _versus(lines, "(c2)", "published structure: the target comparison", res.get("c2", "warm"), b,
                "c2_over_b_time", "c2_over_b_rss")
        _versus(lines, "(c)", "lean direct: the stricter comparison", res.get("c", "warm"), b, "c_over_b_time",
                "c_over_b_rss")
    if a is not None and b is not None:
        r = b.wall_s / a.wall_s
        if res.name == "1b":
            lines.append(f"| (b)/(a) wall time, warm | {r:.2f}× | ≤ {TARGETS['b_over_a_warm']:.0f}× | "
                         f"{verdict(r <= TARGETS['b_over_a_warm'])} |")
            lines.append(f"| (b)/(a) wall time, warm (later milestone) | {r:.2f}× | "
                         f"≤ {TARGETS['b_over_a_warm_later']:.0f}× | {verdict(r <= TARGETS['b_over_a_warm_later'])} |")
        else:
            lines.append(f"| (b)/(a) wall time, warm | {r:.2f}× | — (targets are for 1.1B) | — |")
    ac, bc = res.get("a", "cold"), res.get("b", "cold")
    if ac is not None and bc is not None:
        lines.append(f"| (b)/(a) wall time, cold | {bc.wall_s / ac.wall_s:.2f}× | — | — |")
    b8 = res.get("b8", "warm")
    if b8 is not None and b is not None:
        r = b8.wall_s / b.wall_s
        count = res.data.get("multi_count", 8)
        lines.append(f"| (b×{count})/(b) wall time, warm: {count} adapters in one run vs 1 | {r:.2f}× | "
                     f"≤ {TARGETS['multi_over_one']}× | {verdict(r <= TARGETS['multi_over_one'])} |")
    return lines


def shape_section(res: ShapeResult) -> str:
    d, info = res.data, res.info
    generated = []
    if d.get("generated_s"):
        generated.append(f"data generated in {d['generated_s']:.0f} s")
    if d.get("multi_generated_s"):
        generated.append(f"the {d.get('multi_count', 8)} extra adapters in {d['multi_generated_s']:.0f} s")
    gen = f" ({' and '.join(generated)} by this run)" if generated else ""
    layout = "one file" if d["shards"] == 1 else f"{d['shards']} shards"
    lines = [
        f"### {res.label}",
        "",
        f"Measured {res.date} with `{res.command}`, medians of {res.repeat} runs per row; safelora-cli at "
        f"commit {res.code}; 1-minute load average {res.load} (other work shares the machine).",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, torch {info['torch']}, safetensors {info['safetensors']}"
        + (f", transformers {info['transformers']}, peft {info['peft']}." if info.get("transformers") else "."),
        f"Data{gen}: base and aligned models {d['model_bytes'] / GB:.1f} GB each in bf16 ({layout}); "
        f"a patch needs {d['needed_bytes'] / GB:.2f} GB of it ({d['modules']} weights per model plus the "
        f"{d['adapter_bytes'] / 1e6:.0f} MB adapter).",
        "",
        *rows_table(res),
        "",
        *ratio_lines(res),
        "",
    ]
    notes = []
    ram_gb = float(info.get("ram", "0").split()[0]) * 2**30
    if int(d["needed_bytes"]) > 0.8 * ram_gb:  # type: ignore[call-overload]
        notes.append(f"The needed tensors ({int(d['needed_bytes']) / GB:.0f} GB) do not all fit in this machine's "  # type: ignore[call-overload]
                     f"page cache ({info.get('ram', '?')} of RAM), so warm rows still read part of their data "
                     "from disk.")
    if res.get("b8", "warm") is not None:
        notes.append(f"(b×{d.get('multi_count', 8)}) patches {d.get('multi_count', 8)} different adapters of the "
                     "same base (same targets and rank as (b)'s, other seeds) in one run, one output folder "
                     "each; it is compared with (b) from the same interleaved repetitions.")
    if res.get("c2", "warm") is not None:
        need = d.get("published_need_bytes")
        notes.append(f"(c2) uses transformers {info.get('transformers', '?')} and peft {info.get('peft', '?')}."
                     + (f" It was run after checking that the ~{int(need) / GB:.0f} GB it needs were available "  # type: ignore[call-overload]
                        "before each run (the harness skips a run otherwise"
                        + (f"; {d['published_skipped']} runs were skipped" if d.get("published_skipped") else "")
                        + ")." if need else ""))
    varied = []
    for cache in ("warm", "cold"):
        b = res.get("b", cache)
        if b is not None and b.peak_anon_max > 1.5 * b.peak_anon:
            anons = ", ".join(fmt_gb(x) for x in sorted(x.peak_anon for x in b.samples))
            varied.append(f"{cache}: {anons} GB")
    if varied:
        notes.append(f"The peak anonymous RSS of (b) varies from run to run ({'; '.join(varied)}).")
    if res.get("a", "cold") is not None:
        notes.append(f"Cold rows: {res.cold_note}. The page cache is dropped before every cold run, so cold "
                     "rows also load Python and torch from disk; the disk is virtual and the host may still "
                     "cache it.")
    elif res.cold_note:
        notes.append(f"Cold rows: {res.cold_note}.")
    if res.crosscheck_c2:
        notes.append(f"Cross-check with (c2): {res.crosscheck_c2}")
    if res.crosscheck:
        notes.append(f"Cross-check with (c): {res.crosscheck}")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def _worst_anon(r: ShapeResult) -> tuple[int, int]:
    """(largest peak anonymous RSS of (b), number of runs), warm and cold together."""
    summaries = [s for s in (r.get("b", "warm"), r.get("b", "cold")) if s is not None]
    return max(s.peak_anon_max for s in summaries), sum(len(s.samples) for s in summaries)


def _warm_wall(r: ShapeResult, key: str) -> str:
    s = r.get(key, "warm")
    return fmt_s(s.wall_s) if s is not None else "—"


def flat_section(results: dict[str, ShapeResult]) -> str | None:
    """Peak anonymous RSS of (b) at 1.1B and 7B, same LoRA config and all-linear, with the targets."""
    one, qv, full = (results.get(n) for n in ("1b", "7b-qv", "7b"))
    if one is None:
        return None
    one_b = one.get("b", "warm")
    if one_b is None:
        return None
    titles = {"1b": "1.1B, q/v, r = 8", "7b-qv": "7B, q/v, r = 8", "7b": "7B, all linear, r = 16"}
    cols: list[tuple[ShapeResult, bm.Summary]] = []
    for r in (one, qv, full):
        b = r.get("b", "warm") if r is not None else None
        if r is not None and b is not None:
            cols.append((r, b))
    table = {
        "weights read (GB)": [f"{int(r.data['needed_bytes']) / GB:.2f}" for r, _ in cols],  # type: ignore[call-overload]
        "adapter (MB)": [f"{int(r.data['adapter_bytes']) / 1e6:.0f}" for r, _ in cols],  # type: ignore[call-overload]
        "(a) wall, warm, median (s)": [_warm_wall(r, "a") for r, _ in cols],
        "(b) wall, warm, median (s)": [_warm_wall(r, "b") for r, _ in cols],
        "**(b) peak anon RSS, warm, median (GB)**": [f"**{fmt_gb(b.peak_anon)}**" for _, b in cols],
        "(b) peak anon RSS, warm, max (GB)": [fmt_gb(b.peak_anon_max) for _, b in cols],
        "(b) peak anon RSS, worst run, warm and cold (GB)":
            [f"{fmt_gb(_worst_anon(r)[0])} (of {_worst_anon(r)[1]})" for r, _ in cols],
        "(b) peak RSS, warm, median (GB)": [fmt_gb(b.peak_rss) for _, b in cols],
        "measured": [f"{r.date}, commit {r.code}" for r, _ in cols],
    }
    lines = [
        "### Flatness: peak memory at 1.1B and 7B",
        "",
        "| | " + " | ".join(titles[r.name] for r, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
        *(f"| {label} | " + " | ".join(values) + " |" for label, values in table.items()),
        "",
        "Target: (b)'s peak anonymous RSS at 7B ≤ 1.5 GB and within ±10% of the 1.1B value "
        f"({fmt_gb(one_b.peak_anon)} GB, warm median).",
        "",
        "| 7B adapter | peak anon RSS (GB) | vs 1.1B | ≤ 1.5 GB | within ±10% | met |",
        "|---|---:|---:|---|---|---|",
    ]
    pairs = [(qv, "same LoRA config (q/v, r = 8)"), (full, "all linear, r = 16")]
    for use_worst in (False, True):
        for r, title in pairs:
            b = r.get("b", "warm") if r is not None else None
            if r is None or b is None:
                if not use_worst:
                    lines.append(f"| {title} | not measured | | | | |")
                continue
            value, runs = _worst_anon(r) if use_worst else (int(b.peak_anon), 0)
            rel = value / one_b.peak_anon - 1
            small, close = value <= TARGETS["anon_7b_gb"] * GB, abs(rel) <= TARGETS["anon_7b_vs_1b"]
            label = f"{title}, worst of {runs} runs" if use_worst else f"{title}, warm median"
            lines.append(f"| {label} | {fmt_gb(value)} | {rel:+.0%} | {verdict(small)} | {verdict(close)} | "
                         f"{verdict(small and close)} |")
    lines.append("")
    return "\n".join(lines)


def startup_section(helps: bm.Summary, version: bm.Summary, date: str, command: str) -> str:
    ok = helps.wall_s <= TARGETS["help_s"]
    repeat = len(helps.samples)
    return "\n".join([
        "### Start-up",
        "",
        f"Measured {date} with `{command}`, medians of {repeat} runs (whole process).",
        "",
        "| command | wall, median (s) | wall, min–max (s) | peak RSS (GB) | target | met |",
        "|---|---:|---:|---:|---|---|",
        f"| `safelora --help` | {helps.wall_s:.3f} | {helps.wall_range[0]:.3f}–{helps.wall_range[1]:.3f} | "
        f"{fmt_gb(helps.peak_rss)} | ≤ {TARGETS['help_s']} s | {verdict(ok)} |",
        f"| `safelora --version` | {version.wall_s:.3f} | {version.wall_range[0]:.3f}–{version.wall_range[1]:.3f} | "
        f"{fmt_gb(version.peak_rss)} | — | — |",
        "",
    ])


def gpu_section() -> str:
    return "\n".join([
        "### GPU",
        "",
        "| row | result |",
        "|---|---|",
        "| (b) `safelora patch --device cuda`, 1.1B and 7B | not measured (no GPU in this run) |",
        "| CPU/GPU agreement (cosines, selection, patched B) | not measured (no GPU in this run) |",
        "",
        "`python benchmarks/gpu_check.py --out DIR` measures both on a machine with an NVIDIA GPU "
        "(see [GPU check](#gpu-check)).",
        "",
    ])


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


# ---------------------------------------------------------------- results files


def save_result(data_dir: Path, res: ShapeResult) -> None:
    payload = {
        "name": res.name, "label": res.label, "date": res.date, "command": res.command, "repeat": res.repeat,
        "data": res.data, "cold_note": res.cold_note, "crosscheck": res.crosscheck,
        "crosscheck_c2": res.crosscheck_c2, "code": res.code,
        "load": res.load, "info": res.info,
        "rows": [{"key": r.key, "label": r.label, "cache": r.cache, "note": r.note,
                  "samples": [s.__dict__ for s in r.summary.samples] if r.summary else None} for r in res.rows],
    }
    (data_dir / f"results-{res.name}.json").write_text(json.dumps(payload, indent=1))


def save_startup(data_dir: Path, helps: bm.Summary, version: bm.Summary, date: str, command: str) -> None:
    payload = {"date": date, "command": command, "help": [s.__dict__ for s in helps.samples],
               "version": [s.__dict__ for s in version.samples]}
    (data_dir / "results-startup.json").write_text(json.dumps(payload, indent=1))


def load_startup(data_dir: Path) -> tuple[bm.Summary, bm.Summary, str, str] | None:
    path = data_dir / "results-startup.json"
    if not path.is_file():
        return None
    p = json.loads(path.read_text())
    summaries = [bm.Summary([bm.Sample(**s) for s in p[k]]) for k in ("help", "version")]
    return summaries[0], summaries[1], p["date"], p["command"]


def load_result(data_dir: Path, name: str) -> ShapeResult | None:
    path = data_dir / f"results-{name}.json"
    if not path.is_file():
        return None
    p = json.loads(path.read_text())
    res = ShapeResult(p["name"], p["label"], p["date"], p["command"], p["repeat"], p["data"],
                      cold_note=p["cold_note"], crosscheck=p["crosscheck"],
                      crosscheck_c2=p.get("crosscheck_c2", ""), code=p.get("code", ""),
                      load=p.get("load", ""), same_run=False, info=p.get("info") or machine())
    for r in p["rows"]:
        summary = bm.Summary([bm.Sample(**s) for s in r["samples"]]) if r["samples"] else None
        res.rows.append(Row(r["key"], r["label"], r["cache"], summary, r["note"]))
    return res


# ---------------------------------------------------------------- main


SECTIONS = ("1b", "7b-qv", "7b", "flat", "startup", "gpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", choices=(*SHAPES, "all"), default="1b")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per row (medians are reported); default 5 for 1b, 3 for the 7B shapes")
    parser.add_argument("--help-repeat", type=int, default=10, help="runs of `safelora --help`")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-cache rows")
    parser.add_argument("--skip-direct", action="store_true", help="skip row (c)")
    parser.add_argument("--skip-published", action="store_true", help="skip row (c2) (~20 GB, ~30 s a run)")
    parser.add_argument("--skip-multi", action="store_true", help="skip row (b×8)")
    parser.add_argument("--data-dir", default=str(REPO / "bench-data"))
    parser.add_argument("--worktree", action="store_true",
                        help="measure the working tree as it is (default: the committed code, HEAD)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: print (and with --write-docs, write) the saved results again")
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the sections of {DOC.name}")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be ≥ 1")
    argv_shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_patch.py", *argv_shown])
    if not argv_shown:
        command = "make bench"
    started = time.perf_counter()
    info = machine()
    args.info = info
    args.cuda = info["cuda"] == "True"
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    results: dict[str, ShapeResult] = {}
    if args.render:
        for name in names:
            loaded = load_result(data_dir, name)
            if loaded is None:
                raise SystemExit(f"no saved results for {name} in {data_dir}")
            loaded.same_run = True  # rendered as they were measured
            results[name] = loaded
        startup = load_startup(data_dir)
    else:
        args.code = prepare_code(data_dir, args.worktree)
        log(f"measuring safelora-cli {args.code}")
        for name in names:
            results[name] = bench_shape(name, args, command)
            save_result(data_dir, results[name])
        log("timing `safelora --help`")
        helps, version = help_time(args.help_repeat)
        date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        save_startup(data_dir, helps, version, date, command)
        startup = helps, version, date, command

    sections = {name: shape_section(res) for name, res in results.items()}
    everything = dict(results)
    for name in SHAPES:  # the flatness table also uses the other shapes' latest saved results
        if name not in everything and (loaded := load_result(data_dir, name)) is not None:
            everything[name] = loaded
    flat = flat_section(everything)
    if flat is not None:
        sections["flat"] = flat
    if startup is not None:
        sections["startup"] = startup_section(*startup)
    if not args.cuda:
        sections["gpu"] = gpu_section()
    print("\n".join(sections[k] for k in SECTIONS if k in sections))
    log(f"total {time.perf_counter() - started:.0f} s")
    if args.write_docs:
        text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
        for name in SECTIONS:
            if name in sections:
                text = replace_section(text, name, sections[name])
        DOC.write_text(text)
        log(f"rewrote sections {', '.join(k for k in SECTIONS if k in sections)} of {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
