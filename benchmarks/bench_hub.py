"""Bytes a Hub model costs: tensors fetched by range against the whole shards holding them.

    python benchmarks/bench_hub.py [--work DIR] [--only 1b-qv,7b-all]

Each setup's model is served by the loopback stand-in Hub of tests/hub_server.py from sparse files:
a real safetensors header (the tensor names, dtypes and shapes of the shape in `safelora_cli.demo`,
laid out in name order as safetensors writes them), the file then extended to its full size, so
a 13.5 GB 7B model costs no disk and its "weights" are zeros (enough to count bytes). What is
measured is the fetch step only: `sources.resolve_model` for one model (pin, index, config.json,
headers, tensor ranges into the tensor cache), first with empty caches, then again (a rerun).
The rank of the LoRA does not change what is read from the model, only the adapter's own file.
Every tensor of a target module is needed, in every layer, as for a real LoRA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402
from hub_server import FakeRepo, HubServer  # noqa: E402
from huggingface_hub import constants  # noqa: E402

from safelora_cli import sources  # noqa: E402
from safelora_cli.demo import SHAPE_1B, SHAPE_7B, LlamaShape  # noqa: E402

# Llama-3-8B's geometry (grouped-query attention, 128k vocabulary), the model of the CI job the
# range reads were made for; its 4 shards are approximated by 9 layers each.
SHAPE_8B = LlamaShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    shape: LlamaShape
    layers_per_shard: int | None  # None: one model.safetensors
    targets: tuple[str, ...]


CASES = {
    "1b-qv": Case("1b-qv", "1.1B shape, q_proj/v_proj (r = 8)", SHAPE_1B, None, ("q_proj", "v_proj")),
    "1b-all": Case("1b-all", "1.1B shape, all 7 linear (r = 16)", SHAPE_1B, None, ALL_LINEAR),
    "7b-qv": Case("7b-qv", "7B shape, q_proj/v_proj (r = 8)", SHAPE_7B, 8, ("q_proj", "v_proj")),
    "7b-all": Case("7b-all", "7B shape, all 7 linear (r = 16)", SHAPE_7B, 8, ALL_LINEAR),
    "8b-qv": Case("8b-qv", "Llama-3-8B shape, q_proj/v_proj (r = 8)", SHAPE_8B, 9, ("q_proj", "v_proj")),
}


def tensor_shapes(shape: LlamaShape, layers: range, last: bool) -> dict[str, tuple[int, ...]]:
    """The tensors of a shard holding `layers` (and embeddings, norm and head when `last`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in layers:
        shapes.update({f"model.layers.{i}.{n}.weight": s for n, s in shape.linear_shapes().items()})
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (shape.hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (shape.hidden,)
    if last:
        shapes.update({"model.embed_tokens.weight": (shape.vocab, shape.hidden),
                       "lm_head.weight": (shape.vocab, shape.hidden), "model.norm.weight": (shape.hidden,)})
    return shapes


def write_sparse(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file with a real header and zero (sparse) data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        size = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + offset)


def write_model(folder: Path, case: Case) -> dict[str, str]:
    """The sparse model of `case` in `folder`; its weight map (empty for a single file)."""
    folder.mkdir(parents=True)
    shape = case.shape
    (folder / "config.json").write_text(json.dumps(shape.hf_config(torch.bfloat16)))
    per = case.layers_per_shard or shape.layers
    count = -(-shape.layers // per)
    weight_map: dict[str, str] = {}
    for n, first in enumerate(range(0, shape.layers, per), start=1):
        name = "model.safetensors" if count == 1 else f"model-{n:05d}-of-{count:05d}.safetensors"
        shapes = tensor_shapes(shape, range(first, min(first + per, shape.layers)), n == count)
        write_sparse(folder / name, shapes)
        weight_map.update(dict.fromkeys(shapes, name))
    if count > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map if count > 1 else {}


def point_at(server: HubServer, work: Path) -> None:
    constants.ENDPOINT = server.url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_OFFLINE = False
    constants.HF_HUB_CACHE = str(work / "hf-cache")
    constants.HF_TOKEN_PATH = str(work / "no-token")
    os.environ.pop("HF_TOKEN", None)
    os.environ.pop("SAFELORA_HUB_DOWNLOAD", None)
    os.environ["SAFELORA_CACHE"] = str(work / "safelora-cache")


def selector(targets: tuple[str, ...]):  # type: ignore[no-untyped-def]
    def needed(names: Collection[str]) -> list[str]:
        return [n for n in names if n.startswith("model.layers.") and n.split(".")[-2] in targets]

    return needed


def measure(case: Case, work: Path, repeat: int) -> dict[str, object]:
    folder = work / "model"
    weight_map = write_model(folder, case)
    files = {p.name: p for p in folder.iterdir()}
    server = HubServer().start()
    try:
        server.repos["org/model"] = FakeRepo()
        server.repos["org/model"].add_commit(dict(files))
        point_at(server, work)
        needed = selector(case.targets)
        seconds, served, requests = [], 0, 0
        for _ in range(repeat):
            for cache in ("hf-cache", "safelora-cache"):
                shutil.rmtree(work / cache, ignore_errors=True)
            server.served.clear()
            server.log.clear()
            start = time.perf_counter()
            checkpoint, origin = sources.resolve_model("org/model", None, None, "base", needed)
            seconds.append(time.perf_counter() - start)
            served, requests = sum(server.served.values()), len(server.file_requests())
            assert origin.bytes_downloaded == served, (origin.bytes_downloaded, served)
        server.log.clear()
        again = sources.resolve_model("org/model", None, None, "base", needed)[1]
        rerun_requests = len(server.file_requests())
    finally:
        server.stop()
    names = set(needed(list(weight_map) or list(checkpoint.listed)))
    holding = {weight_map.get(n, "model.safetensors") for n in names}
    tensor_bytes = sum(checkpoint.tensors[n].nbytes for n in names)
    whole = sum(files[s].stat().st_size for s in holding)
    small = sum(p.stat().st_size for p in files.values() if p.suffix == ".json")
    model = sum(p.stat().st_size for p in files.values() if p.suffix == ".safetensors")
    shutil.rmtree(work)
    return {"case": case.name, "label": case.label, "model_bytes": model, "whole_shards_bytes": whole + small,
            "needed_tensor_bytes": tensor_bytes, "downloaded_bytes": served, "requests": requests,
            "ratio": served / (whole + small), "fetch_s_median": statistics.median(seconds),
            "rerun_bytes": again.bytes_downloaded, "rerun_requests": rerun_requests}


def gb(n: object) -> str:
    return f"{int(n) / 1e9:.2f} GB"  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases: " + ", ".join(CASES))
    parser.add_argument("--repeat", type=int, default=1, help="fetches per case (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-hub-"))
    rows = [measure(CASES[name], root / name, args.repeat) for name in args.only.split(",")]
    print("| setup | model | whole shards (today) | downloaded | needed tensors | ratio | requests | fetch s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {gb(r['model_bytes'])} | {gb(r['whole_shards_bytes'])} | {gb(r['downloaded_bytes'])} "
              f"| {gb(r['needed_tensor_bytes'])} | {float(r['ratio']):.3f} | {r['requests']} "  # type: ignore[arg-type]
              f"| {float(r['fetch_s_median']):.1f} |")  # type: ignore[arg-type]
        assert r["rerun_bytes"] == 0 and r["rerun_requests"] == 0, r
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
