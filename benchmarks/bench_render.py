"""Render saved benchmark results (bench-data/results-*.json) as the Markdown tables of docs/benchmarks.md.

    python benchmarks/bench_render.py --shape all                 # print every saved setup's tables
    python benchmarks/bench_render.py --shape all --write-docs    # and rewrite their sections of the doc

bench_patch.py measures and saves, then calls this. Nothing here measures: rendering again
after a change of wording needs no new run. Free of torch on purpose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_measure as bm  # noqa: E402
from bench_results import GB, TARGETS, ShapeResult, Startup, load_result, load_startup  # noqa: E402

DOC = HERE.parent / "docs" / "benchmarks.md"
SHAPES = ("1b", "w70", "w405", "7b-qv", "7b")
SECTIONS = ("1b", "7b-qv", "7b", "w70", "w405", "flat", "width", "startup", "gpu")
TITLES = {"1b": "1.1B, q/v, r = 8", "7b-qv": "7B, q/v, r = 8", "7b": "7B, all linear, r = 16",
          "w70": "70B geometry, 1 layer, all linear, r = 16", "w405": "405B geometry, 1 layer, all linear, r = 16"}


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
            for key, what in (("b_over_a_warm", ""), ("b_over_a_warm_later", " (later milestone)")):
                lines.append(f"| (b)/(a) wall time, warm{what} | {r:.2f}× | ≤ {TARGETS[key]:.0f}× | "
                             f"{verdict(r <= TARGETS[key])} |")
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


def _notes(res: ShapeResult) -> list[str]:
    d, info = res.data, res.info
    notes = []
    ram_gb = float(info.get("ram", "0").split()[0]) * 2**30
    needed = int(d["needed_bytes"])  # type: ignore[call-overload]
    if needed > 0.8 * ram_gb:
        notes.append(f"The needed tensors ({needed / GB:.0f} GB) do not all fit in this machine's page cache "
                     f"({info.get('ram', '?')} of RAM), so warm rows still read part of their data from disk.")
    if res.get("b8", "warm") is not None:
        count = d.get("multi_count", 8)
        notes.append(f"(b×{count}) patches {count} different adapters of the same base (same targets and rank as "
                     "(b)'s, other seeds) in one run, one output folder each; it is compared with (b) from the "
                     "same interleaved repetitions.")
    if res.get("c2", "warm") is not None:
        need = d.get("published_need_bytes")
        skipped = f"; {d['published_skipped']} runs were skipped" if d.get("published_skipped") else ""
        notes.append(f"(c2) uses transformers {info.get('transformers', '?')} and peft {info.get('peft', '?')}."
                     + (f" It was run after checking that the ~{int(need) / GB:.0f} GB it needs were available "  # type: ignore[call-overload]
                        f"before each run (the harness skips a run otherwise{skipped})." if need else ""))
    for cache in ("warm", "cold"):
        b = res.get("b", cache)
        if b is not None and b.peak_anon_max > 1.5 * b.peak_anon:
            anons = ", ".join(fmt_gb(x) for x in sorted(x.peak_anon for x in b.samples))
            notes.append(f"The peak anonymous RSS of (b) varies from run to run ({cache}: {anons} GB).")
    if res.get("a", "cold") is not None:
        notes.append(f"Cold rows: {res.cold_note}. The page cache is dropped before every cold run, so cold "
                     "rows also load Python and torch from disk; the disk is virtual and the host may still "
                     "cache it.")
    elif res.cold_note:
        notes.append(f"Cold rows: {res.cold_note}.")
    notes += [f"Cross-check with {n}: {text}" for n, text in (("(c2)", res.crosscheck_c2), ("(c)", res.crosscheck))
              if text]
    return notes


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
        f"Machine: {info.get('nproc', '?')} CPUs ({info.get('cpu', '?')}), {info.get('ram', '?')} RAM, Linux "
        f"{info.get('kernel', '?')}, Python {info.get('python', '?')}, torch {info.get('torch', '?')}, "
        f"safetensors {info.get('safetensors', '?')}"
        + (f", transformers {info['transformers']}, peft {info['peft']}." if info.get("transformers") else "."),
        f"Data{gen}: base and aligned models {int(d['model_bytes']) / GB:.1f} GB each in bf16 ({layout}); "  # type: ignore[call-overload]
        f"a patch needs {int(d['needed_bytes']) / GB:.2f} GB of it ({d['modules']} weights per model plus the "  # type: ignore[call-overload]
        f"{int(d['adapter_bytes']) / 1e6:.0f} MB adapter).",  # type: ignore[call-overload]
        "",
        *rows_table(res),
        "",
        *ratio_lines(res),
        "",
    ]
    lines += [f"- {n}" for n in _notes(res)]
    return "\n".join(lines).rstrip() + "\n"


def _worst_anon(r: ShapeResult) -> tuple[int, int]:
    """(largest peak anonymous RSS of (b), number of runs), warm and cold together."""
    summaries = [s for s in (r.get("b", "warm"), r.get("b", "cold")) if s is not None]
    return max(s.peak_anon_max for s in summaries), sum(len(s.samples) for s in summaries)


def _warm_wall(r: ShapeResult, key: str) -> str:
    s = r.get(key, "warm")
    return fmt_s(s.wall_s) if s is not None else "—"


def memory_section(heading: str, results: dict[str, ShapeResult], names: tuple[str, ...], gb_key: str,
                   rel_key: str) -> str | None:
    """Peak anonymous RSS of (b) for `names` against the 1.1B value, with the targets `gb_key`, `rel_key`."""
    one = results.get("1b")
    one_b = one.get("b", "warm") if one is not None else None
    if one is None or one_b is None:
        return None
    cols = [(r, b) for r in (results.get(n) for n in ("1b", *names)) if r is not None
            and (b := r.get("b", "warm")) is not None]
    table = {
        "weights read (GB)": [f"{int(r.data['needed_bytes']) / GB:.2f}" for r, _ in cols],  # type: ignore[call-overload]
        "adapter (MB)": [f"{int(r.data['adapter_bytes']) / 1e6:.0f}" for r, _ in cols],  # type: ignore[call-overload]
        "(a) wall, warm, median (s)": [_warm_wall(r, "a") for r, _ in cols],
        "(b) wall, warm, median (s)": [_warm_wall(r, "b") for r, _ in cols],
        "(b)/(a) wall, warm": [f"{b.wall_s / a.wall_s:.2f}×" if (a := r.get("a", "warm")) else "—" for r, b in cols],
        "**(b) peak anon RSS, warm, median (GB)**": [f"**{fmt_gb(b.peak_anon)}**" for _, b in cols],
        "(b) peak anon RSS, worst run, warm and cold (GB)":
            [f"{fmt_gb(_worst_anon(r)[0])} (of {_worst_anon(r)[1]})" for r, _ in cols],
        "(b) peak RSS, warm, median (GB)": [fmt_gb(b.peak_rss) for _, b in cols],
        "measured": [f"{r.date}, commit {r.code}" for r, _ in cols],
    }
    limit, rel_limit = TARGETS[gb_key], TARGETS[rel_key]
    lines = [f"### {heading}", "", "| | " + " | ".join(TITLES[r.name] for r, _ in cols) + " |",
             "|---|" + "---:|" * len(cols), *(f"| {k} | " + " | ".join(v) + " |" for k, v in table.items()), "",
             f"Target: (b)'s peak anonymous RSS ≤ {limit} GB and within ±{rel_limit:.0%} of the 1.1B value "
             f"({fmt_gb(one_b.peak_anon)} GB, warm median).", "",
             f"| setup | peak anon RSS (GB) | vs 1.1B | ≤ {limit} GB | within ±{rel_limit:.0%} | met |",
             "|---|---:|---:|---|---|---|"]
    for use_worst in (False, True):
        for name in names:
            r = results.get(name)
            b = r.get("b", "warm") if r is not None else None
            if r is None or b is None:
                if not use_worst:
                    lines.append(f"| {TITLES[name]} | not measured | | | | |")
                continue
            value, runs = _worst_anon(r) if use_worst else (int(b.peak_anon), 0)
            rel = value / one_b.peak_anon - 1
            small, close = value <= limit * GB, abs(rel) <= rel_limit
            label = f"{TITLES[name]}, worst of {runs} runs" if use_worst else f"{TITLES[name]}, warm median"
            lines.append(f"| {label} | {fmt_gb(value)} | {rel:+.0%} | {verdict(small)} | {verdict(close)} | "
                         f"{verdict(small and close)} |")
    return "\n".join([*lines, ""])


def startup_section(s: Startup) -> str:
    ok = s.helps.wall_s <= TARGETS["help_s"]
    rows = [f"| `safelora {flag}` | {x.wall_s:.3f} | {x.wall_range[0]:.3f}–{x.wall_range[1]:.3f} | "
            f"{fmt_gb(x.peak_rss)} | {target} |" for flag, x, target in
            (("--help", s.helps, f"≤ {TARGETS['help_s']} s | {verdict(ok)}"), ("--version", s.version, "— | —"))]
    return "\n".join(["### Start-up", "", f"Measured {s.date} with `{s.command}`, medians of {len(s.helps.samples)} "
                      "runs (whole process).", "",
                      "| command | wall, median (s) | wall, min–max (s) | peak RSS (GB) | target | met |",
                      "|---|---:|---:|---:|---|---|", *rows, ""])


def gpu_section() -> str:
    return "\n".join([
        "### GPU", "", "| row | result |", "|---|---|",
        "| (b) `safelora patch --device cuda`, 1.1B and 7B | not measured (no GPU in this run) |",
        "| CPU/GPU agreement (cosines, selection, patched B) | not measured (no GPU in this run) |", "",
        "`python benchmarks/gpu_check.py --out DIR` measures both on a machine with an NVIDIA GPU "
        "(see [GPU check](#gpu-check)).", ""])


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def render(data_dir: Path, names: list[str]) -> dict[str, str]:
    """The sections for `names` (their saved results) and the cross-setup tables (every saved result)."""
    saved = {n: r for n in SHAPES if (r := load_result(data_dir, n)) is not None}
    missing = [n for n in names if n not in saved]
    if missing:
        raise SystemExit(f"no saved results for {', '.join(missing)} in {data_dir}")
    sections = {n: shape_section(saved[n]) for n in names}
    for key, heading, shapes, targets in (
            ("flat", "Flatness: peak memory at 1.1B and 7B", ("7b-qv", "7b"), ("anon_7b_gb", "anon_7b_vs_1b")),
            ("width", "Width: peak memory at 70B and 405B geometry", ("w70", "w405"),
             ("anon_wide_gb", "anon_wide_vs_1b"))):
        if (body := memory_section(heading, saved, shapes, *targets)) is not None:
            sections[key] = body
    if (startup := load_startup(data_dir)) is not None:
        sections["startup"] = startup_section(startup)
    if not any(r.get("b_gpu", "warm") for r in saved.values()):
        sections["gpu"] = gpu_section()
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", nargs="+", choices=(*SHAPES, "all"), default=["all"])
    parser.add_argument("--data-dir", default=str(HERE.parent / "bench-data"))
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the sections of {DOC.name}")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir).resolve()
    names = [n for n in SHAPES if (data_dir / f"results-{n}.json").is_file()] if "all" in args.shape \
        else list(dict.fromkeys(args.shape))
    sections = render(data_dir, names)
    print("\n".join(sections[k] for k in SECTIONS if k in sections))
    if args.write_docs:
        text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
        for name in SECTIONS:
            if name in sections:
                text = replace_section(text, name, sections[name])
        DOC.write_text(text)
        print(f"rewrote sections {', '.join(k for k in SECTIONS if k in sections)} of docs/{DOC.name}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
