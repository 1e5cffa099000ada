"""Benchmark `safelora patch` against the I/O floor and a direct dense implementation.

    python benchmarks/bench_patch.py                      # 1.1B shape (default), 5 runs per row
    python benchmarks/bench_patch.py --shape 7b           # 7B shape, all 7 linear modules, r=16
    python benchmarks/bench_patch.py --shape all --write-docs

Every row is a fresh process (imports included), repeated `--repeat` times; the table shows
medians. Rows:
  (0) start-up only: `python -c "import torch, safetensors.torch"`;
  (a) the I/O floor: read exactly the tensors a patch needs (benchmarks/io_floor.py);
  (b) `safelora patch ... --device cpu` (the installed console script);
  (c) the direct dense fp32 implementation (benchmarks/direct_dense.py), 1.1B only.
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
DIRECT_THRESHOLD = 0.5  # safelora's default threshold, so (b) and (c) select the same way

TARGETS = {
    "c_over_b_time": 20.0,  # (b) ≥ 20× faster than (c)
    "c_over_b_rss": 15.0,  # (b) ≥ 15× less peak RSS than (c)
    "b_over_a_warm": 3.0,  # (b) within 3× of (a), warm, 1.1B CPU
    "b_over_a_warm_later": 2.0,  # later milestone: ≤ 2× the floor
    "anon_7b_gb": 1.5,  # peak anonymous RSS of (b) at 7B
    "anon_7b_vs_1b": 0.10,  # ... and within ±10% of the 1.1B value
    "help_s": 0.5,  # `safelora --help`
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
    crosscheck: str = ""
    code: str = ""  # safelora-cli commit measured
    load: str = ""  # 1-minute load average before and after
    same_run: bool = True  # False when loaded from an earlier run's results file
    info: dict[str, str] = field(default_factory=dict)  # the machine


    def get(self, key: str, cache: str) -> bm.Summary | None:
        for row in self.rows:
            if row.key == key and row.cache == cache:
                return row.summary
        return None


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
    with open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    versions = subprocess.run(
        [PY, "-c", "import torch, safetensors; print(torch.__version__, safetensors.__version__, "
         "torch.cuda.is_available())"], capture_output=True, text=True, check=True).stdout.split()
    return {"nproc": str(os.cpu_count()), "ram": f"{mem_kb / 2**20:.1f} GiB", "cpu": cpu,
            "python": platform.python_version(), "kernel": platform.release(), "torch": versions[0],
            "safetensors": versions[1], "cuda": versions[2]}


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
    root = data_dir / name
    if bench_data.is_ready(root, setup):
        return root, None
    free = shutil.disk_usage(data_dir).free
    need = 2 * setup.model_gb * 1.1 * GB
    if free < need:
        raise SystemExit(f"not enough disk for the {name} data: {need / GB:.0f} GB needed, {free / GB:.0f} GB free")
    start = time.perf_counter()
    subprocess.run([PY, str(HERE / "bench_generate.py"), str(data_dir.resolve()), name], check=True, env=RUN_ENV,
                   cwd=RUN_CWD)
    return root, time.perf_counter() - start


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
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    root, gen_s = ensure_data(data_dir, name)
    base, aligned, adapter = bench_data.trio_dirs(root)
    groups = bench_data.needed_tensors(root)
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps(groups))
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    shards = len(list(base.glob("*.safetensors")))
    data = {
        "model_bytes": model_bytes, "shards": shards, "needed_bytes": bench_data.needed_bytes(groups),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
        "modules": sum(len(keys) for file, keys in groups if Path(file).parent == base),
        "generated_s": gen_s,
    }
    result = ShapeResult(name, setup.label, datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                         command, args.repeat, data, code=args.code, info=args.info)
    load_before = load_average()
    out_dir = data_dir / "out"
    out_dir.mkdir(exist_ok=True)
    patched, direct_out = out_dir / f"patched-{name}", out_dir / f"direct-{name}"
    cmds = {
        "startup": [PY, "-c", "import torch, safetensors.torch"],
        "a": [PY, str(HERE / "io_floor.py"), str(manifest)],
        "b": [str(BIN / "safelora"), "patch", "--base", str(base), "--aligned", str(aligned), "--adapter",
              str(adapter), "--out", str(patched), "--force", "--quiet", "--device", "cpu"],
        "c": [PY, str(HERE / "direct_dense.py"), str(base), str(aligned), str(adapter), str(direct_out),
              str(DIRECT_THRESHOLD)],
    }
    labels = {
        "startup": "(0) start-up only: `import torch, safetensors`",
        "a": "(a) I/O floor: read the needed tensors",
        "b": "(b) `safelora patch --device cpu`",
        "c": "(c) direct: dense fp32, both full models",
        "b_gpu": "(b) `safelora patch --device cuda`",
    }
    run_direct = setup.direct_fits and not args.skip_direct
    warm_keys = ["startup", "a", "b"] + (["c"] if run_direct else [])

    log(f"[{name}] warming up: one untimed run of each command")
    if name == "1b":
        bm.read_files(bench_data.trio_files(root))  # the whole trio fits in the page cache
    for key in warm_keys:
        run(cmds[key])
    samples: dict[str, list[bm.Sample]] = {k: [] for k in warm_keys}
    for i in range(args.repeat):
        log(f"[{name}] warm repetition {i + 1}/{args.repeat}")
        for key in warm_keys:  # interleaved, so slow drifts of the machine hit every row alike
            samples[key].append(run(cmds[key]))
    for key in warm_keys:
        result.rows.append(Row(key, labels[key], "warm", bm.Summary(samples[key])))
    if not run_direct:
        note = ("does not fit in 24 GiB (two fp32 7B models are ~54 GB)" if not setup.direct_fits
                else "skipped (--skip-direct)")
        result.rows.append(Row("c", labels["c"], "warm", None, note))

    if args.cold:
        works, evidence = bm.check_drop_caches([p for p in base.glob("*.safetensors")][:2])
        result.cold_note = evidence
        if works:
            cold = {k: [] for k in ("startup", "a", "b")}
            for i in range(args.repeat):
                log(f"[{name}] cold repetition {i + 1}/{args.repeat}")
                for key in cold:
                    bm.drop_page_cache()
                    cold[key].append(run(cmds[key]))
            for key, s in cold.items():
                result.rows.append(Row(key, labels[key], "cold", bm.Summary(s)))
        else:
            for key in ("a", "b"):
                result.rows.append(Row(key, labels[key], "cold", None, "not measured: " + evidence))
    else:
        result.cold_note = "skipped (--no-cold)"

    if args.cuda:
        gpu_cmd = [*cmds["b"][:-1], "cuda"]
        run(gpu_cmd)
        result.rows.append(Row("b_gpu", labels["b_gpu"], "warm", measure(gpu_cmd, args.repeat)))
    else:
        result.rows.append(Row("b_gpu", labels["b_gpu"], "warm", None, "not measured (no GPU)"))

    result.load = f"{load_before:.1f} before, {load_average():.1f} after"
    if run_direct:
        result.crosscheck = crosscheck(patched, direct_out)
    return result


def crosscheck(patched: Path, direct_out: Path) -> str:
    """Compare (b)'s report and adapter with (c)'s cosines and adapter."""
    code = r"""
