"""Safe LoRA for PEFT adapters: project fine-tuned LoRA updates back onto the aligned subspace."""

__version__ = "0.1.0"
