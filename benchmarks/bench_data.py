"""The benchmark configurations and what a patch reads from them. Free of torch on purpose.

The harness process imports only this (never torch) and stays small: Linux counts the RSS of the
process that forks into the child's `ru_maxrss`, so a large harness would inflate every
measured peak RSS. Generating the data (which needs torch) is done by bench_generate.py in a
child process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DONE_MARKER = "bench-trio.json"


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: model shape (a name in safelora_cli.demo), LoRA targets and rank."""

    name: str
    label: str
    shape: str  # SHAPE_1B or SHAPE_7B in safelora_cli.demo
    targets: tuple[str, ...]
    rank: int
    layers_per_shard: int | None  # None: a single model.safetensors
    direct_fits: bool  # whether the dense fp32 "direct" implementation fits in 24 GiB
    model_gb: float  # size of one bf16 model, for the disk-space check

    def record(self) -> dict[str, object]:
        return {"shape": self.shape, "targets": list(self.targets), "rank": self.rank,
                "layers_per_shard": self.layers_per_shard, "dtype": "bfloat16"}


SETUPS = {
    # 1.1B (TinyLlama-like): one 2.2 GB file per model, like the published checkpoint.
    "1b": Setup("1b", "1.1B shape, LoRA on q_proj and v_proj, r = 8", "SHAPE_1B", ("q_proj", "v_proj"), 8,
                None, True, 2.2),
    # 7B (Llama-2-7b-like): 4 shards of ~3.4 GB per model.
    "7b": Setup("7b", "7B shape, LoRA on all 7 linear modules, r = 16", "SHAPE_7B", ALL_LINEAR, 16, 8, False,
                13.5),
}


def trio_dirs(root: Path) -> tuple[Path, Path, Path]:
    return root / "base", root / "aligned", root / "adapter"


def is_ready(root: Path, setup: Setup) -> bool:
    marker = root / DONE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == setup.record()
    except json.JSONDecodeError:
        return False


def _header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name → dtype, shape, data_offsets)."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header


def needed_tensors(root: Path) -> list[tuple[str, list[str]]]:
    """What a patch must read, grouped by file in on-disk order: (file, keys).

    The base and aligned weight of every module the adapter targets, then the adapter file
    (all of it, key list empty meaning "every tensor").
    """
    base, aligned, adapter = trio_dirs(root)
    adapter_file = adapter / "adapter_model.safetensors"
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                      for k in _header(adapter_file) if ".lora_A." in k})
    weights = [f"{m}.weight" for m in modules]
    groups: list[tuple[str, list[str]]] = []
    for model in (base, aligned):
        index = model / "model.safetensors.index.json"
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            files: dict[str, list[str]] = {}
            for key in weights:
                files.setdefault(str(model / mapping[key]), []).append(key)
        else:
            files = {str(model / "model.safetensors"): weights}
        for file in sorted(files):
            offsets = {k: v["data_offsets"][0] for k, v in _header(Path(file)).items()}
            groups.append((file, sorted(files[file], key=offsets.__getitem__)))
    groups.append((str(adapter_file), []))
    return groups


def needed_bytes(groups: list[tuple[str, list[str]]]) -> int:
    total = 0
    for file, keys in groups:
        path = Path(file)
        if not keys:
            total += path.stat().st_size
            continue
        header = _header(path)
        total += sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys)
    return total


def trio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
