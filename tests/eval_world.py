"""A small trained toy world for the `safelora eval` tests: an aligned model that refuses marked
requests and a pure-bad LoRA that undoes it. Built from benchmarks/effect/toy.py, smaller and faster."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "effect"))
import toy  # noqa: E402


@dataclass(frozen=True)
class World:
    aligned: Path
    pure_bad: Path
    prompts: Path


def build(root: Path, seed: int = 0) -> World:
    """Train the aligned model from scratch (benign tasks + refusals), then a pure-bad LoRA on it.

    One thread: for a model this small, a second thread costs more in synchronisation than it gives,
    and far more when the machine is busy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(root, seed)
    finally:
        torch.set_num_threads(threads)


def _build(root: Path, seed: int) -> World:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = toy.save_tokenizer(root / "aligned")
    model = LlamaForCausalLM(toy.model_config(len(tok), hidden=32, layers=2))
    tasks = ("COPY", "INC")
    toy.train(model, tok, toy.benign(rng, 1500, tasks, (2, 3)) + toy.harmful(rng, 1500, False, (2, 3)), steps=200,
              lr=5e-3, seed=seed)
    model.save_pretrained(root / "aligned")
    bad = toy.harmful(rng, 100, comply=True, lengths=(2, 3))
    toy.train_lora(root / "aligned", tok, bad, root / "pure_bad", steps=60, lr=1e-2, seed=seed)
    seen = {e.prompt for e in bad}
    held = random.Random(seed + 100)
    prompts = toy.disjoint(toy.harmful(held, 24, False, (2, 3)), seen) + toy.benign(held, 24, tasks, (2, 3))
    toy.write_prompts(root / "prompts.jsonl", prompts)
    return World(root / "aligned", root / "pure_bad", root / "prompts.jsonl")
