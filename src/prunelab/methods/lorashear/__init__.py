"""LoRAShear (Chen et al. 2023): LoRA-aware groups, knowledge distribution analysis, LHSPG and
dynamic knowledge recovery; see pruner.py."""

from prunelab.methods.lorashear.pruner import LoRAShear

__all__ = ["LoRAShear"]
