"""LoRAShear's dynamic knowledge recovery, the data side (part 4): a mixture over text
sources rebuilt from how much the pruned model degraded on each.

After each measurement on the sources' held-out validation subsets,

    w ← softmax(log w + η · max(0, loss − reference))      (Sheared-LLaMA's update)
    w ← floor + (1 − k·floor) · w                          (every source keeps ``floor``)

where ``reference`` is the dense model's loss on the same subset: sources the pruned model
degraded more get more of the next batches. ``history`` records every update (logged to W&B
by the caller). Offline the embedded corpus provides three sources (reference, docstrings,
comments: ``EmbeddedText(sources=[...])``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from prunelab.errors import ConfigError


@dataclass
class DataMixer:
    sources: Sequence[str]
    eta: float = 1.0  # how strongly degradation moves the weights
    floor: float = 0.05  # minimum share of every source
    weights: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sources = list(self.sources)
        if not self.sources:
            raise ConfigError("method.mixer: no sources to mix")
        if not 0 <= self.floor * len(self.sources) < 1:
            raise ConfigError(
                f"method.mixer.floor={self.floor} leaves no share to move for {len(self.sources)} sources; "
                f"allowed: [0, {1 / len(self.sources):.3f})"
            )
        if not self.eta >= 0:
            raise ConfigError(f"method.mixer.eta={self.eta!r} must be ≥ 0")
        self.weights = self.weights or {s: 1 / len(self.sources) for s in self.sources}

    def update(
        self, losses: Mapping[str, float], reference: Mapping[str, float], step: int = 0
    ) -> dict[str, float]:
        """New weights from per-source validation losses vs the reference (dense) losses."""
        logits = torch.tensor(
            [math.log(self.weights[s]) + self.eta * max(0.0, losses[s] - reference[s]) for s in self.sources]
        )
        w = torch.softmax(logits, 0)
        w = self.floor + (1 - self.floor * len(self.sources)) * w
        self.weights = {s: float(v) for s, v in zip(self.sources, w, strict=True)}
        self.history.append({"step": step, "weights": dict(self.weights), "losses": dict(losses)})
        return self.weights

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """Source of each of the next ``n`` examples."""
        probs = torch.tensor([self.weights[s] for s in self.sources])
        return [self.sources[i] for i in torch.multinomial(probs, n, replacement=True, generator=generator)]
