"""The subspace file's README.md: what it is, what it was made from, and how to use it.

Published with the file on the Hub, so local inputs are named by their directory name only; the
header's document keeps the full record.
"""

from __future__ import annotations

from typing import Any

from safelora_cli.markdown import public_source


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    return ""


def low_rank_summary(document: dict[str, Any]) -> str:
    """"k = 8–64, keeping 21–97% of ‖C‖²; largest dropped eigenvalue of C up to 3.1% of its largest"."""
    entries = [e for e in document["entries"].values() if "rank" in e]
    if not entries:
        return ""
    ranks = [e["rank"] for e in entries]
    kept = [e["energy_kept"] for e in entries]
    span = f"{min(ranks)}–{max(ranks)}" if min(ranks) != max(ranks) else f"{ranks[0]}"
    return (f"k = {span} of V's rank, keeping {100 * min(kept):.0f}–{100 * max(kept):.0f}% of C's energy "
            "(share of Σσ⁴)")


def card_text(document: dict[str, Any], nbytes: int) -> str:
    inputs = document["inputs"]
    aligned, base = public_source(inputs["aligned"]), public_source(inputs["base"])
    exact = document["mode"] == "exact"
    what = (f"V = W_aligned − W_base itself, stored as {document['dtype']}" if exact else
            f"a low-rank factor Q of the paper's C = V·Vᵀ/‖V‖_F per weight, C ≈ Q·Qᵀ; {low_rank_summary(document)}")
    # The Hub checks base_model against its own models: only a Hub id belongs there.
    front = [f"base_model: {aligned}"] if inputs["aligned"].get("commit") else []
    lines = [
        "---", *front, "tags:", "- safe-lora", "- safelora-subspace", "---", "",
        f"# Safe LoRA subspace of {aligned}", "",
        f"What `safelora patch --subspace` needs in place of the base model ({base}) and the aligned model "
        f"({aligned}): {what}.", "",
        f"- Mode: {document['mode']}; weights: {len(document['entries'])} ({', '.join(document['modules'])}); "
        f"file size {_size(nbytes)}.",
        f"- Written by {document['tool']['name']} {document['tool']['version']}.",
    ]
    for name in ("base", "aligned"):
        commit = inputs[name].get("commit")
        lines.append(f"- {name}: {public_source(inputs[name])}" + (f" at commit `{commit}`" if commit else ""))
    lines += ["", "Use it:", "", "```", "safelora patch --subspace <this repository or directory> "
              "--adapter <your LoRA> --out <dir>", "```", ""]
    if not exact:
        lines += ["Each layer's cosine is computed with Q·Qᵀ; the report gives `cosine_error_bound`, a proven bound "
                  "on how far the cosine with the full C can lie above it, and flags layers whose selection the "
                  "bound cannot decide.", ""]
    return "\n".join(lines)
