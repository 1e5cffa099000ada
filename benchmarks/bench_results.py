"""What a benchmark run records: rows of samples per setup, saved as JSON and loaded back.

Shared by the measuring side (bench_patch.py) and the rendering side (bench_render.py), so that
tables can be rendered again from saved results without measuring. Free of torch on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import bench_measure as bm

GB = 1e9

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
    "anon_wide_gb": 1.5,  # peak anonymous RSS of (b) at 70B and 405B geometry (one layer)
    "anon_wide_vs_1b": 0.25,  # ... and within ±25% of the 1.1B value
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
    info: dict[str, str] = field(default_factory=dict)  # the machine

    def get(self, key: str, cache: str) -> bm.Summary | None:
        for row in self.rows:
            if row.key == key and row.cache == cache:
                return row.summary
        return None


@dataclass(frozen=True)
class Startup:
    helps: bm.Summary
    version: bm.Summary
    date: str
    command: str


def save_result(data_dir: Path, res: ShapeResult) -> None:
    payload = {
        "name": res.name, "label": res.label, "date": res.date, "command": res.command, "repeat": res.repeat,
        "data": res.data, "cold_note": res.cold_note, "crosscheck": res.crosscheck,
        "crosscheck_c2": res.crosscheck_c2, "code": res.code, "load": res.load, "info": res.info,
        "rows": [{"key": r.key, "label": r.label, "cache": r.cache, "note": r.note,
                  "samples": [s.__dict__ for s in r.summary.samples] if r.summary else None} for r in res.rows],
    }
    (data_dir / f"results-{res.name}.json").write_text(json.dumps(payload, indent=1))


def load_result(data_dir: Path, name: str) -> ShapeResult | None:
    path = data_dir / f"results-{name}.json"
    if not path.is_file():
        return None
    p = json.loads(path.read_text())
    res = ShapeResult(p["name"], p["label"], p["date"], p["command"], p["repeat"], p["data"],
                      cold_note=p["cold_note"], crosscheck=p["crosscheck"],
                      crosscheck_c2=p.get("crosscheck_c2", ""), code=p.get("code", ""),
                      load=p.get("load", ""), info=p.get("info") or {})
    for r in p["rows"]:
        summary = bm.Summary([bm.Sample(**s) for s in r["samples"]]) if r["samples"] else None
        res.rows.append(Row(r["key"], r["label"], r["cache"], summary, r["note"]))
    return res


def save_startup(data_dir: Path, startup: Startup) -> None:
    payload = {"date": startup.date, "command": startup.command,
               "help": [s.__dict__ for s in startup.helps.samples],
               "version": [s.__dict__ for s in startup.version.samples]}
    (data_dir / "results-startup.json").write_text(json.dumps(payload, indent=1))


def load_startup(data_dir: Path) -> Startup | None:
    path = data_dir / "results-startup.json"
    if not path.is_file():
        return None
    p = json.loads(path.read_text())
    helps, version = (bm.Summary([bm.Sample(**s) for s in p[k]]) for k in ("help", "version"))
    return Startup(helps, version, p["date"], p["command"])
