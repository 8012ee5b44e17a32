"""Weight-magnitude importance: a group's score aggregates Σ|w|^p over each member's slice."""

from __future__ import annotations

import torch
from torch import nn

from prunelab.importance import aggregate
from prunelab.structure import ArchInfo, Unit
from prunelab.structure.groups import grouped, iter_unit_members


class MagnitudeImportance:
    needs_calibration = False

    def __init__(self, p: int = 1, aggregation: str = "sum") -> None:
        self.p = p
        self.aggregation = aggregation

    @torch.no_grad()
    def scores(
        self, model: nn.Module, arch: ArchInfo, units: list[Unit], calibration: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = {}
        for unit in units:
            per_member = [
                grouped(t.detach().float(), m).abs().pow(self.p).sum(1)
                for m, t in iter_unit_members(model, arch, unit)
            ]
            out[unit.key] = aggregate(per_member, self.aggregation).cpu()
        return out
