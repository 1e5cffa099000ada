"""The patched adapter's model card (README.md): Hub front matter and a "Safe LoRA" section.

A card is published with the adapter, so it names local inputs by their directory name only;
the full paths stay in safelora_report.json. The section is fenced so that patching a patched
adapter replaces it instead of stacking a second one.
"""

from __future__ import annotations

import re

from safelora_cli.markdown import public_source, to_markdown
from safelora_cli.report import Report

CARD_BEGIN = "<!-- safelora:begin -->"
CARD_END = "<!-- safelora:end -->"
TAGS = ("lora", "peft", "safe-lora")
_FRONT = re.compile(r"\A---\n(.*?\n)?---\n", re.DOTALL)
_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*):")


def _drop_key(lines: list[str], key: str) -> list[str]:
    """`lines` without the top-level `key` and the indented or list lines that belong to it."""
    out, skipping = [], False
    for line in lines:
        if _TOP_KEY.match(line):
            skipping = line.startswith(f"{key}:")
        elif not line.startswith((" ", "-")):
            skipping = False
        if not skipping:
            out.append(line)
    return out


def _front_matter(existing: str, base_model: str) -> str:
    """`existing` front matter (YAML lines) naming `base_model` (the model the patched adapter
    applies to), with PEFT's library name and our tags added where missing.

    Only top-level keys are looked at, and only `base_model` is replaced: PEFT writes the local
    path it trained from there, which a published card should not carry.
    """
    lines = _drop_key(existing.splitlines(), "base_model")
    keys = {m.group(1) for line in lines if (m := _TOP_KEY.match(line))}
    out = [f"base_model: {base_model}", *lines]
    out += [f"{key}: {value}" for key, value in (("base_model_relation", "adapter"), ("library_name", "peft"))
            if key not in keys]
    if "tags" in keys:
        start = next(i for i, line in enumerate(out) if line.startswith("tags:"))
        end = start + 1
        while end < len(out) and out[end].lstrip().startswith("- "):
            end += 1
        present = {line.split("-", 1)[1].strip() for line in out[start + 1:end]}
        if out[start].strip() == "tags:":  # a block list; a flow list `[a, b]` is left as it is
            out[end:end] = [f"- {tag}" for tag in TAGS if tag not in present]
    else:
        out += ["tags:", *(f"- {tag}" for tag in TAGS)]
    return "---\n" + "\n".join(out) + "\n---\n"


def model_card(existing: str | None, report: Report, adapter_title: str) -> str:
    """The adapter's README.md with front matter completed and its Safe LoRA section added or replaced."""
    card = existing if existing is not None else ""
    match = _FRONT.match(card)
    front, body = (match.group(1) or "", card[match.end():]) if match else ("", card)
    if CARD_BEGIN in body and CARD_END in body.split(CARD_BEGIN, 1)[1]:
        before, rest = body.split(CARD_BEGIN, 1)
        body = before + rest.split(CARD_END, 1)[1].lstrip("\n")
    if not body.strip():
        body = f"# {adapter_title}\n\nA PEFT LoRA adapter, patched with Safe LoRA.\n"
    section = to_markdown(report, public=True)
    front = _front_matter(front, public_source(report["inputs"]["aligned"]))
    return f"{front}\n{body.strip()}\n\n{CARD_BEGIN}\n{section}{CARD_END}\n"
