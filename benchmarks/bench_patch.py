"""Benchmark `safelora patch` against the I/O floor and two dense implementations: the measuring side.

    python benchmarks/bench_patch.py                      # 1.1B shape (default), 5 runs per row
    python benchmarks/bench_patch.py --shape 7b           # 7B shape, all 7 linear modules, r=16 (3 runs)
    python benchmarks/bench_patch.py --shape 7b-qv        # 7B shape, q_proj/v_proj, r=8 (3 runs)
    python benchmarks/bench_patch.py --shape w70 w405     # one layer of 70B / 405B geometry, all linear, r=16
    python benchmarks/bench_patch.py --shape all --write-docs

Every row is a fresh process (imports included), repeated `--repeat` times (default: 5 for
1.1B, 3 for the others); the tables show medians. Rows:
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
Every run saves bench-data/results-<shape>.json (every sample); bench_render.py turns saved
results into the Markdown tables, printed here and, with --write-docs, written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
import bench_env as env  # noqa: E402
import bench_measure as bm  # noqa: E402
import bench_render  # noqa: E402
from bench_results import GB, LABELS, Row, ShapeResult, Startup, save_result, save_startup  # noqa: E402

DIRECT_THRESHOLD = 0.5  # safelora's default threshold, so (b), (c) and (c2) select the same way
# The order of --shape all: the 26 GB of 7b last, as it empties the page cache.
SHAPES = ("1b", "w70", "w405", "7b-qv", "7b")
Samples = dict[str, list[bm.Sample]]


def measure(cmd: list[str], repeat: int) -> bm.Summary:
    return bm.Summary([env.run(cmd) for _ in range(repeat)])


def describe_data(name: str, root: Path, gen_s: float | None) -> tuple[dict[str, object], Path]:
    """Facts about the setup's data for the tables, and the manifest the I/O floor reads."""
    setup = bench_data.SETUPS[name]
    base, _, adapter = bench_data.trio_dirs(root, setup.adapter_dir)
    groups = bench_data.needed_tensors(root, setup.adapter_dir)
    manifest = root / f"manifest-{name}.json"
    manifest.write_text(json.dumps(groups))
    data: dict[str, object] = {
        "model_bytes": sum(p.stat().st_size for p in base.glob("*.safetensors")),
        "shards": len(list(base.glob("*.safetensors"))), "needed_bytes": bench_data.needed_bytes(groups),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
        "modules": sum(len(keys) for file, keys in groups if Path(file).parent == base),
        "generated_s": gen_s, "fp32_model_bytes": bench_data.fp32_model_bytes(base),
        "dense_c_bytes": bench_data.dense_c_bytes(root, setup.adapter_dir),
    }
    return data, manifest


def commands(name: str, root: Path, manifest: Path, out_dir: Path) -> dict[str, list[str]]:
    base, aligned, adapter = bench_data.trio_dirs(root, bench_data.SETUPS[name].adapter_dir)
    trio = [str(base), str(aligned), str(adapter)]
    return {
        "startup": [env.PY, "-c", "import torch, safetensors.torch"],
        "a": [env.PY, str(HERE / "io_floor.py"), str(manifest)],
        "b": [str(env.BIN / "safelora"), "patch", "--base", trio[0], "--aligned", trio[1], "--adapter", trio[2],
              "--out", str(out_dir / f"patched-{name}"), "--force", "--quiet", "--device", "cpu"],
        "c": [env.PY, str(HERE / "direct_dense.py"), *trio, str(out_dir / f"direct-{name}"), str(DIRECT_THRESHOLD)],
        "c2": [env.PY, str(HERE / "published_style.py"), *trio, str(out_dir / f"published-{name}"),
               str(DIRECT_THRESHOLD)],
    }


