"""Importance estimators: one contract, interchangeable through config.

An estimator maps each unit (one layer's attention groups, one layer's MLP channels) to a
score per group; higher = more important. Per-member scores are aggregated into group
scores by ``aggregate`` (sum by default, as in LLM-Pruner).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from prunelab.errors import bad_value
from prunelab.numerics import check_scores
from prunelab.structure import ArchInfo, Unit
from prunelab.structure.groups import Masks

# NaN sorts arbitrarily (+inf is a deliberate "never prune", e.g. protected layers)
NAN_HINT = "a NaN sorts arbitrarily, so the groups it would remove are noise; its estimator produced it"
AGGREGATIONS = ("sum", "mean", "max", "prod", "first", "last")


class Importance(Protocol):
    needs_calibration: bool

    def scores(
        self, model: nn.Module, arch: ArchInfo, units: list[Unit], calibration: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]: ...


def aggregate(member_scores: list[torch.Tensor], how: str = "sum") -> torch.Tensor:
    """Combine per-member group scores [n] into one group score [n]."""
    stacked = torch.stack([s.float() for s in member_scores])
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    if how == "first":  # the official code's `first`: its pruning root, q_proj / gate_proj (members[0])
        return stacked[0]
    if how == "last":
        return stacked[-1]
    raise bad_value("method.aggregation", how, AGGREGATIONS)


def select_masks(scores: dict[str, torch.Tensor], remove: dict[str, int]) -> Masks:
    """Keep-masks that drop the ``remove[key]`` lowest-scoring groups of each unit.

    Ties are broken by index (stable sort), so equal scores give a deterministic choice.
    """
    check_scores({k: scores[k] for k in remove}, "the ranking", NAN_HINT, allow_inf=True)
    masks: Masks = {}
    for key, k in remove.items():
        s = scores[key]
        keep = torch.ones(s.numel(), dtype=torch.bool)
        if k > 0:
            order = torch.sort(s.float().cpu(), stable=True).indices
            keep[order[:k]] = False
        masks[key] = keep
    return masks


def select_global(scores: dict[str, torch.Tensor], remove: dict[str, int]) -> Masks:
    """Global ranking: per kind, drop the same total number of groups as ``remove`` asks, but
    the lowest-scoring ones across all its units (each unit keeps at least one group)."""
    check_scores({k: scores[k] for k in remove}, "the global ranking", NAN_HINT, allow_inf=True)
    masks: Masks = {k: torch.ones(scores[k].numel(), dtype=torch.bool) for k in remove}
    for kind in sorted({k.split(".")[-1] for k in remove}):
        keys = [k for k in remove if k.split(".")[-1] == kind]
        total = sum(remove[k] for k in keys)
        pool = [(float(v), k, i) for k in keys for i, v in enumerate(scores[k].float().tolist())]
        pool.sort(key=lambda x: (x[0], x[1], x[2]))
        left = {k: scores[k].numel() - 1 for k in keys}
        for _, k, i in pool:
            if total == 0:
                break
            if left[k] > 0:
                masks[k][i] = False
                left[k] -= 1
                total -= 1
    return masks
