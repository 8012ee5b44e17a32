"""The layer-wise, post-training family: magnitude, Wanda, SparseGPT and ADMM.

    prunelab method=admm ratio=0.5
    prunelab -m method=admm,sparsegpt,wanda,magnitude method.sparsity_pattern=unstructured,2:4 ratio=0.5

Each method is one per-layer solver (``prunelab.sparsity.solvers``) on the shared
block-by-block engine (``prunelab.sparsity.engine``). They zero individual weights —
unstructured (per layer or per output row) or N:M — and never change shapes, so here
``ratio`` is the sparsity of the pruned linear layers (the papers' convention).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from prunelab.errors import ConfigError, bad_value
from prunelab.methods.base import PruneContext, PruningMethod
from prunelab.sparsity import solvers
from prunelab.sparsity.engine import ACTIVATION_STORES, LINEARS, pick_store, prune_layerwise
from prunelab.sparsity.patterns import SCOPES, Pattern, parse_pattern
from prunelab.structure.plan import SparsityPlan, prunable_layers

log = logging.getLogger(__name__)


def _positive_int(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"method.{key}={value!r} must be a positive integer")


@dataclass
class LayerwisePruner(PruningMethod):
    """Shared keys of the layer-wise methods (subclasses add their solver's knobs)."""

    SOLVER: ClassVar[str] = "magnitude"
    sparse: ClassVar[bool] = True  # element-wise: the runner plans sparsity, not removal

    name: str = "magnitude"
    sparsity_pattern: str = "unstructured"  # unstructured | N:M (2:4, 4:8, …)
    scope: str = "layer"  # unstructured masks compared per layer or per output row
    modules: tuple[str, ...] = field(default_factory=lambda: LINEARS)
    keep_first_layers: float | int = 0
    keep_last_layers: float | int = 0
    calibration_samples: int | None = 128  # the papers: 128 sequences (of 2048 tokens on C4)
    calibration_seq_len: int | None = None  # null = the data config's calibration length
    batch_size: int = 8  # calibration sequences per forward through a block
    layer_errors: bool = False  # also report ‖X(W−Ŵ)‖²/‖XW‖² per layer (collects XᵀX)
    offload: bool = False  # model in CPU memory, one block at a time on the device while pruning
    activations: str = "auto"  # where calibration batches wait between blocks: auto | memory | disk
    activation_budget_mb: float = 4096  # auto: memory while 2·n·T·H activations fit, disk beyond
    seed: int = 0

    def __post_init__(self) -> None:
        self.modules = (self.modules,) if isinstance(self.modules, str) else tuple(self.modules)
        self.pattern: Pattern = parse_pattern(self.sparsity_pattern)
        if self.scope not in SCOPES:
            raise bad_value("method.scope", self.scope, SCOPES)
        if not self.modules or not all(isinstance(m, str) and m for m in self.modules):
            raise ConfigError(
                f"method.modules={list(self.modules)} is not allowed; allowed: [all] or a non-empty list of the "
                f"blocks' linear layer names (LLaMA family: {list(LINEARS)}; fused ones such as qkv_proj are "
                "taken when all their parts are named)"
            )
        _positive_int("batch_size", self.batch_size)
        if self.activations not in ACTIVATION_STORES:
            raise bad_value("method.activations", self.activations, ACTIVATION_STORES)
        if isinstance(self.activation_budget_mb, bool) or not self.activation_budget_mb >= 0:
            raise ConfigError(f"method.activation_budget_mb={self.activation_budget_mb!r} must be ≥ 0 (MiB)")
        for key in ("calibration_samples", "calibration_seq_len"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key))
        self.report: dict[str, dict] = {}

    @property
    def targets(self) -> tuple[str, ...]:
        return ("linear",)

    @property
    def needs_calibration(self) -> bool:
        return solvers.NEEDS_DATA[self.SOLVER] or self.layer_errors

    def layers(self, num_layers: int) -> list[int]:
        return prunable_layers(num_layers, self.keep_first_layers, self.keep_last_layers)

    def solver_kwargs(self) -> dict:
        return {}

    def prune(self, model: nn.Module, plan: SparsityPlan, ctx: PruneContext) -> dict[str, torch.Tensor]:
        """Zero weights in place; return keep-masks by parameter name (report in ``self.report``)."""
        fn = partial(solvers.SOLVERS[self.SOLVER], **self.solver_kwargs())
        # N:M: exactly the pattern's sparsity (the plan already refused any other ratio)
        sparsity = plan.requested if self.pattern.unstructured else self.pattern.sparsity

        def solve(name, w, stats):
            return fn(w, stats, sparsity, self.pattern, self.scope)

        device = next(model.parameters()).device if ctx.device is None else ctx.device
        calibration = ctx.calibration if self.needs_calibration else None
        where = "memory"
        if calibration is not None:
            dtype = next(model.parameters()).dtype
            where = pick_store(
                self.activations, calibration, model.config.hidden_size, dtype, self.activation_budget_mb
            )
            log.info(
                "%s: calibration activations kept in %s (method.activations=%s)",
                self.name,
                where,
                self.activations,
            )
        masks, self.report = prune_layerwise(
            model,
            calibration,
            solve,
            plan.prunable_layers,
            self.modules,
            gram=solvers.NEEDS_GRAM[self.SOLVER],
            device=device,
            batch_size=self.batch_size,
            errors=self.layer_errors,
            desc=f"{self.name} ({self.pattern})",
            activations=where,
            activation_dir=ctx.out_dir,
        )
        return masks


