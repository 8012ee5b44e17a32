"""Pruning methods. Each folder owns only what is unique to its method; the contract every
method implements is ``PruningMethod`` (``prunelab.methods.base``): its docstring lists every
member the runner reads.

``build_method(cfg.method)`` turns a method config node into its validated dataclass;
``method_trainer`` builds the LoRA trainer of a method that trains while it prunes.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from prunelab.data.sources import plain  # noqa: F401  (re-exported: methods convert nested nodes with it)
from prunelab.errors import ConfigError
from prunelab.methods.base import PruneContext, PruningMethod

__all__ = [
    "COUPLED_MODULES",
    "PruneContext",
    "PruningMethod",
    "base_method_configs",
    "build_dataclass",
    "build_method",
    "method_trainer",
]

# the order methods are listed in (tables, benchmarks); a new method is appended after these
LISTING_ORDER = (
    "structured",
    "llm_pruner",
    "loraprune",
    "lorashear",
    "atp",
    "magnitude",
    "wanda",
    "sparsegpt",
    "admm",
)


def base_method_configs() -> list[str]:
    """Every ``conf/method`` config that is a method of its own, not a budget variant of
    another (a variant's defaults list starts from another method config, ``- <base>``).
    Derived from the config folder, so a new method shows up in the benchmark and the shared
    tests without edits."""
    from omegaconf import OmegaConf

    from prunelab.paths import conf_dir

    def is_variant(path) -> bool:
        entries = OmegaConf.load(path).get("defaults") or []
        return any(isinstance(e, str) and e != "_self_" and "/" not in e and "@" not in e for e in entries)

    names = [f.stem for f in sorted((conf_dir() / "method").glob("*.yaml")) if not is_variant(f)]
    order = {n: i for i, n in enumerate(LISTING_ORDER)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


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


def build_method(cfg: DictConfig) -> PruningMethod:
    """The method config node as its validated dataclass (a ``PruningMethod``)."""
    method = build_dataclass(cfg, "method")
    if not isinstance(method, PruningMethod):
        raise ConfigError(
            f"method._target_={cfg._target_} is not a pruning method (a subclass of "
            "prunelab.methods.base.PruningMethod)"
        )
    return method


def sub_config(cls: type, value: Any, key: str) -> Any:
    """A nested method config node (``method.knowledge``) as its dataclass; unknown keys are
    refused by name."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, cls):
        return value
    allowed = [f.name for f in fields(cls)]
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a mapping with keys {allowed}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a key of {key}; allowed: {', '.join(allowed)}")
    return cls(**value)


# The linears coupled to each structure kind: a method that trains LoRA on the structures it
# prunes needs an adapter on every one of them.
COUPLED_MODULES = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def lora_targets(targets: Any) -> tuple[str, ...]:
    """``method.targets`` of a method that trains LoRA while it prunes: a non-empty subset of
    the structure kinds whose coupled modules carry adapters (``COUPLED_MODULES``)."""
    targets = tuple(targets)
    if not targets or any(t not in COUPLED_MODULES for t in targets):
        raise ConfigError(
            f"method.targets={list(targets)} is not allowed; allowed: any of {list(COUPLED_MODULES)}"
        )
    return targets


def method_trainer(
    train: Any,
    name: str,
    seed: int,
    targets: tuple[str, ...] = (),
    key: str = "method.train",
    why: str = "",
    **fixed: Any,
) -> Any:
    """The LoRA trainer (``LoraRecovery``) of a method that trains while it prunes, from its
    ``train`` node (keys of recovery=lora; ``fixed`` keys override them). Errors name ``key``;
    every module coupled to a pruned structure kind in ``targets`` must get an adapter."""
    from prunelab.recovery.lora import LoraRecovery

    if isinstance(train, DictConfig):
        train = OmegaConf.to_container(train, resolve=True)
    allowed = [f.name for f in fields(LoraRecovery)]
    unknown = sorted(set(dict(train)) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]} is not a key of {key}; allowed: those of recovery=lora ({', '.join(allowed)})"
        )
    try:
        trainer = LoraRecovery(**{"name": name, "seed": seed, **dict(train), **fixed})
    except TypeError as e:
        raise ConfigError(f"{key}: {e}; allowed keys: those of recovery=lora") from e
    except ConfigError as e:
        raise ConfigError(str(e).replace("recovery.", f"{key}.")) from e
    missing = [m for t in targets for m in COUPLED_MODULES[t] if m not in trainer.target_modules]
    if missing:
        raise ConfigError(f"{key}.target_modules={list(trainer.target_modules)} misses {missing}: {why}")
    trainer.log_prefix = name
    return trainer


def check_trainer(trainer: Any, data_cfg: Any = None, key: str = "method.train") -> None:
    """Cheap checks of a method trainer's data (before any model loads), errors under ``key``."""
    try:
        trainer.check(data_cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("recovery.", f"{key}.")) from e
