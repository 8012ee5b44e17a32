"""LLM-Pruner (Ma, Fang, Wang — NeurIPS 2023): coupled structures scored by Taylor
importance from a few calibration sequences, pruned once or in k steps, then recovered
with LoRA (the shared ``recovery=lora`` stage).

    prunelab method=llm_pruner method.importance=element2 ratio=0.5
    prunelab method=llm_pruner method.mode=layer ratio=0.25
    prunelab method=llm_pruner method.ranking=global method.iterative_steps=4

Modes: ``block`` prunes attention groups (whole KV groups under GQA) and MLP channels
inside the layer range (paper: layers 4–29 of 32, i.e. the first 1/8 and last 1/16 of depth
kept); ``channel`` prunes the hidden (residual) dimension of the whole model, embeddings and
norms included (RMSNorm weights and eps are rescaled so the narrowed model equals the masked
one exactly); ``layer`` drops whole decoder layers. Iterative pruning re-scores the model after
each of k steps, with a linear schedule over the parameters removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from prunelab.errors import ConfigError, bad_value
from prunelab.importance.magnitude import MagnitudeImportance
from prunelab.importance.random import RandomImportance
from prunelab.importance.taylor import TAYLOR_KINDS, VECTOR_REDUCTIONS, TaylorImportance
from prunelab.methods import PruneContext
from prunelab.methods.structured.pruner import StructuredPruner
from prunelab.structure import apply_masks, arch_info, prune_physically
from prunelab.structure.groups import Masks, base_model
from prunelab.structure.plan import PrunePlan, plan_ratio

MODES = ("block", "channel", "layer")


@dataclass
class LLMPruner(StructuredPruner):
    IMPORTANCES: ClassVar[tuple[str, ...]] = (*TAYLOR_KINDS, "l1", "l2", "magnitude", "random")

    name: str = "llm_pruner"
    importance: str = "element1"
    mode: str = "block"
    iterative_steps: int = 1
    calibration_samples: int = 10  # paper: 10 sequences ...
    calibration_seq_len: int = 64  # ... of 64 tokens
    micro_batch: int = 8  # sequences per backward pass for first-order gradients (memory vs speed)
    vector: str | None = None  # importance=vector: null = per channel, then summed (official) | slice

    def __post_init__(self) -> None:
        if self.vector not in VECTOR_REDUCTIONS:
            raise bad_value("method.vector", self.vector, VECTOR_REDUCTIONS)
        if self.mode not in MODES:
            raise bad_value("method.mode", self.mode, MODES)
        if self.mode != "block":  # the mode decides the structure
            self.targets = {"layer": ("layer",), "channel": ("hidden",)}[self.mode]
        super().__post_init__()
        if self.iterative_steps < 1:
            raise ConfigError(f"method.iterative_steps={self.iterative_steps!r} must be >= 1")
        if self.iterative_steps > 1 and self.mode == "layer":
            raise ConfigError("method.iterative_steps>1 is supported for method.mode=block|channel only")
        for key in ("calibration_samples", "calibration_seq_len", "micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}={getattr(self, key)!r} must be >= 1")

    def estimator(self):
        if self.importance in TAYLOR_KINDS:
            return TaylorImportance(self.importance, self.aggregation, self.micro_batch, self.vector)
        if self.importance == "random":
            return RandomImportance(self.seed)
        # "magnitude" is the structured baseline's name for l1 (Σ|w|), so one sweep spans both
        return MagnitudeImportance(2 if self.importance == "l2" else 1, self.aggregation)

    def prune(self, model: nn.Module, plan: PrunePlan, ctx: PruneContext) -> Masks:
        """Masks relative to the model as it is on return: with k steps, the first k−1 are
        applied physically here and the last step's masks are returned."""
        if self.iterative_steps == 1:
            return self.select(model, plan, ctx.calibration)
        target = plan.params_before - plan.params_after
        for step in range(1, self.iterative_steps + 1):
            arch = arch_info(base_model(model).config)
            removed = plan.params_before - arch.total_params()
            goal = round(target * step / self.iterative_steps)
            frac = (goal - removed) / arch.total_params()
            last = step == self.iterative_steps
            # intermediate steps take the nearest whole-group amount; the last one lands on the plan
            tol = 0.5 if not last else max(0.01, 1.0 * abs(plan.achieved - plan.requested) / max(frac, 1e-9))
            step_plan = plan_ratio(arch, frac, self.targets, plan.prunable_layers, tolerance=tol)
            masks = self.select(model, step_plan, ctx.calibration)
            if last:
                return masks
            apply_masks(model, masks)
            prune_physically(model, masks)
        raise AssertionError("unreachable")
