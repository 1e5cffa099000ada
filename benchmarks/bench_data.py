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

import bench_measure

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DONE_MARKER = "bench-trio.json"
# The multi-adapter row: this many adapters of the 1.1B base, same targets and rank, different seeds.
MULTI_COUNT = 8
MULTI_DIR = "multi"
MULTI_SEED = 101  # seeds MULTI_SEED .. MULTI_SEED + MULTI_COUNT - 1 (the main adapter uses 1)


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: model shape (a name in safelora_cli.demo), LoRA targets and rank."""

    name: str
    label: str
    shape: str  # SHAPE_1B or SHAPE_7B in safelora_cli.demo, or SHAPE_W70/SHAPE_W405 of bench_wide
    targets: tuple[str, ...]
    rank: int
    layers_per_shard: int | None  # None: a single model.safetensors
    direct_fits: bool  # whether the dense fp32 "direct" implementation fits in 24 GiB
    model_gb: float  # size of one bf16 model, for the disk-space check
    repeat: int = 5  # runs per row unless --repeat says otherwise
    models_from: str | None = None  # reuse the base/aligned pair of that setup; only the adapter is made
    adapter_dir: str = "adapter"

    @property
    def root_name(self) -> str:
        """The data folder holding the base/aligned pair (and this setup's adapter)."""
        return self.models_from or self.name

    def record(self) -> dict[str, object]:
        return {"shape": self.shape, "targets": list(self.targets), "rank": self.rank,
                "layers_per_shard": self.layers_per_shard, "dtype": "bfloat16"}


SETUPS = {
    # 1.1B (TinyLlama-like): one 2.2 GB file per model, like the published checkpoint.
    "1b": Setup("1b", "1.1B shape, LoRA on q_proj and v_proj, r = 8", "SHAPE_1B", ("q_proj", "v_proj"), 8,
                None, True, 2.2),
    # 7B (Llama-2-7b-like): 4 shards of ~3.4 GB per model.
    "7b": Setup("7b", "7B shape, LoRA on all 7 linear modules, r = 16", "SHAPE_7B", ALL_LINEAR, 16, 8, False,
                13.5, repeat=3),
    # The same 7B pair with the 1.1B adapter's LoRA config, for the flatness comparison.
    # One decoder layer of 70B and of 405B geometry, one shard per weight: memory against width.
    "w70": Setup("w70", "70B geometry (hidden 8192, MLP 28672), one layer, all 7 linear modules, r = 16",
                 "SHAPE_W70", ALL_LINEAR, 16, 1, False, 1.7, repeat=3),
    "w405": Setup("w405", "405B geometry (hidden 16384, MLP 53248), one layer, all 7 linear modules, r = 16",
                  "SHAPE_W405", ALL_LINEAR, 16, 1, False, 6.4, repeat=3),
    "7b-qv": Setup("7b-qv", "7B shape, LoRA on q_proj and v_proj, r = 8", "SHAPE_7B", ("q_proj", "v_proj"), 8, 8,
                   False, 13.5, repeat=3, models_from="7b", adapter_dir="adapter-qv"),
}


def trio_dirs(root: Path, adapter_dir: str = "adapter") -> tuple[Path, Path, Path]:
    return root / "base", root / "aligned", root / adapter_dir


def _marker_matches(marker: Path, record: dict[str, object]) -> bool:
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == record
    except json.JSONDecodeError:
        return False


def adapter_marker(root: Path, setup: Setup) -> Path:
    """Where an adapter made for an existing pair records its settings (beside it, not inside it)."""
    return root / f"{setup.adapter_dir}.json"


def is_ready(root: Path, setup: Setup) -> bool:
    if setup.models_from is None:
        return _marker_matches(root / DONE_MARKER, setup.record())
    return (is_ready(root, SETUPS[setup.models_from])
            and _marker_matches(adapter_marker(root, setup), setup.record()))


def multi_record(setup: Setup) -> dict[str, object]:
    return {**setup.record(), "count": MULTI_COUNT, "first_seed": MULTI_SEED}


def multi_dirs(root: Path) -> list[Path]:
    return [root / MULTI_DIR / f"adapter-{i + 1}" for i in range(MULTI_COUNT)]


def multi_ready(root: Path, setup: Setup) -> bool:
    return _marker_matches(root / f"{MULTI_DIR}.json", multi_record(setup))


def _header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name → dtype, shape, data_offsets)."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header


def adapted_modules(adapter: Path) -> list[str]:
    """Module names an adapter directory targets, sorted."""
    return sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                   for k in _header(adapter / "adapter_model.safetensors") if ".lora_A." in k})


def needed_tensors(root: Path, adapter_dir: str = "adapter") -> list[tuple[str, list[str]]]:
    """What a patch must read, grouped by file in on-disk order: (file, keys).

    The base and aligned weight of every module the adapter targets, then the adapter file
    (all of it, key list empty meaning "every tensor").
    """
    base, aligned, adapter = trio_dirs(root, adapter_dir)
    adapter_file = adapter / "adapter_model.safetensors"
    weights = [f"{m}.weight" for m in adapted_modules(adapter)]
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


def trio_files(root: Path, adapter_dir: str = "adapter") -> list[Path]:
    """The files of the base, the aligned model and one adapter."""
    return sorted(p for d in trio_dirs(root, adapter_dir) for p in d.rglob("*") if p.is_file())


def _model_files(model: Path) -> list[Path]:
    index = model / "model.safetensors.index.json"
    if index.is_file():
        return [model / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [model / "model.safetensors"]


def fp32_model_bytes(model: Path) -> int:
    """Bytes of one model held in float32 (every tensor of every shard)."""
    total = 0
    for file in _model_files(model):
        for info in _header(file).values():
            count = 1
            for n in info["shape"]:
                count *= n
            total += 4 * count
    return total


def dense_c_bytes(root: Path, adapter_dir: str = "adapter") -> int:
    """Bytes of every adapted layer's dense C = V·Vᵀ/‖V‖_F (out × out, float32) held at once."""
    base = root / "base"
    shapes = {k: v["shape"] for f in _model_files(base) for k, v in _header(f).items()}
    return sum(4 * shapes[f"{m}.weight"][0] ** 2 for m in adapted_modules(root / adapter_dir))


def available_memory() -> int:
    """`MemAvailable` of /proc/meminfo, in bytes."""
    return bench_measure.meminfo_bytes("MemAvailable")