def choose_rows(name: str, args: argparse.Namespace, data: dict[str, object], root: Path,
                cmds: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """The rows to run for this setup (adding (b×8) to `cmds` when it runs), and notes for those that don't."""
    setup = bench_data.SETUPS[name]
    keys, notes = ["startup", "a", "b"], {}
    if name == "1b" and not args.skip_multi:
        adapters, data["multi_generated_s"] = env.ensure_multi(Path(args.data_dir).resolve(), name)
        data["multi_count"] = len(adapters)
        b = cmds["b"]
        out = str(Path(b[b.index("--out") + 1]).with_name(f"multi-{name}"))
        cmds["b8"] = [*b[:6], *(x for a in adapters for x in ("--adapter", str(a))), "--out", out, *b[10:]]
        keys.append("b8")
    fp32 = int(data["fp32_model_bytes"])  # type: ignore[call-overload]
    if setup.direct_fits and not args.skip_direct:
        keys.append("c")
    else:
        notes["c"] = (f"not run at this shape (two fp32 models are {2 * fp32 / GB:.0f} GB; this machine has "
                      f"{args.info['ram']})" if not setup.direct_fits else "skipped (--skip-direct)")
    if args.skip_published:
        notes["c2"] = "skipped (--skip-published)"
    elif not setup.direct_fits:
        notes["c2"] = (f"not run: four fp32 copies of the model and every dense C are "
                       f"{(4 * fp32 + int(data['dense_c_bytes'])) / GB:.0f} GB")  # type: ignore[call-overload]
    else:
        need, available = env.published_memory(root, setup.adapter_dir)
        data["published_need_bytes"], data["available_bytes"] = need, available
        if need > available:
            notes["c2"] = f"not run: needs about {need / GB:.0f} GB, only {available / GB:.0f} GB available now"
        else:
            keys.append("c2")
    return keys, notes


def warm_rows(name: str, keys: list[str], cmds: dict[str, list[str]], repeat: int, root: Path,
              data: dict[str, object]) -> Samples:
    """One untimed run of each row, then `repeat` interleaved repetitions (slow drifts hit every row alike)."""
    setup = bench_data.SETUPS[name]

    def published_fits() -> bool:
        need, available = env.published_memory(root, setup.adapter_dir)
        if need <= available:
            return True
        env.log(f"[{name}] (c2) skipped this time: needs ~{need / GB:.0f} GB, {available / GB:.0f} GB available")
        data["published_skipped"] = int(data.get("published_skipped", 0)) + 1  # type: ignore[call-overload]
        return False

    files = bench_data.trio_files(root, setup.adapter_dir)
    fits = sum(f.stat().st_size for f in files) < 0.5 * bm.meminfo_bytes("MemTotal")

    def rewarm() -> None:
        if fits:  # the whole trio fits in the page cache with room to spare: keep it there
            bm.read_files(files)

    env.log(f"[{name}] warming up: one untimed run of each command ({', '.join(keys)})")
    rewarm()
    samples: Samples = {k: [] for k in keys}
    for i in range(repeat + 1):
        if i:
            env.log(f"[{name}] warm repetition {i}/{repeat}")
        for key in keys:
            if key == "c2" and not published_fits():  # other work took the memory meanwhile
                continue
            sample = env.run(cmds[key])
            if i:
                samples[key].append(sample)
            if key == "c2":
                rewarm()  # (c2) holds ~20 GB: the kernel may have evicted part of the data from the page cache
    return samples


def cold_rows(name: str, cmds: dict[str, list[str]], repeat: int, base: Path, result: ShapeResult) -> None:
    works, evidence = bm.check_drop_caches(list(base.glob("*.safetensors"))[:2])
    result.cold_note = evidence
    if not works:
        for key in ("a", "b"):
            result.rows.append(Row(key, LABELS[key], "cold", None, "not measured: " + evidence))
        return
    cold: Samples = {k: [] for k in ("startup", "a", "b")}
    for i in range(repeat):
        env.log(f"[{name}] cold repetition {i + 1}/{repeat}")
        for key in cold:
            bm.drop_page_cache()
            cold[key].append(env.run(cmds[key]))
    result.rows.extend(Row(key, LABELS[key], "cold", bm.Summary(s)) for key, s in cold.items())


def bench_shape(name: str, args: argparse.Namespace, command: str) -> ShapeResult:
    setup = bench_data.SETUPS[name]
    repeat = args.repeat or setup.repeat
    data_dir = Path(args.data_dir).resolve()
    root, gen_s = env.ensure_data(data_dir, name)
    data, manifest = describe_data(name, root, gen_s)
    result = ShapeResult(name, setup.label, datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                         command, repeat, data, code=args.code, info=args.info)
    out_dir = data_dir / "out"
    cmds = commands(name, root, manifest, out_dir)
    keys, notes = choose_rows(name, args, data, root, cmds)
    load_before = env.load_average()
    samples = warm_rows(name, keys, cmds, repeat, root, data)
    if "c2" in samples and not samples["c2"]:
        notes["c2"] = "not run: the memory it needs was never available"
        del samples["c2"]
        keys.remove("c2")
    for key in ("startup", "a", "b", "b8", "c", "c2"):
        if key in samples or key in notes:
            summary = bm.Summary(samples[key]) if key in samples else None
            result.rows.append(Row(key, LABELS[key], "warm", summary, notes.get(key, "")))
    base = bench_data.trio_dirs(root)[0]
    if args.cold:
        cold_rows(name, cmds, repeat, base, result)
    else:
        result.cold_note = "skipped (--no-cold)"
    if args.cuda:
        gpu_cmd = [*cmds["b"][:-1], "cuda"]
        env.run(gpu_cmd)
        result.rows.append(Row("b_gpu", LABELS["b_gpu"], "warm", measure(gpu_cmd, repeat)))
    else:
        result.rows.append(Row("b_gpu", LABELS["b_gpu"], "warm", None, "not measured (no GPU in this run)"))
    result.load = f"{load_before:.1f} before, {env.load_average():.1f} after"
    patched = out_dir / f"patched-{name}"
    for key, ref, attr in (("c", "direct", "crosscheck"), ("c2", "published", "crosscheck_c2")):
        if key in keys:
            setattr(result, attr, crosscheck(patched, out_dir / f"{ref}-{name}", root, setup.adapter_dir, f"({key})"))
    return result


def crosscheck(patched: Path, reference: Path, root: Path, adapter_dir: str, name: str) -> str:
    """Compare (b)'s report and adapter with a reference row's cosines and adapter, as a sentence."""
    trio = [str(p) for p in bench_data.trio_dirs(root, adapter_dir)]
    out = subprocess.run([env.PY, str(HERE / "crosscheck.py"), str(patched), str(reference), *trio,
                          str(DIRECT_THRESHOLD)], capture_output=True, text=True, check=True).stdout
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


def help_time(repeat: int, command: str) -> Startup:
    cmd = [str(env.BIN / "safelora"), "--help"]
    env.run(cmd)
    helps, version = measure(cmd, repeat), measure([str(env.BIN / "safelora"), "--version"], repeat)
    return Startup(helps, version, datetime.datetime.now(datetime.timezone.utc).date().isoformat(), command)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", nargs="+", choices=(*SHAPES, "all"), default=["1b"])
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per row (medians are reported); default 5 for 1b, 3 for the others")
    parser.add_argument("--help-repeat", type=int, default=10, help="runs of `safelora --help`")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-cache rows")
    parser.add_argument("--skip-direct", action="store_true", help="skip row (c)")
    parser.add_argument("--skip-published", action="store_true", help="skip row (c2) (~20 GB, ~30 s a run)")
    parser.add_argument("--skip-multi", action="store_true", help="skip row (b×8)")
    parser.add_argument("--data-dir", default=str(env.REPO / "bench-data"))
    parser.add_argument("--worktree", action="store_true",
                        help="measure the working tree as it is (default: the committed code, HEAD)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the sections of docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be ≥ 1")
    return args


def main(argv: list[str] | None = None, render: Callable[[list[str]], int] = bench_render.main) -> int:
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/bench_patch.py", *shown]) if shown else "make bench"
    started = time.perf_counter()
    args.info = env.machine()
    args.cuda = args.info["cuda"] == "True"
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    names = list(SHAPES) if "all" in args.shape else list(dict.fromkeys(args.shape))
    args.code = env.prepare_code(data_dir, args.worktree)
    env.log(f"measuring safelora-cli {args.code}")
    for name in names:
        save_result(data_dir, bench_shape(name, args, command))
    env.log("timing `safelora --help`")
    save_startup(data_dir, help_time(args.help_repeat, command))
    env.log(f"total {time.perf_counter() - started:.0f} s")
    return render(["--data-dir", str(data_dir), "--shape", *names, *(["--write-docs"] if args.write_docs else [])])


if __name__ == "__main__":
    raise SystemExit(main())
