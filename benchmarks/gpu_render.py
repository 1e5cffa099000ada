"""gpu_check.py's result document as Markdown: one section per step that ran, then what was skipped."""

from __future__ import annotations

from typing import Any

COS_TOL = 1e-5
B_TOL = 1e-4
TARGETS = {"warm": 1.25, "cold": 1.05}  # (b)/(a) wall time at 7B, all linear modules (docs/benchmarks.md)
LABELS = {
    "startup": "(0) start-up: import torch, safetensors{init}",
    "a": "(a) I/O floor: read the needed tensors",
    "b": "(b) `safelora patch --device {device}`",
    "b_cpu": "(b) on the CPU, for comparison: `safelora patch --device cpu`",
}


def _yes(flag: object) -> str:
    return "yes" if flag else "**no**"


def _header(r: dict[str, Any]) -> list[str]:
    env, m = r["environment"], r["machine"]
    gpu = env.get("gpu")
    line = (f"Run {r['date']} (UTC); {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM; GPU: {gpu or 'none'}"
            + (f" ({env.get('gpu_memory_gb')} GB, compute capability {env.get('capability')})" if gpu else "")
            + f"; torch {env['torch']} (CUDA {env.get('cuda_version')}); safelora-cli {env['safelora_cli']}"
            + (f" at commit {r['commit']}" if r.get("commit") else "")
            + f"; steps {', '.join(r['steps'])}; total {r['total_s']:.0f} s.")
    title = "# GPU check" + (" (rehearsal: tiny shapes, CPU on both sides)" if r["rehearse"] else "")
    return [title, "", line, ""]


def _agreement(r: dict[str, Any]) -> list[str]:
    devices = r["agreement_devices"]
    lines = [f"## {' vs '.join(devices)}: `safelora_cli.patch` into two directories", "",
             f"Trio: {r['trios']['agree']}.", "",
             f"| rule | layers | selected | max cosine difference (≤ {COS_TOL:g}) | same selection | max relative "
             f"difference of patched lora_B (≤ {B_TOL:g}) | other tensors identical | {' / '.join(devices)} "
             "time (s) | ok |", "|---|---:|---:|---:|---|---:|---|---:|---|"]
    for name, a in r["agreement"].items():
        secs = " / ".join(f"{s:.2f}" for s in a["seconds"])
        lines.append(f"| {name} | {a['layers']} | {a['selected']} | {a['max_cosine_diff']:.1e} | "
                     f"{_yes(a['same_selection'] and a['same_tensor_keys'])} | {a['max_rel_b_diff']:.1e} | "
                     f"{_yes(a['other_tensors_identical'])} | {secs} | {_yes(a['ok'])} |")
    return [*lines, ""]


def _speed(r: dict[str, Any]) -> list[str]:
    extra, rows, device = r["extra"], r["rows"], r["device"]
    lines = [f"## Speed: {r['trios']['speed']}", "",
             f"A patch reads {extra['needed_gb']:.2f} GB (base and aligned weights of the adapted modules, and the "
             f"adapter) of the {2 * extra['model_gb']:.2f} GB of both models. Medians of up to {r['repeat']} runs "
             "per row, each a fresh process.", "",
             "| row | page cache | runs | wall, median (s) | wall, min–max (s) | peak RSS, median (GB) | "
             "peak anon RSS, median (max) (GB) |", "|---|---|---:|---:|---:|---:|---:|"]
    init = ", CUDA initialised" if device != "cpu" else ""
    for key, row in rows.items():
        name, cache = key.split(" ")
        lines.append(f"| {LABELS[name].format(init=init, device=device)} | {cache} | {row['runs']} | "
                     f"{row['wall_s_median']:.2f} | {row['wall_s_min']:.2f}–{row['wall_s_max']:.2f} | "
                     f"{row['peak_rss_gb_median']:.2f} | {row['peak_anon_gb_median']:.2f} "
                     f"({row['peak_anon_gb_max']:.2f}) |")
    wall = {key: row["wall_s_median"] for key, row in rows.items()}
    facts = []
    for cache, target in TARGETS.items():
        if f"a {cache}" in wall and f"b {cache}" in wall:
            ratio = wall[f"b {cache}"] / wall[f"a {cache}"]
            facts.append(f"(b)/(a) wall time, {cache}: {ratio:.2f}× (target ≤ {target}×: "
                         f"{'met' if ratio <= target else 'missed'})")
    if "b warm" in wall and "startup warm" in wall:
        facts.append(f"(b) warm, less the start-up row: {wall['b warm'] - wall['startup warm']:.2f} s")
    if "b_cpu warm" in wall and "b warm" in wall:
        facts.append(f"(b) on the CPU / (b) on {device}, warm: {wall['b_cpu warm'] / wall['b warm']:.1f}×")
    if extra.get("b_gpu_max_memory_allocated_gb") is not None:
        facts.append(f"(b) peak GPU memory allocated by torch: {extra['b_gpu_max_memory_allocated_gb']:.2f} GB")
    facts.append(f"Cold rows: {extra.get('drop_caches', 'not tried')}")
    return [*lines, "", *[f"- {f}." for f in facts], ""]


