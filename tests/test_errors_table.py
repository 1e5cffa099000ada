"""Every row of docs/errors.md, run: the bad input, the documented message and exit code.

The table in docs/errors.md is the source of the expectations; `SCENARIOS` holds how to make
each bad input. A row without a scenario, or a scenario without a row, fails the suite.
"""

from __future__ import annotations

import errno
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import Trio
from helpers import run_cli, tree_digest
from safetensors.torch import load_file, save_file
from test_bad_inputs import copy_trio, edit_tensors, set_adapter_config

from safelora_cli import outputs, placement, writer
from safelora_cli.subspace_file import METADATA_KEY

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
# Rows handled by other test modules (named in the table) rather than here.
ELSEWHERE = {"pickle-code", "out-changed", "patched-b-overflow", "factors-too-large", "stdout-unwritable",
             "demo-not-a-directory", "eval-no-prompts-file", "eval-bad-json-line", "eval-bad-expect",
             "eval-empty-prompts", "eval-bad-marker", "eval-gate-unmeasurable", "eval-missing-extra",
             "subspace-dora",
             # Hub models read by range: the stand-in Hub of tests/test_hub_ranges.py makes them
             "hub-download-mode", "hub-short-read", "hub-range-ignored", "hub-wrong-range", "hub-bad-header",
             "hub-shard-outside", "hub-cache-unwritable", "hub-cache-in-input"}
Q0 = "model.layers.0.self_attn.q_proj"
A_KEY, B_KEY = f"base_model.model.{Q0}.lora_A.weight", f"base_model.model.{Q0}.lora_B.weight"


class Ctx:
    """A scenario's copy of the trio, a scratch directory and pytest's monkeypatch."""

    def __init__(self, trio: Trio, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.trio, self.tmp, self.mp = trio, tmp, monkeypatch
        self.out = tmp / "out"

    def patch(self, *extra: object, base: object = None, aligned: object = None, adapter: object = None,
              out: object = None) -> list[object]:
        return ["patch", "--base", base or self.trio.base, "--aligned", aligned or self.trio.aligned,
                "--adapter", adapter or self.trio.adapter, "--out", out or self.out, "--device", "cpu", *extra]

    def inspect(self, *extra: object) -> list[object]:
        return ["inspect", "--base", self.trio.base, "--aligned", self.trio.aligned, "--adapter", self.trio.adapter,
                *extra]


def _header(file: Path, edit: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    """Rewrite a safetensors header in place (keeping the data) after `edit` changes it."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def _index(c: Ctx) -> Path:
    """Turn the single-file base into a two-shard checkpoint with an index; return the index path."""
    tensors = load_file(str(c.trio.base / "model.safetensors"))
    (c.trio.base / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(c.trio.base / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = c.trio.base / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _zero_lora_b(c: Ctx) -> None:
    path = c.trio.adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def _index_edit(c: Ctx, edit: Callable[[dict[str, str]], None]) -> list[object]:
    index = _index(c)
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return c.patch()


def _adapter_tensors(c: Ctx, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    edit_tensors(c.trio.adapter / "adapter_model.safetensors", edit)


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = value(t[key])

    return edit


def _write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _deny_reading(c: Ctx, root: Path) -> None:
    from safelora_cli import safetensors_io

    real = safetensors_io.safe_open

    def safe_open(path: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if Path(path).parent == root:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, *args, **kwargs)

    c.mp.setattr(safetensors_io, "safe_open", safe_open)


def _deny_lookup(c: Ctx, denied: Path) -> None:
    """The OS refusing to search a directory on the way to `denied` (root ignores chmod in CI); only
    the path resolution sees it, through a stand-in for the `os` module of `sources`."""
    import os
    import types

    from safelora_cli import sources

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if Path(str(path)) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return os.stat(path, *args, **kwargs)  # type: ignore[arg-type]

    stand_in = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    stand_in.stat = stat
    c.mp.setattr(sources, "os", stand_in)


def _rename_lora_keys(c: Ctx, rename: Callable[[str], str]) -> None:
    _adapter_tensors(c, lambda t: t.update({rename(k): t.pop(k) for k in list(t)}))


def _add_raw_tensor(file: Path, name: str, dtype: str, shape: list[int], data: bytes) -> None:
    """Append a tensor in a dtype torch may not know, by editing the header and the data."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    size = len(raw) - 8 - n
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [size, size + len(data)]}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :] + data)


def _replace(path: Path, new_name: str, data: bytes | str) -> Path:
    """Remove `path` and write `data` as `new_name` beside it (e.g. a .bin instead of a .safetensors)."""
    path.unlink()
    _write(path.parent / new_name, data)
    return path.parent / new_name


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\noid sha256:"
               "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
