"""The steps of gpu_check.py that need torch, each run in a child process that prints one JSON line.

    python benchmarks/gpu_steps.py _env
    python benchmarks/gpu_steps.py _trio ROOT RECORD_JSON   # {"kind": "llama" or "wide", "shape", "per_shard", ...}
    python benchmarks/gpu_steps.py _agree ROOT WORK DEVICE DEVICE
    python benchmarks/gpu_steps.py _subspace ROOT WORK DEVICE DEVICE

The orchestrating process never imports torch (its RSS would count in every measured child's
peak RSS, see bench_measure.py), so whatever needs torch or safelora_cli happens here. The
agreement steps go through the public API (`safelora_cli.patch`, `.subspace`, `.inspect`), each
device writing its own output directory, and compare what was written.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import safelora_cli

GB = 1e9
TRIO_MARKER = "gpu-check-trio.json"
# The three rules of the agreement step, as keyword arguments of safelora_cli.patch.
RULES: dict[str, dict[str, object]] = {
    "threshold 0.5": {"threshold": 0.5},
    "top-k 5": {"top_k": 5},
    "exact, rank 4": {"threshold": 0.5, "projection": "exact", "rank": 4},
}
SUBSPACE_KINDS: dict[str, dict[str, object]] = {"exact": {}, "rank 8": {"rank": 8}}


def env_info() -> dict[str, object]:
    """Versions, and the GPU torch sees; importing the CLI here fails early when a dependency is missing."""
    import safetensors

    import safelora_cli.cli  # noqa: F401

    info: dict[str, object] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                               "cuda_version": torch.version.cuda, "safetensors": safetensors.__version__,
                               "safelora_cli": safelora_cli.__version__,
                               "safelora_cli_path": str(Path(safelora_cli.__file__).parent)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / GB, 1),
                    capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
    return info


def make_trio(root: Path, record: dict[str, Any]) -> dict[str, object]:
    """base/, aligned/ and adapter/ under `root` as `record` says, unless a trio with that record is there.

    Kind `llama` is bench_generate's chunked writer (peak memory one shard, as for `make bench`); `wide`
    is bench_wide's one-layer writer, one shard per weight. Written to ROOT.partial, then renamed,
    so an interrupted run never leaves a trio that looks finished.
    """
    from bench_generate import _write_models_chunked
    from bench_wide import write_wide_adapter, write_wide_models

    from safelora_cli.demo import LlamaShape, write_adapter

    marker = root / TRIO_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return {"generated_s": None, "bytes": _tree_bytes(root)}
    partial = root.with_name(root.name + ".partial")
    for stale in (root, partial):
        if stale.exists():
            shutil.rmtree(stale)
    start = time.perf_counter()
    shape = LlamaShape(**record["shape"])
    targets, rank = tuple(str(t) for t in record["targets"]), int(record["rank"])
    if record["kind"] == "wide":
        bases = write_wide_models(partial, shape)
        write_wide_adapter(partial / "adapter", shape, bases, targets, rank)
    else:
        bases = _write_models_chunked(partial, shape, int(record["per_shard"]))
        write_adapter(partial / "adapter", shape, bases, targets, rank, base_model="synthetic-aligned")
    (partial / TRIO_MARKER).write_text(json.dumps(record))
    partial.rename(root)
    return {"generated_s": time.perf_counter() - start, "bytes": _tree_bytes(root)}


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _compare_layers(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Cosines, error bounds and selections of two reports of the same layers."""
    a, b = first["layers"], second["layers"]
    same_modules = [x["module"] for x in a] == [y["module"] for y in b]
    cos_diff = bound_diff = 0.0
    undefined_mismatch = 0
    for x, y in zip(a, b, strict=False):
        if (x["cosine"] is None) != (y["cosine"] is None):
            undefined_mismatch += 1
        elif x["cosine"] is not None:
            cos_diff = max(cos_diff, abs(x["cosine"] - y["cosine"]))
        if x["cosine_error_bound"] is not None and y["cosine_error_bound"] is not None:
            bound_diff = max(bound_diff, abs(x["cosine_error_bound"] - y["cosine_error_bound"]))
    return {"layers": len(a), "selected": sum(bool(x["selected"]) for x in a), "same_modules": same_modules,
            "same_selection": same_modules and [x["selected"] for x in a] == [y["selected"] for y in b],
            "undefined_mismatch": undefined_mismatch, "max_cosine_diff": cos_diff, "max_bound_diff": bound_diff,
            "devices": [first["device"], second["device"]]}


