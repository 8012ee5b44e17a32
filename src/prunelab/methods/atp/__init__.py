"""ATP (Lu et al. 2024): a pruning-decision generator trained jointly with LoRA; see pruner.py."""

from prunelab.methods.atp.pruner import ATP

__all__ = ["ATP"]
