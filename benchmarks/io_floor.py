"""Row (a), the I/O floor: read exactly the tensors a patch needs with safetensors, nothing else.

Usage: python io_floor.py MANIFEST.json [--backend mmap|pread]

The manifest lists (file, keys) pairs in on-disk order; an empty key list means every tensor
of the file (the adapter). Each tensor is touched at one element per 4 KiB page so that no
lazily mapped page goes unread, at negligible compute cost.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors import safe_open

PAGE = 4096


def touch(tensor: torch.Tensor) -> float:
    flat = tensor.reshape(-1)
    step = max(1, PAGE // tensor.element_size())
    return float(flat[::step].float().sum())


def main(argv: list[str]) -> None:
    manifest = argv[1]
    kwargs = {}
    if "--backend" in argv:
        kwargs["backend"] = argv[argv.index("--backend") + 1]
    with open(manifest) as fh:
        groups = json.load(fh)
    total = 0.0
    count = 0
    for file, keys in groups:
        with safe_open(file, framework="pt", device="cpu", **kwargs) as handle:
            for key in keys or list(handle.keys()):
                total += touch(handle.get_tensor(key))
                count += 1
    print(f"{count} tensors, checksum {total:.6g}")


if __name__ == "__main__":
    main(sys.argv)
