"""Per-layer solvers of the layer-wise family: given one linear layer's weight (out, in) and
the statistics of its calibration inputs X, return the pruned weight and its keep-mask.

    magnitude   |W|                                   (no data, no update)
    wanda       |W_ij| · ‖X_j‖                       (no update; Sun et al. 2023)
    sparsegpt   OBS updates over column blocks        (Frantar & Alistarh 2023)
    admm        ADMM weight update, gradual mask      (Boža 2024)

All work in fp32 on the statistics' device; formulas follow the papers (see
docs in METHODS.md), written for prunelab's (out, in) weight layout.
"""

from __future__ import annotations

import logging

import torch

from prunelab.sparsity.patterns import Pattern, drop_lowest_rows, keep_mask, prune_count, row_counts

log = logging.getLogger(__name__)


class InputStats:
    """Running statistics of one linear input: Σ x_j² per column and, when a solver needs it,
    the Gram matrix XᵀX — accumulated in fp32 over every calibration token. Layers that read
    the same input (q/k/v, gate/up) share one object, and derived matrices (inverses,
    factorisations) are computed once for all of them (``derived``)."""

    def __init__(self, width: int, gram: bool, device: torch.device | str = "cpu") -> None:
        self.width = width
        self.tokens = 0
        self.gram = torch.zeros(width, width, dtype=torch.float32, device=device) if gram else None
        self._sq = None if gram else torch.zeros(width, dtype=torch.float32, device=device)
        self._derived: dict[str, object] = {}

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.width).float()
        self.tokens += x.shape[0]
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
        else:
            self._sq.add_((x * x).sum(0))

    @property
    def col_sq(self) -> torch.Tensor:
        """Σ_t x_tj² (the diagonal of XᵀX)."""
        return self.gram.diagonal() if self.gram is not None else self._sq

    def derived(self, key: str, fn):
        if key not in self._derived:
            self._derived[key] = fn()
        return self._derived[key]


def reconstruction_error(w: torch.Tensor, w_new: torch.Tensor, stats: InputStats) -> float:
    """‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² from the Gram matrix (needs ``stats.gram``)."""
    g = stats.gram
    delta = (w - w_new).float()
    num = torch.einsum("oi,ij,oj->", delta, g, delta)
    den = torch.einsum("oi,ij,oj->", w.float(), g, w.float())
    return float(num / den.clamp_min(1e-30))


# ------------------------------------------------------------------ the data-free and Wanda scores
def magnitude(w: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern, scope: str):
    keep = keep_mask(w.abs(), sparsity, pattern, scope)
    return w * keep, keep, {}


def wanda(w: torch.Tensor, stats: InputStats, sparsity: float, pattern: Pattern, scope: str):
    score = w.abs().float() * stats.col_sq.sqrt()[None, :]
    keep = keep_mask(score, sparsity, pattern, scope)
    return w * keep, keep, {}


