"""Pruning methods. Each folder owns only what is unique to its method; the contract:

method = build_method(cfg.method)        # validates hyperparameters, loads nothing
method.targets                           # structure kinds it prunes, e.g. ("attn", "mlp")
method.sparse                            # True: zeroes weights (layer-wise family), plans sparsity
method.layers(num_layers)                # layers open to pruning
masks = method.prune(model, plan, ctx)   # may also update weights in place
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunelab.errors import ConfigError
from prunelab.structure.groups import Masks
from prunelab.structure.plan import PrunePlan


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


class Method(Protocol):
    name: str
    targets: tuple[str, ...]

    def layers(self, num_layers: int) -> list[int]: ...

    def prune(self, model: nn.Module, plan: PrunePlan, ctx: PruneContext) -> Masks: ...


def build_dataclass(cfg: DictConfig, group: str) -> Any:
    """Instantiate a config node whose ``_target_`` is a hyperparameter dataclass, refusing
    unknown keys with the allowed ones (``+method.typo=…`` would otherwise pass silently)."""
    cls = get_class(cfg._target_)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - allowed)
    if unknown and group == "method" and "sparsity_pattern" in unknown:
        raise ConfigError(
            f"method.sparsity_pattern applies to the layer-wise methods (admm, sparsegpt, wanda, magnitude); "
            f"method={cfg.name} removes whole structures, which N:M or unstructured patterns do not describe"
        )
    if unknown:
        raise ConfigError(
            f"{group}.{unknown[0]} is not a key of {group}={cfg.name}; allowed: {', '.join(sorted(allowed))}"
        )
    return cls(**kwargs)


def build_method(cfg: DictConfig) -> Method:
    return build_dataclass(cfg, "method")
