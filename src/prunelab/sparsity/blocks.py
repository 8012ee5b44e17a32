"""Decoder blocks and their linear layers, found from the model itself rather than from a
family list, so the layer-wise methods run on any decoder-only model whose blocks are
sequences of ``nn.Linear`` (LLaMA, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo-2, …).

- :func:`decoder_layers`: the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks and
  its name (``model.layers`` for the LLaMA family), which names the masks.
- :func:`block_linears`: each block's ``nn.Linear``\\ s by their path inside the block
  (``self_attn.q_proj``; Phi-3: ``self_attn.qkv_proj``, ``mlp.gate_up_proj``).
- :func:`resolve_modules`: ``method.modules`` (leaf names such as ``q_proj``, or ``all``)
  against one block's linears; a fused projection is taken when every part is asked for.
- :class:`LinearArch`: what the sparsity plan needs (linear shapes per block, total
  parameters), read from a model built on the meta device from its config alone, so an
  unknown family is planned before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelab.errors import ConfigError

# Fused projections and the LLaMA names they hold (Phi-3; GPT-NeoX style query_key_value).
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
ALL = "all"


def _base(model: nn.Module) -> nn.Module:
    from prunelab.structure.groups import base_model

    return base_model(model)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks and their dotted name relative to ``model``: the
    ``nn.ModuleList`` of ``config.num_hidden_layers`` modules that hold linear layers (the
    shortest such name when there are several)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and (n is None or len(m) == n)
        and any(isinstance(x, nn.Linear) for x in m[0].modules())
    ]
    if not found:
        mt = getattr(config, "model_type", type(model).__name__)
        raise ConfigError(
            f"model_type={mt!r}: no list of {n} decoder blocks holding nn.Linear layers was found, so the "
            "layer-wise methods cannot walk it (blocks built from other layer types, e.g. GPT-2's Conv1D, "
            "are not supported)"
        )
    return min(found, key=lambda x: (x[0].count("."), len(x[0])))


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by their path inside it, in module order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def resolve_modules(requested: list[str] | tuple[str, ...], paths: list[str], where: str = "") -> list[str]:
    """The paths of ``paths`` (one block's linears) that ``method.modules`` selects, in the
    requested order. ``all`` selects every linear; a leaf name (``q_proj``) its linear; a
    fused projection (``qkv_proj``) is selected when all of its parts are asked for, and
    asking for only some of them is refused (one weight cannot be half pruned by name)."""
    from prunelab.sparsity.engine import LINEARS

    requested = list(requested)
    if requested == [ALL]:
        return list(paths)
    by_leaf: dict[str, str] = {}
    for p in paths:
        by_leaf.setdefault(leaf(p), p)
    out: list[str] = []
    for name in requested:
        if name in by_leaf:
            path = by_leaf[name]
        else:
            fused = [f for f, parts in FUSED.items() if name in parts and f in by_leaf]
            if not fused:
                if requested == list(LINEARS) and not any(n in by_leaf for n in requested):
                    return list(paths)  # the default on a family with other names: every linear
                raise ConfigError(
                    f"method.modules: {name!r} is not a linear layer of {where or 'this model'}'s blocks; "
                    f"allowed: {ALL} or names from {sorted(by_leaf)}"
                )
            missing = [p for p in FUSED[fused[0]] if p not in requested]
            if missing:
                raise ConfigError(
                    f"method.modules={requested}: {name} is part of the fused {fused[0]} in {where or 'this model'}, "
                    f"which holds {list(FUSED[fused[0]])}; ask for all of them ({', '.join(missing)} missing) or none"
                )
            path = by_leaf[fused[0]]
        if path not in out:
            out.append(path)
    return out


@dataclass(frozen=True)
class LinearShapes:
    """One block's linear layers: (out_features, in_features) by path inside the block."""

    linears: tuple[tuple[str, int, int], ...]

    def to_dict(self) -> dict:
        return {"linears": {p: [o, i] for p, o, i in self.linears}}


@dataclass(frozen=True)
class LinearArch:
    """The layer-wise plan's view of a model prunelab has no structure for: its blocks'
    linear shapes and its parameter count, from the module tree alone."""

    model_type: str
    layers: tuple[LinearShapes, ...]
    params: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        return {p: (o, i) for p, o, i in self.layers[layer].linears}

    def total_params(self) -> int:
        return self.params

    def uniform(self) -> bool:
        return len(set(self.layers)) == 1


def linear_arch(model: nn.Module) -> LinearArch:
    """A :class:`LinearArch` from a model (real, or built on the meta device)."""
    _, layers = decoder_layers(model)
    shapes = tuple(
        LinearShapes(tuple((p, m.out_features, m.in_features) for p, m in block_linears(b).items()))
        for b in layers
    )
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return LinearArch(str(getattr(model.config, "model_type", "")), shapes, total)


def meta_model(config: Any) -> nn.Module:
    """The model ``config`` describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise ConfigError(
            f"model_type={getattr(config, 'model_type', None)!r} has no causal-LM class in transformers: {e}"
        ) from e


def sparse_arch(config: Any, model: nn.Module | None = None) -> Any:
    """What the layer-wise plan reads: prunelab's own ArchInfo for the families it knows
    (per-layer shapes of structured-pruned checkpoints included), otherwise the linears of
    ``model`` or, before it loads, of a meta-device model built from ``config``."""
    from prunelab.structure.arch import SUPPORTED_MODEL_TYPES, arch_info

    if getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES:
        return arch_info(config)
    return linear_arch(model if model is not None else meta_model(config))