# ------------------------------------------------------------------ SparseGPT
def _block_counts(total: torch.Tensor, starts: list[int], width: int) -> list[torch.Tensor]:
    """Split each row's prune count ``total`` over the column blocks in proportion to their
    width, by cumulative rounding, so the blocks add up to exactly ``total``."""
    edges = [*starts, width]
    # round(total · e / width) in integer arithmetic: float32 division miscounts at LLaMA sizes
    cum = [(2 * total * e + width) // (2 * width) for e in edges]
    return [cum[i + 1] - cum[i] for i in range(len(starts))]


def _upper_inverse_factor(h: torch.Tensor, damping: float, retries: int):
    """Upper Cholesky factor of (H + δI)⁻¹, raising δ ×10 while the factorisation fails.
    Returns (factor or None, damping used)."""
    mean_diag = h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = damping
    for _ in range(retries + 1):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp *= 10
    return None, damp


def sparsegpt(
    w: torch.Tensor,
    stats: InputStats,
    sparsity: float,
    pattern: Pattern,
    scope: str,
    blocksize: int = 128,
    damping: float = 0.01,
    max_damping_retries: int = 4,
):
    """OBS pruning column block by column block: each pruned weight's error is spread over
    the not-yet-processed columns through the inverse Hessian's Cholesky factor.

    Masks are chosen per block of ``blocksize`` columns from w² / [H⁻¹]_jj² (exact counts per
    block that add up to the layer's or row's total), or per M-column group for N:M. Columns
    whose input is always zero get score 0 (pruned first, free). If H + δI cannot be factored
    even after ``max_damping_retries`` tenfold damping increases, the layer falls back to the
    Wanda mask without update (recorded in the layer report).
    """
    cols = w.shape[1]
    dead = stats.gram.diagonal() == 0

    def factor():  # once per statistic: q/k/v (gate/up) share it
        h = stats.gram.clone()
        h.diagonal()[dead] = 1.0
        return _upper_inverse_factor(h, damping, max_damping_retries)

    upper, damp_used = stats.derived(f"sparsegpt:{damping}:{max_damping_retries}", factor)
    if upper is None:
        log.warning(
            "sparsegpt: H + δI not factorisable even at damping %.3g; Wanda mask, no update", damp_used
        )
        new, keep, _ = wanda(w, stats, sparsity, pattern, scope)
        return new, keep, {"fallback": "wanda", "damping": damp_used}
    w = w.float().clone()
    keep = torch.ones_like(w, dtype=torch.bool)
    if pattern.m is not None and blocksize % pattern.m:
        blocksize = pattern.m * max(1, blocksize // pattern.m)  # N:M groups never straddle blocks
    starts = list(range(0, cols, blocksize))
    if pattern.unstructured:
        # the layer's exact total, split over the blocks (and over the rows for scope=row)
        if scope == "row":
            totals = row_counts(sparsity, w.shape[0], cols).to(w.device)
        else:
            totals = torch.tensor([prune_count(sparsity, w.numel())], device=w.device)
        counts = _block_counts(totals, starts, cols)
    for bi, a in enumerate(starts):
        b = min(a + blocksize, cols)
        w1 = w[:, a:b].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = upper[a:b, a:b]
        hdiag = hinv1.diagonal().pow(2)[None, :]
        live = ~dead[a:b][None, :]
        if pattern.unstructured:  # one mask for the whole block, from its weights at block start
            score = w1.pow(2) / hdiag * live
            if scope == "row":
                k1 = drop_lowest_rows(score, counts[bi])
            else:
                k1 = drop_lowest_rows(score.reshape(1, -1), counts[bi]).reshape(score.shape)
        else:
            k1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(b - a):
            if not pattern.unstructured and i % pattern.m == 0:
                # N:M: each group's mask from the weights as updated by the columns before it
                j = slice(i, i + pattern.m)
                k1[:, j] = keep_mask(
                    w1[:, j].pow(2) / hdiag[:, j] * live[:, j], pattern.sparsity, pattern, scope
                )
            col = w1[:, i]
            d = hinv1[i, i]
            q = col * k1[:, i]
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        keep[:, a:b] = k1
        w[:, a:b] = q1
        w[:, b:] -= err1 @ upper[a:b, b:]
    return w, keep, {"damping": damp_used}


# ------------------------------------------------------------------ ADMM
def cubic_schedule(target: float, k: int, mask_iterations: int) -> float:
    """s_k = s · (1 − (1 − (k+1)/K)³): the target sparsity at iteration K−1, then frozen."""
    if k >= mask_iterations - 1:
        return target
    return target * (1 - (1 - (k + 1) / mask_iterations) ** 3)


def admm(
    w: torch.Tensor,
    stats: InputStats,
    sparsity: float,
    pattern: Pattern,
    scope: str,
    damping: float = 0.1,
    rho: float = 1.0,
    iterations: int = 20,
    mask_iterations: int = 15,
    schedule: str = "cubic",
    eps: float = 1e-8,
):
    """ADMM weight update (Boža, TMLR 2024) in normalised coordinates.

    With d_j = sqrt(G_jj) + ε, Ĝ = D⁻¹GD⁻¹ and W̃ = W·D (so |W̃| is the Wanda score), solve
    min ‖X̂(W̃ − Z)‖² + λ‖W̃ − Z‖² over Z with the mask's support, λ = damping · mean(diag Ĝ):

        (Ĝ + λI + ρI)⁻¹ and B = W̃(Ĝ + λI) once; then per iteration k
        M = mask of |W + U| at sparsity s_k (gradual schedule, frozen after mask_iterations)
        Z = (W + U) ⊙ M;  U ← U + W − Z;  W ← (B + ρ(Z − U))(Ĝ + λI + ρI)⁻¹

    and Z / D is returned. ``schedule="none"`` uses the target sparsity from iteration 0.
    """
    if stats.gram is None:
        raise ValueError("admm needs the Gram matrix of the layer inputs")

    def factors():
        g = stats.gram
        d = g.diagonal().sqrt() + eps
        gn = g / d[:, None] / d[None, :]
        lam = damping * gn.diagonal().mean()
        a = gn + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        inv = torch.cholesky_inverse(torch.linalg.cholesky(a + rho * eye))
        return d, a, inv

    d, a, inv = stats.derived(f"admm:{damping}:{rho}:{eps}", factors)
    wt = w.float() * d[None, :]
    b = wt @ a
    if iterations < 1:
        raise ValueError(f"admm needs at least one iteration, got {iterations}")
    x = wt.clone()
    u = torch.zeros_like(x)
    keep = torch.ones_like(x, dtype=torch.bool)
    frozen = max(1, min(mask_iterations, iterations))
    target = pattern.sparsity if pattern.m is not None else sparsity
    for k in range(iterations):
        xu = x + u  # once per iteration (bit-identical to u + x)
        if k < frozen:
            s_k = cubic_schedule(target, k, frozen) if schedule == "cubic" else target
            keep = keep_mask(xu.abs(), s_k, pattern, scope)
        z = xu * keep
        u = xu.sub_(z)  # u + x − z
        x = (b + rho * (z - u)) @ inv
    return z / d[None, :], keep, {}


SOLVERS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "admm": admm}
NEEDS_GRAM = {"magnitude": False, "wanda": False, "sparsegpt": True, "admm": True}
NEEDS_DATA = {"magnitude": False, "wanda": True, "sparsegpt": True, "admm": True}


def relative_sparsity(keep: torch.Tensor) -> float:
    return 1.0 - keep.sum().item() / max(1, keep.numel())