HTML_PAGE = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Log in to continue</body></html>\n"


def _enospc(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_mkdtemp(*_args: object, **_kwargs: object) -> str:
    raise PermissionError(errno.EACCES, "Permission denied")


SCENARIOS: dict[str, Callable[[Ctx], list[object]]] = {
    # --- paths
    "base-missing": lambda c: c.patch(base=c.tmp / "nowhere"),
    "aligned-missing": lambda c: c.patch(aligned=c.tmp / "nowhere"),
    "adapter-missing": lambda c: c.patch(adapter=c.tmp / "nowhere"),
    # `adapter/` exists in the working directory: a typo, not a Hub id (the Hub, offline here, is asked too).
    "adapter-typo-beside-local": lambda c: c.mp.chdir(c.tmp / "in") or c.patch(adapter="adapter/nope"),
    "adapter-bare-name-missing": lambda c: c.mp.chdir(c.tmp / "in") or c.patch(adapter="nope"),
    "adapter-dangling-link": lambda c: (c.tmp / "in" / "link").symlink_to(c.tmp / "gone")
    or c.patch(adapter=c.tmp / "in" / "link"),
    "path-not-utf8": lambda c: c.patch(base=str(c.tmp) + "/ba\udcffse"),
    "path-too-long": lambda c: c.patch(base=c.tmp / ("b" * 300)),
    "path-not-searchable": lambda c: _deny_lookup(c, c.trio.base) or c.patch(),
    "base-empty-dir": lambda c: [p.unlink() for p in c.trio.base.iterdir()] and c.patch(),
    "adapter-empty-dir": lambda c: [p.unlink() for p in c.trio.adapter.iterdir()] and c.patch(),
    "adapter-is-file": lambda c: c.patch(adapter=c.trio.adapter / "adapter_config.json"),
    "base-no-checkpoint": lambda c: (c.trio.base / "model.safetensors").unlink() or c.patch(),
    # Runs as root in CI, where chmod cannot deny a read: simulate the OS refusing to open the file.
    "base-unreadable": lambda c: _deny_reading(c, c.trio.base) or c.patch(),
    # --- adapter config
    "config-missing": lambda c: (c.trio.adapter / "adapter_config.json").unlink() or c.patch(),
    "config-not-json": lambda c: _write(c.trio.adapter / "adapter_config.json", "{not json") or c.patch(),
    "config-not-object": lambda c: _write(c.trio.adapter / "adapter_config.json", "[1, 2]") or c.patch(),
    "config-not-lora": lambda c: set_adapter_config(c.trio, peft_type="IA3") or c.patch(),
    "config-dora": lambda c: set_adapter_config(c.trio, use_dora=True) or c.patch(),
    "config-bad-alpha": lambda c: set_adapter_config(c.trio, lora_alpha="sixteen") or c.patch(),
    "config-string-boolean": lambda c: set_adapter_config(c.trio, fan_in_fan_out="false") or c.patch(),
    "config-bad-rank": lambda c: set_adapter_config(c.trio, r=0) or c.patch(),
    "config-bad-rank-pattern": lambda c: set_adapter_config(c.trio, rank_pattern={"q_proj": float("inf")})
    or c.patch(),
    "config-pattern-not-object": lambda c: set_adapter_config(c.trio, alpha_pattern=[1]) or c.patch(),
    "config-infinite-alpha": lambda c: set_adapter_config(c.trio, lora_alpha=float("inf")) or c.patch(),
    "config-bad-alpha-pattern": lambda c: set_adapter_config(c.trio, alpha_pattern={"q_proj(": 4}) or c.patch(),
    # --- adapter weights
    "adapter-no-weights": lambda c: (c.trio.adapter / "adapter_model.safetensors").unlink() or c.patch(),
    "adapter-no-lora-keys": lambda c: save_file({"x": torch.zeros(2)},
                                                 str(c.trio.adapter / "adapter_model.safetensors")) or c.patch(),
    "adapter-unprefixed-keys": lambda c: _rename_lora_keys(c, lambda k: k.removeprefix("base_model.model."))
    or c.patch(),
    "adapter-misnamed-keys": lambda c: _rename_lora_keys(
        c, lambda k: k.replace("lora_A.weight", "lora_A.default.weight") if k == A_KEY else k) or c.patch(),
    "adapter-fp8-dtype": lambda c: _adapter_tensors(c, _set(B_KEY, lambda b: b.to(torch.float8_e4m3fn)))
    or c.patch(),
    "adapter-dtype-torch-lacks": lambda c: _add_raw_tensor(c.trio.adapter / "adapter_model.safetensors",
                                                           "extra.weight", "F6_E2M3", [4], b"\x01\x02\x03")
    or c.patch(),
    "adapter-half-module": lambda c: _adapter_tensors(c, lambda t: t.pop(B_KEY)) or c.patch(),
    "adapter-rank-mismatch": lambda c: _adapter_tensors(c, _set(A_KEY, lambda a: a[:-1].clone())) or c.patch(),
    "adapter-int-dtype": lambda c: _adapter_tensors(c, _set(A_KEY, lambda a: a.to(torch.int32))) or c.patch(),
    "adapter-half-embedding": lambda c: _adapter_tensors(c, lambda t: t.update(
        {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 64)})) or c.patch(),
    "lora-shape-vs-weight": lambda c: _adapter_tensors(c, _set(A_KEY, lambda a: torch.cat([a, a], 1))) or c.patch(),
    "inf-in-lora-b": lambda c: _adapter_tensors(c, _set(B_KEY, lambda b: b.index_fill(0, torch.tensor([1]),
                                                                                      float("inf")))) or c.patch(),
    # --- safetensors files
    "safetensors-truncated": lambda c: _write(c.trio.base / "model.safetensors",
                                              (c.trio.base / "model.safetensors").read_bytes()[:5000]) or c.patch(),
    "safetensors-garbage": lambda c: _write(c.trio.adapter / "adapter_model.safetensors", b"\x00garbage" * 9)
    or c.patch(),
    "weights-lfs-pointer": lambda c: _write(c.trio.base / "model.safetensors", LFS_POINTER) or c.patch(),
    "weights-html": lambda c: _write(c.trio.adapter / "adapter_model.safetensors", HTML_PAGE) or c.patch(),
    "weights-json": lambda c: _replace(c.trio.base / "model.safetensors", "pytorch_model.bin",
                                       '{"error": "Repository not found"}') and c.patch(),
    "weights-text": lambda c: _replace(c.trio.adapter / "adapter_model.safetensors", "adapter_model.bin",
                                       "Access denied\n") and c.patch(),
    "weights-empty": lambda c: _write(c.trio.base / "model.safetensors", b"") or c.patch(),
    "safetensors-header-too-long": lambda c: _write(
        c.trio.base / "model.safetensors",
        struct.pack("<Q", 10**9) + (c.trio.base / "model.safetensors").read_bytes()[8:]) or c.patch(),
    "safetensors-header-bad-json": lambda c: _write(c.trio.base / "model.safetensors",
                                                    struct.pack("<Q", 8) + b'{"a": [}') or c.patch(),
    "safetensors-offsets-out-of-range": lambda c: _header(
        c.trio.aligned / "model.safetensors",
        lambda h: h[f"{Q0}.weight"].update(data_offsets=[0, 10**8])) or c.patch(),
    # --- sharded checkpoints
    "index-not-json": lambda c: _write(_index(c), "{oops") or c.patch(),
    "index-no-weight-map": lambda c: _write(_index(c), '{"metadata": {}}') or c.patch(),
    "index-missing-shard": lambda c: _index_edit(
        c, lambda m: m.update({"x.weight": "model-00009-of-00009.safetensors"})),
    "index-lists-absent-tensor": lambda c: _index_edit(
        c, lambda m: m.update({"ghost.weight": "model-00001-of-00002.safetensors"})),
    # --- checkpoint contents
    "base-module-missing": lambda c: edit_tensors(c.trio.base / "model.safetensors",
                                                  lambda t: t.pop(f"{Q0}.weight")) or c.patch(),
    "aligned-module-missing": lambda c: edit_tensors(c.trio.aligned / "model.safetensors",
                                                     lambda t: t.pop(f"{Q0}.weight")) or c.patch(),
    "shape-mismatch": lambda c: edit_tensors(c.trio.aligned / "model.safetensors",
                                             _set(f"{Q0}.weight", lambda w: torch.cat([w, w[:1]]))) or c.patch(),
    "quantized-weight": lambda c: edit_tensors(c.trio.base / "model.safetensors",
                                               _set(f"{Q0}.weight", lambda w: w.to(torch.int8))) or c.patch(),
    "nan-in-aligned": lambda c: edit_tensors(c.trio.aligned / "model.safetensors",
                                             _set(f"{Q0}.weight", lambda w: w.index_fill(0, torch.tensor([0]),
                                                                                         float("nan")))) or c.patch(),
    # --- output
    "out-is-input": lambda c: c.patch("--force", out=c.trio.adapter),
    "out-inside-input": lambda c: c.patch(out=c.trio.adapter / "patched"),
    "out-contains-input": lambda c: c.patch("--force", out=c.trio.adapter.parent),
    "out-is-link": lambda c: c.tmp.joinpath("link").symlink_to(c.tmp / "elsewhere") or c.patch(out=c.tmp / "link"),
    "out-not-ours": lambda c: c.out.mkdir() or _write(c.out / "notes.txt", "mine") or c.patch("--force"),
    "outputs-overlap": lambda c: c.patch("--report-md", c.out / "adapter_model.safetensors"),
    "out-name-too-long": lambda c: c.patch(out=c.tmp / ("o" * 300)),
    "same-model": lambda c: c.patch(aligned=c.trio.base),
    "nothing-evaluated": lambda c: _zero_lora_b(c) or c.patch(),
    "out-is-file": lambda c: _write(c.tmp / "file", "x") or c.patch(out=c.tmp / "file"),
    "out-exists": lambda c: c.out.mkdir() or c.patch(),
    "out-parent-is-file": lambda c: _write(c.tmp / "file", "x") or c.patch(out=c.tmp / "file" / "out"),
    # Simulated: the OS reports the parent as not writable (root ignores chmod in CI).
    "out-parent-not-writable": lambda c: c.mp.setattr(outputs.os, "access", lambda *a: False) or c.patch(),
    # Simulated: creating the staging directory is refused after the checks passed (a race, or an ACL).
    "out-create-denied": lambda c: c.mp.setattr(placement.tempfile, "mkdtemp", _no_mkdtemp) or c.patch(),
    # Simulated: the disk fills up while the weights are written.
    "disk-full": lambda c: c.mp.setattr(writer, "write_safetensors", _enospc) or c.patch(),
    "report-md-is-dir": lambda c: c.patch("--report-md", c.tmp),
    "plot-inside-input": lambda c: c.patch("--plot", c.trio.base / "p.png"),
    "plot-without-matplotlib": lambda c: c.mp.setitem(__import__("sys").modules, "matplotlib", None)
    or c.patch("--plot", c.tmp / "p.png"),
    # --- options
    "threshold-and-top-k": lambda c: c.patch("--threshold", "0.3", "--top-k", "2"),
    "top-k-negative": lambda c: c.patch("--top-k", "-1"),
    "threshold-out-of-range": lambda c: c.patch("--threshold", "2"),
    "exact-without-rank": lambda c: c.patch("--projection", "exact"),
    "rank-without-exact": lambda c: c.patch("--rank", "4"),
    "energy-out-of-range": lambda c: c.patch("--projection", "exact", "--energy", "1.5"),
    "max-selected-malformed": lambda c: c.patch("--max-selected", "lots"),
    "key-map-unknown-group": lambda c: c.inspect("--key-map", "(?P<a>model)=\\g<b>"),
    "fail-below-out-of-range": lambda c: c.inspect("--fail-below", "3"),
    "missing-option": lambda c: ["patch", "--base", c.trio.base],
    "unknown-device": lambda c: c.inspect("--device", "tpu"),
    "demo-dir-not-empty": lambda c: ["demo", c.trio.base],
    # --- subspace files
    "subspace-with-models": lambda c: ["inspect", "--subspace", c.trio.base, "--base", c.trio.base, "--adapter",
                                       c.trio.adapter],
    "no-base-no-subspace": lambda c: ["inspect", "--adapter", c.trio.adapter],
    "subspace-not-ours": lambda c: ["inspect", "--subspace", c.trio.aligned, "--adapter", c.trio.adapter],
    "subspace-as-model": lambda c: ["inspect", "--base", _subspace(c), "--aligned", c.trio.aligned, "--adapter",
                                    c.trio.adapter],
    "subspace-missing-modules": lambda c: ["inspect", "--subspace", _subspace(c, "--modules", "q_proj"),
                                           "--adapter", c.trio.adapter],
    "subspace-newer-format": lambda c: ["inspect", "--subspace", _edited_subspace(c, lambda d: d.update(version=99)),
                                        "--adapter", c.trio.adapter],
    "subspace-records-disagree": lambda c: ["inspect", "--subspace", _edited_subspace(
        c, lambda d: d["entries"][f"{Q0}.weight"].update(shape=[3, 3])), "--adapter", c.trio.adapter],
    "subspace-low-rank-exact-projection": lambda c: ["inspect", "--subspace", _subspace(c, "--adapter", c.trio.adapter,
                                                                                     "--rank", "2"),
                                                     "--adapter", c.trio.adapter, "--projection", "exact", "--rank",
                                                     "2"],
    "subspace-adapter-and-modules": lambda c: _subspace_args(c, "--modules", "q_proj"),
    "subspace-rank-and-energy": lambda c: _subspace_args(c, "--rank", "2", "--energy", "0.5"),
    "subspace-bad-rank": lambda c: _subspace_args(c, "--rank", "0"),
    "subspace-bad-energy": lambda c: _subspace_args(c, "--energy", "1.5"),
    "subspace-bad-dtype": lambda c: _subspace_args(c, "--dtype", "int8"),
    "subspace-dtype-low-rank": lambda c: _subspace_args(c, "--rank", "2", "--dtype", "bfloat16"),
    "subspace-modules-unknown": lambda c: ["subspace", "--base", c.trio.base, "--aligned", c.trio.aligned,
                                           "--modules", "nope", "--out", c.out],
    "subspace-modules-no-aligned": lambda c: ["subspace", "--base", c.trio.base, "--modules", "q_proj", "--out", c.out],
    "subspace-out-not-ours": lambda c: c.out.mkdir() or _write(c.out / "notes.txt", "mine") or _subspace_args(
        c, "--force"),
    "subspace-fp16-overflow": lambda c: edit_tensors(c.trio.aligned / "model.safetensors",
                                                     _set(f"{Q0}.weight", lambda w: w.index_fill(0, torch.tensor([0]),
                                                                                                 1e6)))
    or _subspace_args(c, "--dtype", "float16"),
}


