"""ATP's pruning-decision generator: a small network that outputs keep/prune decisions for
every structure of every layer, trained jointly with LoRA.

One fixed input token per decoder layer (orthogonal initialisation, frozen) → a small
encoder over the layer sequence (Transformer by default, the bidirectional GRU of the earlier
work as an option) → LayerNorm → a bias-free linear head per (layer, structure kind) giving
logits z. Decisions (Gumbel-sigmoid):

    s = sigmoid((z + g + b) / T)     g = log u − log(1 − u), u ~ U(0, 1); T = 0.4, b = 3
    d = 1[s ≥ 0.5]                   forward value; gradient of s (straight-through)

The offset b makes every structure start kept (s ≈ 1 for |z| ≲ 1).
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.errors import bad_value
from prunelab.structure import Unit

ENCODERS = ("transformer", "gru")


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """Binary in the forward pass, the soft value's gradient in the backward pass."""
    hard = (soft >= 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly hard in the forward (no rounding)


def logistic_noise(shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
    """g = log u − log(1 − u): the difference of two Gumbel variables (Gumbel-sigmoid)."""
    u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    return u.log() - (-u).log1p()


class DecisionGenerator(nn.Module):
    def __init__(
        self,
        units: list[Unit],
        num_layers: int,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        encoder: str = "transformer",
        temperature: float = 0.4,
        offset: float = 3.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise bad_value("method.generator.encoder", encoder, ENCODERS)
        self.units = list(units)
        self.temperature, self.offset = float(temperature), float(offset)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.empty(num_layers, dim)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            nn.init.orthogonal_(tokens)
            if encoder == "transformer":
                layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
                self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
                self.proj = nn.Identity()
            else:
                self.encoder = nn.GRU(dim, dim, num_layers=layers, batch_first=True, bidirectional=True)
                self.proj = nn.Linear(2 * dim, dim)
            self.norm = nn.LayerNorm(dim)
            self.heads = nn.ModuleDict({self._name(u): nn.Linear(dim, u.n, bias=False) for u in self.units})
        self.register_buffer("tokens", tokens)  # fixed inputs, never trained
        self.encoder_kind = encoder
        self._g = g

    @staticmethod
    def _name(u: Unit) -> str:
        return f"{u.layer}_{u.kind}"

    def logits(self) -> dict[str, torch.Tensor]:
        """z per unit key (before offset and noise)."""
        h = self.encoder(self.tokens[None])
        h = h[0] if isinstance(h, tuple) else h  # the GRU returns (outputs, state)
        h = self.norm(self.proj(h))[0]  # [layers, dim]
        return {u.key: self.heads[self._name(u)](h[u.layer]) for u in self.units}

    def forward(self, noise: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(soft s, straight-through hard d) per unit key; ``noise=False``: deterministic."""
        soft, hard = {}, {}
        for key, z in self.logits().items():
            g = logistic_noise(z.shape, self._g).to(z.device) if noise else 0.0
            s = torch.sigmoid((z + g + self.offset) / self.temperature)
            soft[key], hard[key] = s, straight_through(s)
        return soft, hard

    @torch.no_grad()
    def decisions(self) -> dict[str, torch.Tensor]:
        """Deterministic keep decisions (bool) and their margins z + b (for ranking)."""
        return {k: (z + self.offset) >= 0 for k, z in self.logits().items()}

    @torch.no_grad()
    def margins(self) -> dict[str, torch.Tensor]:
        return {k: (z + self.offset).float().cpu() for k, z in self.logits().items()}
