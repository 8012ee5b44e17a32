"""Random importance: the baseline every criterion must beat. Seeded, so reproducible."""

from __future__ import annotations

import torch
from torch import nn

from prunelab.structure import ArchInfo, Unit


class RandomImportance:
    needs_calibration = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(
        self, model: nn.Module, arch: ArchInfo, units: list[Unit], calibration: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return {u.key: torch.rand(u.n, generator=gen) for u in units}
