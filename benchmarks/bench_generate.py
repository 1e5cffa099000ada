"""Generate (once) the synthetic bf16 trios the benchmarks use; run as a child of bench_patch.py.

    python benchmarks/bench_generate.py DATA_DIR {1b,7b,7b-qv,w70,w405}
    python benchmarks/bench_generate.py DATA_DIR 1b --multi     # the 8 adapters of the multi-adapter row

The tensors come from `safelora_cli.demo.write_models` / `write_adapter`. A setup that reuses
another's base/aligned pair (7b-qv), and the extra adapters of the multi-adapter row, only get
adapters: `write_adapter` needs each weight's alignment basis U, which `write_models` returns but
does not save, so it is recovered from the checkpoints (V = W_aligned − W_base has rank 8, and
an orthonormal basis of V·Ω for a random Ω spans the same columns as U). `write_models` keeps
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
from bench_data import (
    DONE_MARKER,
    MULTI_DIR,
    MULTI_SEED,
    SETUPS,
    Setup,
    adapter_marker,
    is_ready,
    multi_dirs,
    multi_ready,
    multi_record,
)
from safetensors import safe_open
from safetensors.torch import save_file

import safelora_cli.demo as demo
from safelora_cli.demo import ALIGN_RANK, LlamaShape, write_adapter, write_models

from bench_wide import WIDE_SHAPES, write_wide_adapter, write_wide_models  # isort: skip

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_trio(data_dir: Path, setup: Setup) -> Path:
    """Return `data_dir/<setup.name>`, generating it first when missing or made with other settings."""
    if setup.models_from is not None:
        return ensure_derived_adapter(data_dir, setup)
    root = data_dir / setup.name
    if is_ready(root, setup):
        return root
    partial = data_dir / f"{setup.name}.partial"
    for stale in (root, partial):
        if stale.exists():
            shutil.rmtree(stale)
    partial.mkdir(parents=True)
    log(f"generating the {setup.label} trio under {root} (once; cached) ...")
    shape = shape_of(setup)
    if setup.shape in WIDE_SHAPES:
        bases = write_wide_models(partial, shape)
        write_wide_adapter(partial / "adapter", shape, bases, setup.targets, setup.rank)
    else:
        if setup.layers_per_shard is None or setup.layers_per_shard >= shape.layers:
            bases = write_models(partial, shape, torch.bfloat16)
        else:
            bases = _write_models_chunked(partial, shape, setup.layers_per_shard)
        write_adapter(partial / "adapter", shape, bases, setup.targets, setup.rank, base_model="synthetic-aligned")
    del bases
    (partial / DONE_MARKER).write_text(json.dumps(setup.record()))
    partial.rename(root)
    return root


def shape_of(setup: Setup) -> LlamaShape:
    """The model shape a setup names: one of `safelora_cli.demo`'s, or a one-layer wide one."""
    return WIDE_SHAPES[setup.shape] if setup.shape in WIDE_SHAPES else getattr(demo, setup.shape)


def recovered_bases(root: Path, shape: LlamaShape, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Alignment bases (out, 8) of the weights `write_adapter` uses (targets in even layers), from V."""
    wanted = [f"model.layers.{i}.{name}.weight" for i in range(0, shape.layers, 2)
              for name in shape.linear_shapes() if name.rsplit(".", 1)[-1] in targets]
    files = {}
    for model in ("base", "aligned"):
        index = root / model / "model.safetensors.index.json"
        mapping = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
        files[model] = {k: root / model / mapping.get(k, "model.safetensors") for k in wanted}
    gen = torch.Generator().manual_seed(0)
    bases = {}
    for key in wanted:
        pair = []
        for model in ("base", "aligned"):
            with safe_open(str(files[model][key]), framework="pt") as handle:
                pair.append(handle.get_tensor(key).float())
        v = pair[1] - pair[0]
        sketch = v @ torch.randn(v.shape[1], ALIGN_RANK, generator=gen)
        bases[key] = torch.linalg.qr(sketch)[0]
    return bases


def ensure_derived_adapter(data_dir: Path, setup: Setup) -> Path:
    """An adapter for the base/aligned pair of `setup.models_from`, written beside that pair's adapter."""
    assert setup.models_from is not None
    root = ensure_trio(data_dir, SETUPS[setup.models_from])
    if is_ready(root, setup):
        return root
    target = root / setup.adapter_dir
    if target.exists():
        shutil.rmtree(target)
    log(f"writing the {setup.label} adapter to {target} (once; cached) ...")
    shape = shape_of(setup)
    bases = recovered_bases(root, shape, setup.targets)
    write_adapter(target, shape, bases, setup.targets, setup.rank, base_model="synthetic-aligned")
    adapter_marker(root, setup).write_text(json.dumps(setup.record()))
    return root


def ensure_multi(data_dir: Path, setup: Setup) -> list[Path]:
    """The multi-adapter row's adapters: same targets and rank as `setup`'s, seeds MULTI_SEED + i."""
    root = ensure_trio(data_dir, setup)
    dirs = multi_dirs(root)
    if multi_ready(root, setup):
        return dirs
    if (root / MULTI_DIR).exists():
        shutil.rmtree(root / MULTI_DIR)
    log(f"writing {len(dirs)} adapters to {root / MULTI_DIR} (once; cached) ...")
    shape = shape_of(setup)
    bases = recovered_bases(root, shape, setup.targets)
    for i, path in enumerate(dirs):
        write_adapter(path, shape, bases, setup.targets, setup.rank, seed=MULTI_SEED + i,
                      base_model="synthetic-aligned")
    (root / f"{MULTI_DIR}.json").write_text(json.dumps(multi_record(setup)))
    return dirs


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
    if "--multi" in sys.argv[3:]:
        ensure_multi(Path(sys.argv[1]), SETUPS[sys.argv[2]])
    else:
        ensure_trio(Path(sys.argv[1]), SETUPS[sys.argv[2]])
