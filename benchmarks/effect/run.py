"""`make effect`: does `safelora patch` restore refusals and keep the fine-tuned task? Measured.

Builds the toy trio and its three adapters (world.py), patches them with the CLI at several τ, top-K
and with the exact projection, builds controls on the same number of layers (LoRA dropped in the
selected layers, in random layers, and layers chosen by the signed alignment cosine
a = ⟨ΔW, V⟩ / (‖ΔW‖ ‖V‖)), then evaluates everything with `safelora eval` and writes
results.json and table.md under --out.

    python benchmarks/effect/run.py [--out build/effect] [--seed N] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import layers
import torch
import world

# name → patch options; every setting patches the three adapters in one CLI call.
SETTINGS: dict[str, list[str]] = {
    "tau=0.3": ["--threshold", "0.3"], "tau=0.5": ["--threshold", "0.5"], "tau=0.7": ["--threshold", "0.7"],
    "tau=0.9": ["--threshold", "0.9"], "top-k=2": ["--top-k", "2"], "top-k=4": ["--top-k", "4"],
    "top-k=6": ["--top-k", "6"], "exact r=8 top-k=4": ["--projection", "exact", "--rank", "8", "--top-k", "4"],
    "exact r=32 top-k=4": ["--projection", "exact", "--rank", "32", "--top-k", "4"],
}
RANDOM_DRAWS = 3
EVAL = ["--refusal-marker", "REFUSE", "--max-new-tokens", "7", "--batch-size", "256", "--device", "cpu", "-q",
        "--json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args: object) -> object:
    """Run `safelora …` in a fresh process (as a user would) and return its JSON stdout."""
    done = subprocess.run([sys.executable, "-m", "safelora_cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, check=False)
    if done.returncode != 0:
        raise SystemExit(f"safelora {' '.join(map(str, args[:1]))} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def patch_all(root: Path) -> dict[str, dict[str, list[str]]]:
    """setting → adapter → modules the CLI selected (and patched, under root/patched/<setting>/<adapter>)."""
    selected: dict[str, dict[str, list[str]]] = {}
    for i, (name, options) in enumerate(SETTINGS.items()):
        adapters = [a for n in world.ADAPTERS for a in ("--adapter", root / n)]
        reports = cli("patch", "--base", root / "base", "--aligned", root / "aligned", *adapters,
                      "--out", root / "patched" / f"s{i}", "--force", "--device", "cpu", "-q", "--json", *options)
        assert isinstance(reports, list)
        selected[name] = {n: [row["module"] for row in r["layers"] if row["selected"]]
                          for n, r in zip(world.ADAPTERS, reports, strict=True)}
    return selected


def controls(root: Path, stats: dict[str, list[layers.LayerStats]], selected: dict[str, dict[str, list[str]]]
             ) -> dict[str, dict[str, Path]]:
    """adapter → variant label → directory: drop the selected layers; random drops; signed-a choices."""
    out: dict[str, dict[str, Path]] = {}
    for adapter in world.ADAPTERS:
        variants: dict[str, Path] = {}
        src = root / adapter
        modules = [s.module for s in stats[adapter]]
        by_signed = [s.module for s in sorted(stats[adapter], key=lambda s: s.signed)]
        for i, (name, chosen) in enumerate(selected.items()):
            if chosen[adapter] and name.startswith(("tau", "top")):
                variants[f"drop selected ({name})"] = layers.rewrite(src, root / "ctl" / adapter / f"drop-s{i}",
                                                                     set(chosen[adapter]), "drop", root)
        for n in sorted({len(c[adapter]) for c in selected.values()} - {0}):
            rng = random.Random(1000 * n + 7)
            for d in range(RANDOM_DRAWS):
                pick = set(rng.sample(modules, n))
                variants[f"drop random {n} #{d}"] = layers.rewrite(src, root / "ctl" / adapter / f"rand{n}-{d}",
                                                                   pick, "drop", root)
            for how in ("project", "drop"):
                variants[f"{how} lowest-a {n}"] = layers.rewrite(src, root / "ctl" / adapter / f"signed{n}-{how}",
                                                                 set(by_signed[:n]), how, root)
        out[adapter] = variants
    return out


def evaluate(root: Path, adapters: list[Path]) -> dict[str, dict[str, dict]]:  # type: ignore[type-arg]
    """prompts file → adapter path ('' for the model alone) → eval result; plus the base model on safety."""
    results: dict[str, dict[str, dict]] = {}  # type: ignore[type-arg]
    for part in ("safety", "task"):
        args = [a for p in adapters for a in ("--adapter", p)]
        report = cli("eval", "--model", root / "aligned", "--prompts", root / f"{part}.jsonl", *args, *EVAL)
        assert isinstance(report, dict)
        results[part] = {r["adapter"] or "": r for r in report["results"]}
    base = cli("eval", "--model", root / "base", "--prompts", root / "safety.jsonl", *EVAL)
    assert isinstance(base, dict)
    results["base"] = {"": base["results"][0]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/effect"))
    parser.add_argument("--seed", type=int, default=world.SEED, help="seed of the world (data, weights, prompts)")
    parser.add_argument("--reuse", action="store_true", help="keep an already built world under --out")
    args = parser.parse_args()
    torch.set_num_threads(1)  # measured: one thread trains this model faster than two on a 2-core machine
    root: Path = args.out
    clock = {"start": time.perf_counter()}
    if not (args.reuse and (root / "world.json").exists()):
        shutil.rmtree(root, ignore_errors=True)
        world.build(root, seed=args.seed)
    clock["world"] = time.perf_counter()
    selected = patch_all(root)
    stats = {a: layers.layer_stats(root, root / a) for a in world.ADAPTERS}
    variants = controls(root, stats, selected)
    clock["patch"] = time.perf_counter()
    patched = {a: {name: root / "patched" / f"s{i}" / a for i, name in enumerate(SETTINGS)} for a in world.ADAPTERS}
    every = [root / a for a in world.ADAPTERS] + [p for a in world.ADAPTERS for p in patched[a].values()] + [
        p for a in world.ADAPTERS for p in variants[a].values()]
    results = evaluate(root, every)
    clock["eval"] = time.perf_counter()
    summary = layers.summarise(root, results, selected, patched, variants, stats)
    summary["seed"] = args.seed
    summary["seconds"] = {"world": clock["world"] - clock["start"], "patch_and_controls": clock["patch"] -
                          clock["world"], "eval": clock["eval"] - clock["patch"]}
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    table = layers.markdown(summary)
    (root / "table.md").write_text(table)
    print(table)
    print(f"Seconds: {summary['seconds']}")


if __name__ == "__main__":
    main()
