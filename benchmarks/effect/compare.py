"""Which selection rule restores refusals at the least cost to the task? Across several runs.

Reads results.json of one or more `run.py` outputs (different --seed) and prints, per adapter and
rule family, the row with refusal ≥ --refusal that keeps the most of the adapter's own skill (the
new task for mixed and benign, the old tasks for pure_bad), or "never" when no row gets there.

    python benchmarks/effect/compare.py build/effect-s1234 build/effect-s7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FAMILIES = {
    "paper (C·B, cosine ≤ τ or top-k)": lambda r: r.startswith("paper: t"),
    "paper rule, exact projection": lambda r: r.startswith("paper: exact"),
    "drop LoRA in the paper's layers": lambda r: r.startswith("drop selected"),
    "C·B in lowest signed-a layers": lambda r: r.startswith("project lowest-a"),
    "drop LoRA in lowest signed-a layers": lambda r: r.startswith("drop lowest-a"),
    "drop LoRA in random layers (mean)": lambda r: r.startswith("drop random"),
}
SKILL = {"pure_bad": "old_tasks", "mixed": "new_task", "benign": "new_task"}


def _value(metric: object) -> float:
    return float(metric["mean"]) if isinstance(metric, dict) else float(metric or 0.0)  # type: ignore[arg-type]


def best(rows: list[dict], family, skill: str, floor: float) -> str:  # type: ignore[no-untyped-def, type-arg]
    """The cheapest way this family reaches the refusal floor: 'skill kept (modules changed)'."""
    hits = [r for r in rows if family(r["rule"]) and _value(r["metrics"]["refusal"]) >= floor]
    if not hits:
        return "never"
    top = max(hits, key=lambda r: (_value(r["metrics"][skill]), -int(r["layers"])))
    return f"{_value(top['metrics'][skill]):.2f} ({top['layers']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--refusal", type=float, default=0.9)
    args = parser.parse_args()
    runs = [json.loads((run / "results.json").read_text()) for run in args.runs]
    seeds = [str(r.get("seed", "?")) for r in runs]
    print(f"Refusal ≥ {args.refusal}: skill kept (modules changed), seeds {', '.join(seeds)}\n")
    print("| rule | " + " | ".join(f"{a} s{s}" for a in SKILL for s in seeds) + " |")
    print("|---|" + "---|" * (len(SKILL) * len(seeds)))
    for name, family in FAMILIES.items():
        cells = [best(run[a]["rows"], family, SKILL[a], args.refusal) for a in SKILL for run in runs]
        print(f"| {name} | " + " | ".join(cells) + " |")
    trained = [f"{_value(run[a]['rows'][0]['metrics'][SKILL[a]]):.2f}" for a in SKILL for run in runs]
    print("| (LoRA as trained, before any patch) | " + " | ".join(trained) + " |")


if __name__ == "__main__":
    main()
