"""Generate (once) the synthetic bf16 trios the benchmarks use; run as a child of bench_patch.py.

    python benchmarks/bench_generate.py DATA_DIR {1b,7b}

The tensors come from `safelora_cli.demo.write_models` / `write_adapter`. `write_models` keeps
every shard of both models in memory until it writes them, so a 7B pair (~27 GB of bf16) would
not fit in 24 GiB of RAM however it is sharded. The sharded pair is therefore generated a few
layers at a time: `write_models` writes each chunk as a small model, whose tensors are renamed to
their real layer indices and saved as one shard of the final checkpoint. Peak memory is one chunk.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from bench_data import DONE_MARKER, SETUPS, Setup, is_ready
from safetensors import safe_open
from safetensors.torch import save_file

import safelora_cli.demo as demo
from safelora_cli.demo import LlamaShape, write_adapter, write_models

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_trio(data_dir: Path, setup: Setup) -> Path:
    """Return `data_dir/<setup.name>`, generating it first when missing or made with other settings."""
    root = data_dir / setup.name
    if is_ready(root, setup):
        return root
    partial = data_dir / f"{setup.name}.partial"
    for stale in (root, partial):
        if stale.exists():
            shutil.rmtree(stale)
    partial.mkdir(parents=True)
    log(f"generating the {setup.label} trio under {root} (once; cached) ...")
    shape: LlamaShape = getattr(demo, setup.shape)
    if setup.layers_per_shard is None or setup.layers_per_shard >= shape.layers:
        bases = write_models(partial, shape, torch.bfloat16)
    else:
        bases = _write_models_chunked(partial, shape, setup.layers_per_shard)
    write_adapter(partial / "adapter", shape, bases, setup.targets, setup.rank,
                  base_model="synthetic-aligned")
    del bases
    (partial / DONE_MARKER).write_text(json.dumps(setup.record()))
    partial.rename(root)
    return root


def _shift_layer(key: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"model.layers.{int(m[1]) + offset}.", key, count=1)


def _write_models_chunked(root: Path, shape: LlamaShape, per_shard: int) -> dict[str, torch.Tensor]:
    """`write_models` in chunks of `per_shard` layers, each chunk becoming one shard."""
    firsts = list(range(0, shape.layers, per_shard))
    weight_maps: dict[str, dict[str, str]] = {"base": {}, "aligned": {}}
    totals = {"base": 0, "aligned": 0}
    bases: dict[str, torch.Tensor] = {}
    scratch = root / "chunk"
    for n, first in enumerate(firsts, start=1):
        count = min(per_shard, shape.layers - first)
        log(f"  layers {first}..{first + count - 1} ({n}/{len(firsts)})")
        chunk_shape = LlamaShape(shape.hidden, shape.intermediate, count, shape.heads, shape.kv_heads, shape.vocab)
        chunk_bases = write_models(scratch, chunk_shape, torch.bfloat16, seed=n)
        bases.update({_shift_layer(k, first): u for k, u in chunk_bases.items()})
        shard_name = f"model-{n:05d}-of-{len(firsts):05d}.safetensors"
        last = n == len(firsts)
        for model in ("base", "aligned"):
            src = scratch / model / "model.safetensors"
            tensors = {}
            with safe_open(str(src), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    if key.startswith("model.layers.") or last:  # embeddings/head/norm: once, last shard
                        tensors[_shift_layer(key, first)] = handle.get_tensor(key)
            (root / model).mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(root / model / shard_name), metadata={"format": "pt"})
            for key, t in tensors.items():
                weight_maps[model][key] = shard_name
                totals[model] += t.numel() * t.element_size()
            if last:
                shutil.copy(scratch / model / "config.json", root / model / "config.json")
            del tensors
        shutil.rmtree(scratch)
    for model in ("base", "aligned"):
        index = {"metadata": {"total_size": totals[model]}, "weight_map": weight_maps[model]}
        (root / model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.loads((root / model / "config.json").read_text())
        config["num_hidden_layers"] = shape.layers
        (root / model / "config.json").write_text(json.dumps(config, indent=2))
    return bases


if __name__ == "__main__":
    ensure_trio(Path(sys.argv[1]), SETUPS[sys.argv[2]])