import json, sys, torch
from safetensors.torch import load_file
patched, direct, thr = sys.argv[1], sys.argv[2], float(sys.argv[3])
report = json.load(open(f"{patched}/safelora_report.json"))
cos_c = json.load(open(f"{direct}/cosines.json"))
diffs = [abs(l["cosine"] - cos_c[l["module"]]) for l in report["layers"]]
sel_b = {l["module"] for l in report["layers"] if l["selected"]}
sel_c = {m for m, c in cos_c.items() if c <= thr}
ab, ac = load_file(f"{patched}/adapter_model.safetensors"), load_file(f"{direct}/adapter_model.safetensors")
rel = max(float((ab[k].double() - ac[k].double()).norm() / ac[k].double().norm().clamp_min(1e-30)) for k in ac)
print(json.dumps({"layers": len(diffs), "max_cos_diff": max(diffs), "sel_b": len(sel_b), "sel_c": len(sel_c),
                  "same_selection": sel_b == sel_c, "keys_equal": ab.keys() == ac.keys(), "max_rel_b": rel}))
"""
    out = subprocess.run([PY, "-c", code, str(patched), str(direct_out), str(DIRECT_THRESHOLD)],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    same = "the same" if r["same_selection"] and r["keys_equal"] else "DIFFERENT"
    return (f"(b) and (c) select {same} layers ({r['sel_b']} and {r['sel_c']} of {r['layers']}); their "
            f"cosines differ by at most {r['max_cos_diff']:.1e} ((c) rounds to 5 decimals, as the published "
            f"code does, and accumulates ΔW and C·ΔW in fp32); the patched lora_B tensors differ by at most "
            f"{r['max_rel_b']:.1e} (relative Frobenius norm).")


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


def ratio_lines(res: ShapeResult, one_b: ShapeResult | None) -> list[str]:
    lines = ["| ratio (same run) | measured | target | met |", "|---|---:|---|---|"]
    a, b, c = res.get("a", "warm"), res.get("b", "warm"), res.get("c", "warm")
    if b is not None and c is not None:
        t, m = c.wall_s / b.wall_s, c.peak_rss / b.peak_rss
        lines.append(f"| (c)/(b) wall time, warm | {t:.1f}× | ≥ {TARGETS['c_over_b_time']:.0f}× | "
                     f"{verdict(t >= TARGETS['c_over_b_time'])} |")
        lines.append(f"| (c)/(b) peak RSS, warm | {m:.1f}× | ≥ {TARGETS['c_over_b_rss']:.0f}× | "
                     f"{verdict(m >= TARGETS['c_over_b_rss'])} |")
    elif res.name != "1b":
        lines.append("| (c)/(b) wall time and peak RSS | (c) not run: does not fit in 24 GiB | — | — |")
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
    if res.name == "7b" and b is not None:
        anon = b.peak_anon
        lines.append(f"| (b) peak anon RSS, warm, median | {fmt_gb(anon)} GB | ≤ {TARGETS['anon_7b_gb']} GB | "
                     f"{verdict(anon <= TARGETS['anon_7b_gb'] * GB)} |")
        worst = max(s.peak_anon_max for s in (b, res.get("b", "cold")) if s is not None)
        runs = sum(len(s.samples) for s in (b, res.get("b", "cold")) if s is not None)
        lines.append(f"| (b) peak anon RSS, worst of {runs} runs (warm and cold) | {fmt_gb(worst)} GB | "
                     f"≤ {TARGETS['anon_7b_gb']} GB | {verdict(worst <= TARGETS['anon_7b_gb'] * GB)} |")
        b1 = one_b.get("b", "warm") if one_b is not None else None
        if b1 is not None:
            rel = anon / b1.peak_anon - 1
            where = "this run" if one_b.same_run else f"run of {one_b.date}, commit {one_b.code}"
            lines.append(f"| (b) peak anon RSS, 7B vs 1.1B ({fmt_gb(b1.peak_anon)} GB, {where}) | {rel:+.0%} | "
                         f"within ±{TARGETS['anon_7b_vs_1b']:.0%} | {verdict(abs(rel) <= TARGETS['anon_7b_vs_1b'])} |")
    return lines


def shape_section(res: ShapeResult, one_b: ShapeResult | None) -> str:
    d, info = res.data, res.info
    gen = (f" (generated in {d['generated_s']:.0f} s by this run)" if d.get("generated_s") else "")
    layout = "one file" if d["shards"] == 1 else f"{d['shards']} shards"
    lines = [
        f"### {res.label}",
        "",
        f"Measured {res.date} with `{res.command}`, medians of {res.repeat} runs per row; safelora-cli at "
        f"commit {res.code}; 1-minute load average {res.load} (other work shares the machine).",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, torch {info['torch']}, safetensors {info['safetensors']}.",
        f"Data{gen}: base and aligned models {d['model_bytes'] / GB:.1f} GB each in bf16 ({layout}); "
        f"a patch needs {d['needed_bytes'] / GB:.2f} GB of it ({d['modules']} weights per model plus the "
        f"{d['adapter_bytes'] / 1e6:.0f} MB adapter).",
        "",
        *rows_table(res),
        "",
        *ratio_lines(res, one_b),
        "",
    ]
    notes = []
    if res.name == "7b":
        notes.append(f"The needed tensors ({d['needed_bytes'] / GB:.0f} GB) do not all fit in this machine's page "
                     f"cache ({res.info.get('ram', '?')} of RAM), so warm 7B rows still read part of their data "
                     "from disk.")
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
    if res.crosscheck:
        notes.append(f"Cross-check: {res.crosscheck}")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


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
        "| (b) `safelora patch --device cuda`, 1.1B and 7B | not measured (no GPU) |",
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
        "data": res.data, "cold_note": res.cold_note, "crosscheck": res.crosscheck, "code": res.code,
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
                      cold_note=p["cold_note"], crosscheck=p["crosscheck"], code=p.get("code", ""),
                      load=p.get("load", ""), same_run=False, info=p.get("info") or machine())
    for r in p["rows"]:
        summary = bm.Summary([bm.Sample(**s) for s in r["samples"]]) if r["samples"] else None
        res.rows.append(Row(r["key"], r["label"], r["cache"], summary, r["note"]))
    return res


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", choices=("1b", "7b", "all"), default="1b")
    parser.add_argument("--repeat", type=int, default=5, help="runs per row (medians are reported)")
    parser.add_argument("--help-repeat", type=int, default=10, help="runs of `safelora --help`")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-cache rows")
    parser.add_argument("--skip-direct", action="store_true", help="skip row (c)")
    parser.add_argument("--data-dir", default=str(REPO / "bench-data"))
    parser.add_argument("--worktree", action="store_true",
                        help="measure the working tree as it is (default: the committed code, HEAD)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: print (and with --write-docs, write) the saved results again")
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the sections of {DOC.name}")
    args = parser.parse_args(argv)
    if args.repeat < 1:
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
    names = ["1b", "7b"] if args.shape == "all" else [args.shape]
    results: dict[str, ShapeResult] = {}
    if args.render:
        for name in names:
            loaded = load_result(data_dir, name)
            if loaded is None:
                raise SystemExit(f"no saved results for {name} in {data_dir}")
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

    one_b = results.get("1b") or load_result(data_dir, "1b")
    sections = {name: shape_section(res, one_b) for name, res in results.items()}
    if startup is not None:
        sections["startup"] = startup_section(*startup)
    if not args.cuda:
        sections["gpu"] = gpu_section()
    print("\n".join(sections.values()))
    log(f"total {time.perf_counter() - started:.0f} s")
    if args.write_docs:
        text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
        for name in ("1b", "7b", "startup", "gpu"):
            if name in sections:
                text = replace_section(text, name, sections[name])
        DOC.write_text(text)
        log(f"rewrote sections {', '.join(sections)} of {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
