"""Recovery after pruning: ``recovery=lora`` (LoRA fine-tuning through peft, merged back)."""

from prunelab.recovery.lora import LoraRecovery

__all__ = ["LoraRecovery"]
