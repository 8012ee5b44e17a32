"""The contract between the runner (or ``prunelab.prune``) and a pruning method.

Every method derives from ``PruningMethod`` and is a dataclass of its hyperparameters (the
keys of its ``conf/method/*.yaml``). The runner reads only the members declared here, with
their declared defaults — there is no ``getattr(method, "flag", default)`` anywhere, so a
misspelled flag is an ``AttributeError`` in a test, not a silently ignored setting.

    method = build_method(cfg.method)        # validates hyperparameters, loads nothing
    method.check(data_cfg)                   # (training methods) cheap checks of its data
    plan = make_plan(method, arch, ratio)    # per-layer amounts, before the weights load
    masks = method.prune(model, plan, ctx)   # keep-masks; may update weights in place
    method.final_plan or plan                # what was actually removed (ATP/LoRAShear re-plan)
    method.record()                          # what results.json records of the method
    method.recover(...)                      # its own recovery stage (has_own_recovery)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunelab.structure.groups import Masks


@dataclass
class PruneContext:
    """What a method may use besides the model: tokenizer, calibration data, seed."""

    tokenizer: Any
    calibration: torch.Tensor | None
    seed: int
    device: torch.device | None = None  # where a method computes (None: where the model is)
    # methods that train while pruning (LoRAPrune): the run's data node, a folder, a tracker
    data_cfg: Any = None
    out_dir: Any = None
    tracker: Any = None
    run_dir: Any = None  # the run directory: artefacts researchers look at (LoRAShear's plot)
    ratio_tolerance: float = 0.01  # for methods that re-plan once they have seen the model


class PruningMethod(ABC):
    """Base of every pruning method. Subclasses are dataclasses; class-level flags below are
    the defaults a method overrides (as a ``ClassVar`` or, where users may set it, a field)."""

    # --- identity and what it prunes (fields of every method config)
    name: str
    targets: tuple[str, ...]  # structure kinds ("attn", "mlp", "layer", "hidden") or ("linear",)

    # --- nested config nodes read as classes of their own (prunelab.config_types types them)
    sub_configs: ClassVar[dict[str, type]] = {}

    # --- what kind of method it is
    sparse: ClassVar[bool] = False  # True: zeroes weights (layer-wise family); the plan is sparsity
    trains: ClassVar[bool] = False  # True: fine-tunes LoRA while pruning (gets data, a folder, a tracker)
    has_own_recovery: ClassVar[bool] = False  # True: recover() replaces the `recovery` group's stage
    then_recover: bool = True  # a training method: False = its training is the recovery (stage skipped)
    offload: bool = False  # model in CPU memory while pruning, one block at a time on the device

    # --- calibration: its own size (its paper's) where set, else the data config's
    calibration_samples: int | None = None
    calibration_seq_len: int | None = None

    # --- what it leaves behind after prune()
    final_plan: Any = None  # a plan made after seeing the model (ATP, LoRAShear); None: the given plan
    history: dict[str, Any] | None = None  # a training method's schedule → results.json "training"
    report: dict[str, dict] | None = None  # per-linear report of a layer-wise method

    @property
    def needs_calibration(self) -> bool:
        """Whether prune() reads ``ctx.calibration`` (the runner builds it only then)."""
        return False

    @property
    def recovers(self) -> bool:
        """Whether its own recovery stage runs (only read when ``has_own_recovery``)."""
        return self.has_own_recovery

    def check(self, data_cfg: Any = None) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Cheap checks of the data a training method will read, before any model loads."""

    @abstractmethod
    def layers(self, num_layers: int) -> list[int]:
        """The layers open to pruning."""

    @abstractmethod
    def prune(self, model: nn.Module, plan: Any, ctx: PruneContext) -> Masks:
        """Keep-masks of the plan's structures (or weights, for a sparse method)."""

    def recover(
        self,
        model: nn.Module,
        tokenizer: Any,
        out_dir: Path,
        tracker: Any = None,
        data_cfg: Any = None,
        prune_dir: Path | None = None,
    ) -> nn.Module:
        """Its own recovery stage on the physically pruned model (``has_own_recovery``)."""
        raise NotImplementedError(f"method={self.name} has no recovery of its own")

    def record(self) -> dict[str, Any]:
        """What results.json records of this method's prune stage besides plan and shapes."""
        return {"training": self.history} if self.trains else {}
