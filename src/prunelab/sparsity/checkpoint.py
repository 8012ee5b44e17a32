"""Sparse checkpoints: weights saved with their masks applied, the pattern recorded in
config.json (``prunelab_sparsity``), and the keep-masks themselves packed 8 per byte next to
the run (``masks.safetensors``) so a later stage — LoRA recovery — can re-apply them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from prunelab.sparsity.patterns import pack_mask, unpack_mask

SPARSITY_KEY = "prunelab_sparsity"


def save_masks(masks: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    shapes = {k: list(v.shape) for k, v in masks.items()}
    save_file(
        {k: pack_mask(v) for k, v in masks.items()},
        str(path),
        metadata={"format": "packed-bits", "shapes": json.dumps(shapes)},
    )


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    packed = load_file(str(path))
    if meta.get("format") != "packed-bits":
        return {k: v.bool() for k, v in packed.items()}  # structured masks (one byte per group)
    shapes = json.loads(meta["shapes"])
    return {k: unpack_mask(v, tuple(shapes[k])) for k, v in packed.items()}


@torch.no_grad()
def apply_weight_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight whose keep-mask entry is False."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        p.mul_(keep.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def sparsity_summary(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """Measured on the weights themselves: sparsity of the masked linears (and per layer), and
    the fraction of all parameters that are zero."""
    from prunelab.models.placement import named_parameter_values

    per_layer = {}
    zeros = total = all_zero = all_params = 0
    # one pass; a dispatched model's offloaded weights read one unit at a time
    for name, p in named_parameter_values(model):
        z = int((p == 0).sum())
        all_zero, all_params = all_zero + z, all_params + p.numel()
        if name in masks:
            per_layer[name] = z / p.numel()
            zeros += z
            total += p.numel()
    per_layer = {name: per_layer[name] for name in masks}
    return {
        "achieved": zeros / max(1, total),
        "zero_fraction": all_zero / all_params,
        "per_layer": per_layer,
    }


def mark_config(model: nn.Module, info: dict) -> None:
    """Record the sparsity pattern in config.json (reloading is a plain ``from_pretrained``)."""
    setattr(model.config, SPARSITY_KEY, info)