def _rel_diff(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.double(), q.double()
    return float(torch.linalg.norm(p - q) / torch.linalg.norm(p).clamp_min(1e-30))


def agreement(root: Path, work: Path, devices: tuple[str, str], cos_tol: float, b_tol: float) -> dict[str, object]:
    """Patch the trio on both devices for every rule, into two directories; compare reports and tensors."""
    trio = {"base": root / "base", "aligned": root / "aligned", "adapter": root / "adapter"}
    results: dict[str, object] = {}
    for n, (name, rule) in enumerate(RULES.items()):
        reports, tensors, seconds = [], [], []
        for i, device in enumerate(devices):
            out = _fresh(work / f"agree-{n}-{i}")
            start = time.perf_counter()
            made = safelora_cli.patch(**trio, out=out, device=device, **rule)  # type: ignore[arg-type]
            seconds.append(time.perf_counter() - start)
            reports.append(made.report)
            tensors.append(load_file(str(out / "adapter_model.safetensors")))
        found = _compare_layers(*reports)
        keys = tensors[0].keys()
        b_keys = [k for k in keys if ".lora_B." in k]
        found["same_tensor_keys"] = keys == tensors[1].keys()
        found["max_rel_b_diff"] = max((_rel_diff(tensors[0][k], tensors[1][k]) for k in b_keys
                                       if k in tensors[1]), default=0.0)
        found["other_tensors_identical"] = all(torch.equal(tensors[0][k], tensors[1][k]) for k in keys
                                               if k not in b_keys and k in tensors[1])
        found["seconds"] = seconds
        found["ok"] = bool(found["same_selection"] and found["same_tensor_keys"] and found["other_tensors_identical"]
                           and not found["undefined_mismatch"] and found["max_cosine_diff"] <= cos_tol
                           and found["max_rel_b_diff"] <= b_tol and b_keys)
        results[name] = found
    return results


def _same_bytes(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    """Every tensor bit for bit (a byte view, so that NaNs and signed zeros count too)."""
    if first.keys() != second.keys():
        return False
    return all(first[k].dtype == second[k].dtype and first[k].shape == second[k].shape
               and torch.equal(first[k].contiguous().view(torch.uint8), second[k].contiguous().view(torch.uint8))
               for k in first)


def subspace_agreement(root: Path, work: Path, devices: tuple[str, str], cos_tol: float) -> dict[str, object]:
    """`subspace` exact and --rank 8 on both devices; then `inspect --subspace` of each file on its device."""
    adapter = root / "adapter"
    results: dict[str, object] = {}
    for n, (name, kwargs) in enumerate(SUBSPACE_KINDS.items()):
        files, seconds, reports = [], [], []
        for i, device in enumerate(devices):
            out = _fresh(work / f"subspace-{n}-{i}")
            start = time.perf_counter()
            safelora_cli.subspace(base=root / "base", aligned=root / "aligned", adapter=adapter, out=out,
                                  device=device, **kwargs)  # type: ignore[arg-type]
            seconds.append(time.perf_counter() - start)
            files.append(out / "model.safetensors")
            reports.append(safelora_cli.inspect(subspace=out, adapter=adapter, device=device).report)
        found = _compare_layers(*reports)
        found["file_bytes_identical"] = files[0].read_bytes() == files[1].read_bytes()
        found["tensors_identical"] = _same_bytes(load_file(str(files[0])), load_file(str(files[1])))
        found["file_mb"] = files[0].stat().st_size / 1e6
        found["seconds"] = seconds
        found["ok"] = bool(found["same_selection"] and not found["undefined_mismatch"]
                           and found["max_cosine_diff"] <= cos_tol and found["max_bound_diff"] <= cos_tol
                           and (found["tensors_identical"] or name != "exact"))
        results[name] = found
    return results


def child_main(argv: list[str]) -> int:
    step = argv[0]
    if step == "_env":
        out: object = env_info()
    elif step == "_trio":
        out = make_trio(Path(argv[1]), json.loads(argv[2]))
    elif step == "_agree":
        out = agreement(Path(argv[1]), Path(argv[2]), (argv[3], argv[4]), float(argv[5]), float(argv[6]))
    elif step == "_subspace":
        out = subspace_agreement(Path(argv[1]), Path(argv[2]), (argv[3], argv[4]), float(argv[5]))
    else:
        raise SystemExit(f"unknown step {step}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(child_main(sys.argv[1:]))