@dataclass
class Magnitude(LayerwisePruner):
    """|W|, compared across the whole layer by default (the magnitude baseline of the papers)."""

    SOLVER: ClassVar[str] = "magnitude"
    name: str = "magnitude"


@dataclass
class Wanda(LayerwisePruner):
    """|W_ij|·‖X_j‖ compared within each output row (Sun et al. 2023), no weight update."""

    SOLVER: ClassVar[str] = "wanda"
    name: str = "wanda"
    scope: str = "row"


@dataclass
class SparseGPT(LayerwisePruner):
    """OBS updates over column blocks (Frantar & Alistarh 2023): blocks of 128 columns,
    damping 1% of the mean Hessian diagonal, tenfold more damping while factoring fails."""

    SOLVER: ClassVar[str] = "sparsegpt"
    name: str = "sparsegpt"
    blocksize: int = 128
    damping: float = 0.01
    max_damping_retries: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("blocksize", self.blocksize)
        if not self.damping > 0:
            raise ConfigError(f"method.damping={self.damping!r} must be > 0 (fraction of the mean diagonal)")
        if not isinstance(self.max_damping_retries, int) or self.max_damping_retries < 0:
            raise ConfigError(f"method.max_damping_retries={self.max_damping_retries!r} must be an int ≥ 0")

    def solver_kwargs(self) -> dict:
        return {
            "blocksize": self.blocksize,
            "damping": self.damping,
            "max_damping_retries": self.max_damping_retries,
        }


ADMM_SCHEDULES = ("cubic", "none")


@dataclass
class ADMM(LayerwisePruner):
    """ADMM weight update with gradual mask selection (Boža, TMLR 2024): λ = 0.1·mean diag of
    the normalised Gram matrix, ρ = 1, 20 iterations, cubic sparsity schedule over the first
    15 then frozen. Masks compared per output row by default (``scope``): ADMM's first mask
    is Wanda's score, and Wanda found per-row comparison best for LLMs."""

    SOLVER: ClassVar[str] = "admm"
    name: str = "admm"
    scope: str = "row"
    damping: float = 0.1  # λ as a fraction of mean(diag Ĝ)
    rho: float = 1.0
    iterations: int = 20
    mask_iterations: int = 15  # mask updated (gradually) in these first iterations, then frozen
    schedule: str = "cubic"  # cubic | none (target sparsity from the first iteration)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("iterations", self.iterations)
        _positive_int("mask_iterations", self.mask_iterations)
        if self.mask_iterations > self.iterations:
            raise ConfigError(
                f"method.mask_iterations={self.mask_iterations} exceeds method.iterations={self.iterations}; "
                "the mask must freeze within the run"
            )
        if not self.rho > 0:
            raise ConfigError(f"method.rho={self.rho!r} must be > 0")
        if not self.damping >= 0:
            raise ConfigError(f"method.damping={self.damping!r} must be ≥ 0")
        if self.schedule not in ADMM_SCHEDULES:
            raise bad_value("method.schedule", self.schedule, ADMM_SCHEDULES)

    def solver_kwargs(self) -> dict:
        return {
            "damping": self.damping,
            "rho": self.rho,
            "iterations": self.iterations,
            "mask_iterations": self.mask_iterations,
            "schedule": self.schedule,
        }
