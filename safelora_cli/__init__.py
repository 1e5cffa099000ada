"""Safe LoRA for PEFT adapters: project fine-tuned LoRA updates back onto the aligned subspace.

    import safelora_cli
    result = safelora_cli.patch(base="llama-2-7b", aligned="llama-2-7b-chat", adapter="my-lora", out="my-lora-safe")
    result.report["summary"]

See docs/api.md. The functions are imported on first use, so `import safelora_cli` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Result", "SafeLoraError", "__version__", "inspect", "patch", "subspace"]

if TYPE_CHECKING:
    from safelora_cli.api import inspect, patch, subspace
    from safelora_cli.errors import SafeLoraError
    from safelora_cli.result import Result


def __getattr__(name: str) -> Any:
    if name in ("patch", "inspect", "subspace"):
        from safelora_cli import api

        return getattr(api, name)
    if name == "Result":
        from safelora_cli.result import Result

        return Result
    if name == "SafeLoraError":
        from safelora_cli.errors import SafeLoraError

        return SafeLoraError
    raise AttributeError(f"module 'safelora_cli' has no attribute {name!r}")
