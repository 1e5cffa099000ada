"""Greedy generation for `safelora eval`: load a causal LM and its tokenizer, then each PEFT adapter.

Imported only by the eval command, after the prompts file and options were checked, because it
imports torch, transformers and peft (the `eval` extra).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from safelora_cli.errors import InputError, UsageError
from safelora_cli.evaluate import EvalConfig, Metrics, MissingExtra, Progress, Prompt, RefusalDetector, score


def _require_extra() -> None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(f"safelora eval needs transformers and peft ({exc.name} is not installed).",
                           hint="Run: pip install 'safelora-cli[eval]'.") from None


def _first_line(exc: Exception) -> str:
    """Library errors can span many lines; the first says what went wrong."""
    lines = str(exc).strip().splitlines()
    first = lines[0].rstrip() if lines else type(exc).__name__
    return first if first.endswith(".") else first + "."


def pick_device(spec: str) -> str:
    """auto → cuda when available, else cpu. Raises UsageError for an unavailable or unknown device."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec != "cpu" and not spec.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, found {spec!r}.")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA device is available.", hint="Use --device cpu.")
    return spec


def load(model: str, device: str) -> tuple[Any, Any]:
    """The model (eval mode, on `device`) and its tokenizer, left-padding, with a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        network: Any = AutoModelForCausalLM.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot load the model {model}: {_first_line(exc)}",
                         hint="Pass a directory written by save_pretrained (with its tokenizer) or a Hub id.") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return network.to(device).eval(), tokenizer


def encode(tokenizer: Any, prompts: Sequence[Prompt], chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt: through the chat template (as one user turn) when the tokenizer has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p.text)["input_ids"] for p in prompts]


def generate(network: Any, tokenizer: Any, ids: Sequence[list[int]], max_new_tokens: int, batch_size: int,
             on_batch: Progress, done: int = 0, total: int = 0) -> list[str]:
    """Greedy completions (new tokens only, special tokens dropped), in the order of `ids`."""
    import torch

    device = next(network.parameters()).device
    out: list[str] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(map(len, chunk))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
        with torch.no_grad():
            tokens = network.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=1, pad_token_id=pad)
        out += tokenizer.batch_decode(tokens[:, width:], skip_special_tokens=True)
        on_batch(done + start // batch_size + 1, total)
    return out


def run(config: EvalConfig, prompts: Sequence[Prompt], detector: RefusalDetector, on_batch: Progress) -> list[Metrics]:
    """Score the model alone, then each adapter loaded on it and removed again (no merge)."""
    _require_extra()
    from peft import PeftModel

    network, tokenizer = load(config.model, pick_device(config.device))
    ids = encode(tokenizer, prompts, config.chat_template)
    per_pass = -(-len(ids) // config.batch_size)
    total = per_pass * (1 + len(config.adapters))

    def one(model: Any, index: int) -> list[str]:
        return generate(model, tokenizer, ids, config.max_new_tokens, config.batch_size, on_batch,
                        index * per_pass, total)

    results = [score(None, prompts, one(network, 0), detector)]
    for index, adapter in enumerate(config.adapters, 1):
        try:
            with warnings.catch_warnings():  # a deprecation inside peft's loading, not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                wrapped = PeftModel.from_pretrained(network, adapter)
        except (OSError, ValueError) as exc:
            raise InputError(f"Cannot load the adapter {adapter} on {config.model}: {_first_line(exc)}",
                             hint="Pass a PEFT adapter directory trained on this model.") from None
        wrapped.eval()
        results.append(score(adapter, prompts, one(wrapped, index), detector))
        network = wrapped.unload()
    return results