def _subspace_args(c: Ctx, *extra: object) -> list[object]:
    return ["subspace", "--base", c.trio.base, "--aligned", c.trio.aligned, "--adapter", c.trio.adapter,
            "--out", c.out, "--device", "cpu", *extra]


def _subspace(c: Ctx, *extra: object) -> Path:
    """A subspace file written among the inputs (so the check that nothing is written still holds)."""
    where = c.tmp / "in" / "sub"
    args = ["subspace", "--base", c.trio.base, "--aligned", c.trio.aligned, "--out", where, "--device", "cpu", "-q"]
    result = run_cli(*args, *(extra or ("--adapter", c.trio.adapter)))
    assert result.exit_code == 0, result.stderr
    return where


def _edited_subspace(c: Ctx, edit: Callable[[dict], None]) -> Path:  # type: ignore[type-arg]
    """A subspace file whose header document `edit` changed."""
    where = _subspace(c)

    def change(header: dict) -> None:  # type: ignore[type-arg]
        document = json.loads(header["__metadata__"][METADATA_KEY])
        edit(document)
        header["__metadata__"][METADATA_KEY] = json.dumps(document)

    _header(where / "model.safetensors", change)
    return where


def doc_rows() -> dict[str, tuple[str, int]]:
    """id → (message pattern, exit code) from the table in docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) == 4:
            rows[cells[0].strip("`")] = (cells[2].strip("`").replace("\\|", "|"), int(cells[3]) if cells[3].isdigit()
                                         else -1)
    return rows


def test_every_documented_row_has_a_scenario_and_every_scenario_a_row() -> None:
    assert set(doc_rows()) - ELSEWHERE == set(SCENARIOS)
    assert len(doc_rows()) >= 30


def matches(pattern: str, text: str) -> bool:
    """`…` in the documented message stands for a variable part (a path, a number)."""
    regex = ".*?".join(re.escape(part) for part in pattern.split("…"))
    return re.search(regex, text) is not None


@pytest.mark.parametrize("case", sorted(SCENARIOS))
def test_documented_error(case: str, llama_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message, code = doc_rows()[case]
    ctx = Ctx(copy_trio(llama_trio, tmp_path / "in"), tmp_path, monkeypatch)
    args = SCENARIOS[case](ctx)
    before = tree_digest(tmp_path / "in")
    siblings = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(*args)
    assert result.exit_code == code, result.stderr
    if case == "missing-option":  # Click's own usage error: its usage text, then the error
        assert "Missing option '--adapter'" in result.stderr
        return
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    assert matches(message, result.stderr), (message, result.stderr)
    assert result.stdout == ""
    assert tree_digest(tmp_path / "in") == before  # inputs untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # nothing written, no staging left


def test_disk_full_leaves_no_partial_output(llama_trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated ENOSPC half-way through the weights file: the staging directory is removed."""
    real = writer.write_safetensors

    def half_then_enospc(path: Path, tensors: dict, metadata: dict) -> None:  # type: ignore[type-arg]
        real(path, tensors, metadata)
        path.write_bytes(path.read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_safetensors", half_then_enospc)
    result = run_cli("patch", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--adapter",
                     llama_trio.adapter, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "No space left on the device" in result.stderr
    assert list(tmp_path.iterdir()) == []
