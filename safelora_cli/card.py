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


def _front_matter(existing: str, defaults: dict[str, str]) -> str:
    """`existing` front matter (YAML lines) with the keys it lacks added and our tags appended.

    Only top-level keys are looked at: a card's own values (e.g. PEFT's `base_model`) are kept.
    """
    lines = existing.splitlines()
    keys = {m.group(1) for line in lines if (m := _TOP_KEY.match(line))}
    out = list(lines)
    for key, value in defaults.items():
        if key not in keys:
            out.append(f"{key}: {value}")
    if "tags" in keys:
        start = next(i for i, line in enumerate(out) if line.startswith("tags:"))
        end = start + 1
        while end < len(out) and out[end].startswith(("- ", "  -")):
            end += 1
        present = {line.split("-", 1)[1].strip() for line in out[start + 1:end]}
        if out[start].strip() == "tags:":
            out[end:end] = [f"- {tag}" for tag in TAGS if tag not in present]
    else:
        out += ["tags:", *(f"- {tag}" for tag in TAGS)]
    return "---\n" + "\n".join(out) + "\n---\n"


def model_card(existing: str | None, report: Report, adapter_title: str) -> str:
    """The adapter's README.md with front matter completed and its Safe LoRA section added or replaced."""
    defaults = {"base_model": public_source(report["inputs"]["aligned"]),
                "base_model_relation": "adapter", "library_name": "peft"}
    card = existing if existing is not None else ""
    match = _FRONT.match(card)
    front, body = (match.group(1) or "", card[match.end():]) if match else ("", card)
    if CARD_BEGIN in body and CARD_END in body.split(CARD_BEGIN, 1)[1]:
        before, rest = body.split(CARD_BEGIN, 1)
        body = before + rest.split(CARD_END, 1)[1].lstrip("\n")
    if not body.strip():
        body = f"# {adapter_title}\n\nA PEFT LoRA adapter, patched with Safe LoRA.\n"
    section = to_markdown(report, public=True)
    return f"{_front_matter(front, defaults)}\n{body.strip()}\n\n{CARD_BEGIN}\n{section}{CARD_END}\n"
