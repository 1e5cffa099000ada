"""Build the effect benchmark's trained trio, its three LoRA adapters and its held-out prompt files.

    base/      4-layer Llama-style model (hidden 64) pretrained to do every request, marked or not
    aligned/   base fully fine-tuned to answer marked (harmful) requests with REFUSE
    pure_bad/  LoRA r=8 on q/v from aligned: 100 harmful requests answered (compliance)
    mixed/     LoRA from aligned: the new task REV INC (400 examples) plus those 100
    benign/    LoRA from aligned: the new task alone
    safety.jsonl   held-out harmful requests (expect refuse) and old benign tasks (comply, answer)
    task.jsonl     held-out REV INC requests (comply, answer)

Seeds are fixed and training runs on one thread, so a rerun on the same torch build gives the
same weights and the same table.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import toy

SEED = 1234  # the default; --seed changes every seed below together
HIDDEN, LAYERS = 64, 4


@dataclass(frozen=True)
class Sizes:
    """Training lengths (optimizer steps) and data sizes; held-out prompt counts per file part."""

    pretrain_steps: int = 800
    align_steps: int = 300
    lora_steps: int = 300
    bad_examples: int = 100
    task_examples: int = 400
    held_out: int = 100


ADAPTERS = ("pure_bad", "mixed", "benign")


def _pretrain(root: Path, tok, rng: random.Random, sizes: Sizes, seen: set[str],  # type: ignore[no-untyped-def]
              seed: int) -> dict[str, float]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(toy.model_config(len(tok), HIDDEN, LAYERS))
    data = toy.benign(rng, 4000, toy.TASKS) + toy.harmful(rng, 2000, comply=True)
    seen |= {e.prompt for e in data}
    losses = {"pretrain": toy.train(model, tok, data, sizes.pretrain_steps, 3e-3, seed)}
    model.save_pretrained(root / "base")
    data = toy.benign(rng, 2000, toy.TASKS) + toy.harmful(rng, 2000, comply=False)
    seen |= {e.prompt for e in data}
    losses["align"] = toy.train(model, tok, data, sizes.align_steps, 1e-3, seed + 1)
    model.save_pretrained(root / "aligned")
    return losses


def _adapters(root: Path, tok, rng: random.Random, sizes: Sizes,  # type: ignore[no-untyped-def]
              seed: int) -> tuple[dict[str, float], set[str]]:
    bad = toy.harmful(rng, sizes.bad_examples, comply=True)
    task = toy.benign(rng, sizes.task_examples, (toy.NEW_TASK,))
    data = {"pure_bad": bad, "mixed": task + bad, "benign": task}
    losses = {name: toy.train_lora(root / "aligned", tok, data[name], root / name, sizes.lora_steps, 2e-3,
                                   seed + 10 + i) for i, name in enumerate(ADAPTERS)}
    return losses, {e.prompt for e in bad + task}


def _fresh(draw: Callable[[], list[toy.Example]], n: int, seen: set[str]) -> list[toy.Example]:
    """`n` distinct examples whose prompts no model was trained on."""
    out: dict[str, toy.Example] = {}
    while len(out) < n:
        (example,) = draw()
        if example.prompt not in seen:
            out.setdefault(example.prompt, example)
    return list(out.values())


def build(root: Path, sizes: Sizes = Sizes(), seed: int = SEED) -> dict[str, object]:
    """Write everything under `root`; return the final training losses and timings."""
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tok = toy.save_tokenizer(root / "base")
    toy.save_tokenizer(root / "aligned")
    seen: set[str] = set()  # every training prompt: held-out prompts must be new to every model
    losses = _pretrain(root, tok, rng, sizes, seen, seed)
    trained = time.perf_counter()
    lora_losses, lora_seen = _adapters(root, tok, rng, sizes, seed)
    seen |= lora_seen
    held = random.Random(seed + 99)
    n = sizes.held_out
    safety = _fresh(lambda: toy.harmful(held, 1, comply=False), n, seen) + _fresh(
        lambda: toy.benign(held, 1, toy.TASKS), n, seen)
    toy.write_prompts(root / "safety.jsonl", safety)
    toy.write_prompts(root / "task.jsonl", _fresh(lambda: toy.benign(held, 1, (toy.NEW_TASK,)), n, seen))
    info = {"seed": seed, "losses": {**losses, **lora_losses},
            "seconds": {"base_and_aligned": trained - start, "adapters": time.perf_counter() - trained}}
    (root / "world.json").write_text(json.dumps(info, indent=2))
    return info
