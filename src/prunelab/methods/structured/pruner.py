"""One-shot structured baseline: remove the lowest-scoring heads and MLP channels of each
prunable layer, scored by weight magnitude or at random.

    prunelab method=structured method.importance=random ratio=0.5

``StructuredPruner`` is also the base of the structured methods (LLM-Pruner adds gradient
estimators, global ranking and iterative steps): config validation, layer selection and
scoring → masks live here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from prunelab.errors import ConfigError, bad_value
from prunelab.importance import AGGREGATIONS, select_global, select_masks
from prunelab.importance.magnitude import MagnitudeImportance
from prunelab.importance.random import RandomImportance
from prunelab.methods.base import PruneContext, PruningMethod
from prunelab.numerics import DTYPE_HINT, check_scores
from prunelab.structure import ArchInfo, arch_info, units
from prunelab.structure.groups import Masks, base_model
from prunelab.structure.plan import PrunePlan, prunable_layers

TARGETS = ("attn", "mlp", "layer", "hidden")
RANKINGS = ("local", "global")


@dataclass
class StructuredPruner(PruningMethod):
    IMPORTANCES: ClassVar[tuple[str, ...]] = ("magnitude", "random")

    name: str = "structured"
    importance: str = "magnitude"
    norm: int = 1  # magnitude exponent: 1 = Σ|w| (l1), 2 = Σw² (l2)
    aggregation: str = "sum"
    targets: tuple[str, ...] = field(default_factory=lambda: ("attn", "mlp"))
    ranking: str = "local"  # local: the plan's per-layer amounts; global: same totals, ranked across layers
    keep_first_layers: float | int = 0.125  # LLM-Pruner keeps the first 4 of 32 layers
    keep_last_layers: float | int = 0.0625  # ... and the last 2 of 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.importance not in self.IMPORTANCES:
            raise bad_value("method.importance", self.importance, self.IMPORTANCES)
        if self.aggregation not in AGGREGATIONS:
            raise bad_value("method.aggregation", self.aggregation, AGGREGATIONS)
        if self.norm not in (1, 2):
            raise bad_value("method.norm", self.norm, (1, 2))
        if self.ranking not in RANKINGS:
            raise bad_value("method.ranking", self.ranking, RANKINGS)
        bad = [t for t in self.targets if t not in TARGETS]
        alone = {"layer", "hidden"} & set(self.targets)
        if bad or not self.targets or (alone and len(self.targets) > 1):
            raise ConfigError(
                f"method.targets={list(self.targets)} is not allowed; allowed: any of [attn, mlp], "
                "or [layer] or [hidden] alone"
            )
        for key in ("keep_first_layers", "keep_last_layers"):
            v = getattr(self, key)
            if (isinstance(v, float) and not 0.0 <= v < 1.0) or (isinstance(v, int) and v < 0):
                raise ConfigError(
                    f"method.{key}={v!r} must be a fraction of depth in [0, 1) or a layer count >= 0"
                )

    @property
    def needs_calibration(self) -> bool:
        return bool(getattr(self.estimator(), "needs_calibration", False))

    def layers(self, num_layers: int) -> list[int]:
        return prunable_layers(num_layers, self.keep_first_layers, self.keep_last_layers)

    def estimator(self):
        if self.importance == "random":
            return RandomImportance(self.seed)
        return MagnitudeImportance(self.norm, self.aggregation)

    def prune(self, model: nn.Module, plan: PrunePlan, ctx: PruneContext) -> Masks:
        return self.select(model, plan, ctx.calibration)

    def select(self, model: nn.Module, plan: PrunePlan, calibration: torch.Tensor | None) -> Masks:
        """Score the plan's units and keep-mask the lowest-scoring groups."""
        arch = arch_info(base_model(model).config)
        if self.targets == ("layer",):
            scores = self.layer_scores(model, arch, plan.prunable_layers, calibration)
            return select_masks({"layers": scores}, {"layers": plan.remove["layers"]})
        todo = [u for u in units(arch, self.targets) if u.key in plan.remove]
        scores = self.scores(model, arch, todo, calibration)
        pick = select_global if self.ranking == "global" else select_masks
        return pick(scores, plan.remove)

    def scores(self, model: nn.Module, arch: ArchInfo, todo: list, calibration) -> dict[str, torch.Tensor]:
        """The estimator's group scores; a NaN or inf among them is an error (it would rank arbitrarily)."""
        scores = self.estimator().scores(model, arch, todo, calibration)
        check_scores(
            scores,
            f"method={self.name} importance={self.importance}",
            "the model's weights were finite at load, so its gradients or activations overflowed "
            "on the calibration data; " + DTYPE_HINT,
        )
        return scores

    def layer_scores(self, model, arch: ArchInfo, layers: list[int], calibration) -> torch.Tensor:
        """A layer's score sums its attention and MLP group scores; protected layers score +inf."""
        todo = [u for u in units(arch, ("attn", "mlp")) if u.layer in layers]
        s = self.scores(model, arch, todo, calibration)
        out = torch.full((arch.num_layers,), float("inf"))
        for i in layers:
            out[i] = s[f"{i}.attn"].sum() + s[f"{i}.mlp"].sum()
        return out
