"""Element-wise sparsity patterns and exact mask selection.

A pattern is ``unstructured`` or ``N:M`` (keep N of every M consecutive weights along a
row's input dimension — the layout of NVIDIA's 2:4 kernels, generalised to any N < M).
Unstructured masks are selected per layer or per output row (``scope``). Every selection
here removes an exact number of weights: ``round(s · count)`` of each layer — per-row
selection spreads that total over the rows (each row ⌊s·cols⌋ or ⌈s·cols⌉, by cumulative
rounding), so a layer's sparsity never depends on the scope — or exactly M − N of every
group of M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunelab.errors import ConfigError

SCOPES = ("layer", "row")


@dataclass(frozen=True)
class Pattern:
    n: int | None = None  # weights kept per group (N:M only)
    m: int | None = None  # group size

    @property
    def unstructured(self) -> bool:
        return self.m is None

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None for unstructured)."""
        return None if self.m is None else 1 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.m is None else f"{self.n}:{self.m}"


def parse_pattern(value: object, key: str = "method.sparsity_pattern") -> Pattern:
    """``"unstructured"`` or ``"N:M"`` (0 < N < M) -> Pattern; anything else is a ConfigError."""
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124.
        raise ConfigError(
            f"{key}={value!r} is an integer: an unquoted N:M in a YAML file is read as a base-60 "
            f'number; quote it ({key}: "2:4")'
        )
    text = str(value).strip()
    if text == "unstructured":
        return Pattern()
    parts = text.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = (int(p) for p in parts)
        if m < 2 or n < 1:
            raise ConfigError(f"{key}={text!r}: N:M needs N ≥ 1 and M ≥ 2 (e.g. 2:4, 4:8)")
        if n >= m:
            raise ConfigError(
                f"{key}={text!r}: N:M keeps N of every M weights, so N must be smaller than M "
                f"(N={n}, M={m}); e.g. 2:4, 4:8"
            )
        return Pattern(n, m)
    raise ConfigError(
        f"{key}={text!r} is not allowed; allowed: unstructured, or N:M with N < M (2:4, 4:8, 1:4, …)"
    )


def prune_count(sparsity: float, n: int) -> int:
    """Weights of ``n`` removed at ``sparsity``: round half up, so 0.5 of 7 removes 4."""
    return min(n, max(0, math.floor(sparsity * n + 0.5)))


def row_counts(sparsity: float, rows: int, cols: int) -> torch.Tensor:
    """Weights to prune in each row so the layer loses exactly ``round(s · rows · cols)``."""
    # prune_count of every prefix r·cols at once: the same float64 product, +0.5, floor
    # (bit-identical to the scalar rule; a Python loop over rows cost seconds at 7B sizes)
    n = torch.arange(rows + 1, dtype=torch.int64) * cols
    edges = torch.floor(n.to(torch.float64) * sparsity + 0.5).to(torch.int64)
    edges = torch.minimum(edges.clamp_min(0), n)
    return edges[1:] - edges[:-1]


def drop_lowest_rows(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask that drops the ``counts[r]`` lowest entries of row r."""
    kmax = int(counts.max()) if counts.numel() else 0
    kmin = int(counts.min()) if counts.numel() else 0
    keep = torch.ones_like(score, dtype=torch.bool)
    if kmax == 0:
        return keep
    counts = counts.to(score.device)
    if kmax - kmin <= 1:
        # row_counts' shares differ by at most one: an unsorted top-k (half the time of a
        # sorted one, and ADMM selects 15 masks per layer) plus, in the rows that drop one
        # fewer, the highest of those picked stays
        idx = torch.topk(score, kmax, dim=1, largest=False, sorted=False).indices
        drop = torch.ones_like(idx, dtype=torch.bool)
        if kmin < kmax:
            spare = score.gather(1, idx).argmax(1, keepdim=True)
            drop.scatter_(1, spare, (counts == kmax)[:, None])
    else:
        idx = torch.topk(score, kmax, dim=1, largest=False, sorted=True).indices
        drop = torch.arange(kmax, device=score.device)[None, :] < counts[:, None]
    keep.scatter_(1, idx, ~drop)
    return keep


def _drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a 2-D score that drops the ``k`` lowest entries of each row."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:  # which k, not their order: unsorted is 6× faster over a whole layer
        idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, idx, False)
    return keep


def keep_mask(score: torch.Tensor, sparsity: float, pattern: Pattern, scope: str = "layer") -> torch.Tensor:
    """Boolean keep-mask of a weight-shaped ``score`` (out, in); higher score = keep.

    ``sparsity`` below an N:M pattern's own sparsity selects a relaxed mask (used by gradual
    schedules): the top N of every group are kept, plus the best remaining weights until
    exactly ``round((1 - sparsity) · count)`` are kept (per layer or per row, by ``scope``).
    """
    if scope not in SCOPES:
        raise ConfigError(f"method.scope={scope!r} is not allowed; allowed: {', '.join(SCOPES)}")
    score = score.float()
    rows, cols = score.shape
    if pattern.unstructured:
        if scope == "row":
            return drop_lowest_rows(score, row_counts(sparsity, rows, cols))
        return _drop_lowest(score.reshape(1, -1), prune_count(sparsity, score.numel())).reshape(rows, cols)
    n, m = pattern.n, pattern.m
    if cols % m:
        raise ValueError(f"a {rows}x{cols} weight cannot take the {n}:{m} pattern: {cols} inputs % {m} != 0")
    groups = score.reshape(-1, m)
    keep = _drop_lowest(groups, m - n).reshape(rows, cols)
    if sparsity >= pattern.sparsity - 1e-12:
        return keep
    # Relaxed: top-N per group, then the best of the rest up to the requested density.
    rest = score.masked_fill(keep, -math.inf)
    if scope == "row":
        extra = (cols - row_counts(sparsity, rows, cols) - n * (cols // m)).clamp_min(0)
        return keep | ~drop_lowest_rows(-rest, extra)
    extra = score.numel() - prune_count(sparsity, score.numel()) - keep.sum().item()
    if extra <= 0:
        return keep
    idx = torch.topk(rest.reshape(-1), int(extra)).indices
    flat = keep.reshape(-1).clone()
    flat[idx] = True
    return flat.reshape(rows, cols)


def check_mask(keep: torch.Tensor, sparsity: float, pattern: Pattern, scope: str) -> None:
    """Raise AssertionError unless ``keep`` has exactly the pattern's sparsity (for tests and
    for the runner's sanity check after pruning)."""
    rows, cols = keep.shape
    if pattern.unstructured:
        want, got = prune_count(sparsity, keep.numel()), int((~keep).sum())
        assert got == want, f"{got} weights pruned, expected {want}"
        if scope == "row":
            per_row = (~keep).sum(1).cpu()
            assert torch.equal(per_row, row_counts(sparsity, rows, cols)), "rows prune unequal shares"
        return
    per_group = keep.reshape(-1, pattern.m).sum(1)
    assert bool((per_group == pattern.n).all()), (
        f"groups keep {per_group.unique().tolist()}, expected {pattern.n}"
    )


# ------------------------------------------------------------------ packed masks on disk
def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 with 8 entries per byte (a 7B model's masks in ~0.8 GB, not 6.5)."""
    flat = keep.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    flat = (packed.reshape(-1, 1) & bits).ne(0).reshape(-1)
    return flat[: math.prod(shape)].reshape(shape)