def _subspace(r: dict[str, Any]) -> list[str]:
    lines = ["## Subspace files", ""]
    if "subspace" in r:
        devices = " / ".join(r["subspace"][next(iter(r["subspace"]))]["devices"])
        lines += [f"`safelora_cli.subspace` on each device ({devices}) on the agreement trio, then "
                  "`safelora_cli.inspect(subspace=...)` of each file on its device.", "",
                  f"| file | size (MB) | tensors bit for bit identical | whole file identical | max cosine difference "
                  f"(≤ {COS_TOL:g}) | max bound difference (≤ {COS_TOL:g}) | same selection | written in (s) | ok |",
                  "|---|---:|---|---|---:|---:|---|---:|---|"]
        for name, s in r["subspace"].items():
            lines.append(f"| {name} | {s['file_mb']:.2f} | {_yes(s['tensors_identical'])} | "
                         f"{_yes(s['file_bytes_identical'])} | {s['max_cosine_diff']:.1e} | "
                         f"{s['max_bound_diff']:.1e} | {_yes(s['same_selection'])} | "
                         f"{' / '.join(f'{x:.2f}' for x in s['seconds'])} | {_yes(s['ok'])} |")
        lines.append("")
    if "rank64" in r:
        k = r["rank64"]
        wall = f"{k['wall_s_median']:.2f} s (median of {k['runs']})" if k["runs"] else \
            f"{k['first_wall_s']:.2f} s (one run)"
        gpu = k.get("gpu_max_memory_allocated_gb")
        lines += [f"- `safelora subspace --modules q_proj,v_proj --rank 64 --device {r['device']}` on the speed trio "
                  f"({k['weights']} weights, a float64 SVD each): {wall}, peak anon RSS "
                  f"{k.get('peak_anon_gb_median', 0):.2f} GB" + (f", GPU peak {gpu:.2f} GB" if gpu else "")
                  + f"; file {k['file_mb']:.1f} MB.", ""]
    return lines if len(lines) > 2 else []


def _width(r: dict[str, Any]) -> list[str]:
    if not r.get("width"):
        return []
    lines = [f"## Width: one decoder layer, `safelora patch --device {r['device']}`", "",
             "| geometry | hidden, MLP | one model (GB) | read by a patch (GB) | runs | wall, median (s) | "
             "peak anon RSS, median (max) (GB) | torch peak GPU memory (GB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for w in r["width"].values():
        timed = w["runs"] > 0
        wall = f"{w['wall_s_median']:.2f}" if timed else f"{w['first_wall_s']:.2f} (untimed run only)"
        anon = f"{w['peak_anon_gb_median']:.2f} ({w['peak_anon_gb_max']:.2f})" if timed else "—"
        gpu = w.get("gpu_max_memory_allocated_gb")
        lines.append(f"| {w['label']} | {w['shape']['hidden']}, {w['shape']['intermediate']} | {w['model_gb']:.2f} | "
                     f"{w['needed_gb']:.2f} | {w['runs']} | {wall} | {anon} | "
                     f"{'—' if gpu is None else f'{gpu:.2f}'} |")
    return [*lines, ""]


def markdown(r: dict[str, Any]) -> str:
    lines = _header(r)
    if "agreement" in r:
        lines += _agreement(r)
    if "extra" in r:
        lines += _speed(r)
    elif "rows" in r:  # only the CPU comparison ran
        lines += [f"- (b) on the CPU, warm: {r['rows']['b_cpu warm']['wall_s_median']:.2f} s.", ""]
    lines += _subspace(r) + _width(r)
    generated = ", ".join(f"{k} in {v:.1f} s" for k, v in r["generated"].items())
    notes = ([f"Trios generated by this run: {generated}"] if generated else []) + list(r["skipped"])
    if notes:
        lines += ["## Notes", "", *[f"- {n}." for n in notes], ""]
    ran = "agreement" in r or "subspace" in r
    verdict = "not run" if not ran else "all checks pass" if r["agreement_ok"] else "**FAILED**"
    lines += [f"Agreement (patch and subspace, CPU vs {r['device']}): {verdict}.", ""]
    return "\n".join(lines)
