"""One-shot structured baseline: remove the lowest-scoring heads and MLP channels of each
prunable layer, scored by weight magnitude or at random.

    prunelab method=structured method.importance=random ratio=0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from prunelab.errors import ConfigError, bad_value
from prunelab.importance import AGGREGATIONS, select_masks
from prunelab.importance.magnitude import MagnitudeImportance
from prunelab.importance.random import RandomImportance
from prunelab.methods import PruneContext
from prunelab.structure import arch_info, units
from prunelab.structure.groups import Masks, base_model
from prunelab.structure.plan import PrunePlan, prunable_layers

IMPORTANCES = ("magnitude", "random")
TARGETS = ("attn", "mlp", "layer")


@dataclass
class StructuredPruner:
    name: str = "structured"
    importance: str = "magnitude"
    norm: int = 1  # magnitude exponent: 1 = Σ|w| (l1), 2 = Σw² (l2)
    aggregation: str = "sum"
    targets: tuple[str, ...] = field(default_factory=lambda: ("attn", "mlp"))
    keep_first_layers: float | int = 0.125  # LLM-Pruner keeps the first 4 of 32 layers
    keep_last_layers: float | int = 0.0625  # ... and the last 2 of 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.importance not in IMPORTANCES:
            raise bad_value("method.importance", self.importance, IMPORTANCES)
        if self.aggregation not in AGGREGATIONS:
            raise bad_value("method.aggregation", self.aggregation, AGGREGATIONS)
        if self.norm not in (1, 2):
            raise bad_value("method.norm", self.norm, (1, 2))
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or ("layer" in self.targets and len(self.targets) > 1):
            raise ConfigError(
                f"method.targets={list(self.targets)} is not allowed; allowed: any of [attn, mlp], or [layer] alone"
            )
        for key in ("keep_first_layers", "keep_last_layers"):
            v = getattr(self, key)
            if (isinstance(v, float) and not 0.0 <= v < 1.0) or (isinstance(v, int) and v < 0):
                raise ConfigError(
                    f"method.{key}={v!r} must be a fraction of depth in [0, 1) or a layer count >= 0"
                )

    def layers(self, num_layers: int) -> list[int]:
        return prunable_layers(num_layers, self.keep_first_layers, self.keep_last_layers)

    def estimator(self):
        if self.importance == "random":
            return RandomImportance(self.seed)
        return MagnitudeImportance(self.norm, self.aggregation)

    def prune(self, model: nn.Module, plan: PrunePlan, ctx: PruneContext) -> Masks:
        arch = arch_info(base_model(model).config)
        if self.targets == ("layer",):
            scores = self._layer_scores(model, arch, plan.prunable_layers)
            return select_masks({"layers": scores}, {"layers": plan.remove["layers"]})
        todo = [u for u in units(arch, self.targets) if u.key in plan.remove]
        scores = self.estimator().scores(model, arch, todo)
        return select_masks(scores, plan.remove)

    def _layer_scores(self, model, arch, layers):
        import torch

        # A layer's score sums its attention and MLP group scores; protected layers score +inf.
        all_units = units(arch, ("attn", "mlp"))
        s = self.estimator().scores(model, arch, all_units)
        out = torch.full((arch.num_layers,), float("inf"))
        for i in layers:
            out[i] = s[f"{i}.attn"].sum() + s[f"{i}.mlp"].sum()
        return out
