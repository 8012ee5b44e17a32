"""LHSPG — LoRA Half-Space Projected Gradient (LoRAShear, part 3): drive the redundant groups
of a LoRA-adapted model to exactly zero while LoRA keeps training the rest.

After each ordinary LoRA optimizer step, for every redundant group g (all coupled slices of a
head group / MLP channel, base weight + LoRA):

    x_g  = [W + s·B·A]_g                         (the group's current effective weights)
    x̃_g  = x_g − λ_g · W_g / ‖W_g‖               (a step towards zero)
    x̃_g  = 0  if  ⟨x̃_g, W_g⟩ < ε·‖W_g‖²          (half-space projection)

x̃_g is written into the base weights and the group's LoRA slices (lora_B rows of q/k/v/
gate/up, lora_A columns of o/down) are zeroed, so the group's effective weight is x̃_g.
prunelab's realisation of the step size — the paper leaves it open — is λ_g = ‖x_g‖ / k with
k the steps left in the period: a linear decay that reaches exactly zero at the period's last
step (earlier when the projection fires). At period end ``merge_lora_into_base`` folds B·A
into the (important) base weights and restarts B at zero.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from prunelab.models.placement import materialized
from prunelab.structure import ArchInfo, Unit
from prunelab.structure.groups import (
    Member,
    decoder_layers,
    grouped,
    lora_parts,
    lora_slices,
    select_groups,
    weight_members,
)
from prunelab.structure.groups import base_weight as _base
from prunelab.structure.groups import lora_delta as _delta


def _write(t: torch.Tensor, m: Member, sel: torch.Tensor, values: torch.Tensor) -> None:
    """Write group rows ``values`` [|sel|, elems] back into ``t`` at the groups ``sel`` (bool [n])."""
    idx = select_groups(sel.to(t.device), m, t.shape[m.dim])
    if m.dim == 0:
        t[idx] = values.reshape(-1, t.shape[1]).to(t.dtype)
    else:
        k = int(sel.sum())
        t[:, idx] = (
            values.reshape(k, t.shape[0], m.width).permute(1, 0, 2).reshape(t.shape[0], -1).to(t.dtype)
        )


def _zero_lora(module: nn.Module, m: Member, sel: torch.Tensor) -> None:
    for w in lora_slices(module, m):
        idx = select_groups(sel, m, w.shape[m.dim])
        if m.dim == 0:
            w[idx.to(w.device)] = 0
        else:
            w[:, idx.to(w.device)] = 0


@torch.no_grad()
def group_norms(model: nn.Module, arch: ArchInfo, unit: Unit, effective: bool = True) -> torch.Tensor:
    """‖[W + s·B·A]_g‖ (or ‖W_g‖) of every group of ``unit`` over all its coupled slices."""
    layer = decoder_layers(model)[unit.layer]
    sq = torch.zeros(unit.n)
    with materialized(layer, write_back=False):  # a dispatched model: the layer's weights, read only
        for m in weight_members(arch, unit):
            mod = layer.get_submodule(m.path)
            w = _base(mod).float() + (_delta(mod) if effective else 0)
            sq += grouped(w, m).pow(2).sum(1).cpu()
    return sq.sqrt()


@torch.no_grad()
def lhspg_step(
    model: nn.Module,
    arch: ArchInfo,
    redundant: dict[str, torch.Tensor],
    steps_left: int,
    epsilon: float = 0.0,
    lora_aware: bool = True,
) -> dict[str, int]:
    """One LHSPG update of every redundant group (``redundant[key]``: bool over the unit's
    groups, True = redundant). Returns how many groups the half-space projection zeroed.

    ``lora_aware=False`` is the ablation without LoRA-aware groups: the step sees and writes
    the base weights only and leaves the LoRA slices training, so merging B·A refills the
    "zero" groups."""
    layers = decoder_layers(model)
    projected = {}
    for key, sel in redundant.items():
        if not bool(sel.any()):
            continue
        layer, kind = key.split(".")
        unit = Unit(int(layer), kind, sel.numel())
        block = layers[unit.layer]
        with contextlib.ExitStack() as stack:
            # a dispatched model: the unit's linears (each an offloaded unit of its own beside
            # resident adapters) as real tensors, the projected groups written back on exit
            for m in weight_members(arch, unit):
                stack.enter_context(materialized(block.get_submodule(m.path)))
            projected[key] = _project(block, arch, unit, sel, steps_left, epsilon, lora_aware)
    return projected


def _project(
    block: nn.Module,
    arch: ArchInfo,
    unit: Unit,
    sel: torch.Tensor,
    steps_left: int,
    epsilon: float,
    lora_aware: bool,
) -> int:
    """The LHSPG update of the redundant groups ``sel`` of ``unit`` in ``block`` (its weights
    real tensors); how many the half-space projection zeroed."""
    ms = weight_members(arch, unit)
    mods = [block.get_submodule(m.path) for m in ms]
    xs = [
        grouped(_base(mod).float() + (_delta(mod) if lora_aware else 0), m)[sel.to(_base(mod).device)]
        for m, mod in zip(ms, mods, strict=True)
    ]
    ws = [grouped(_base(mod).float(), m)[sel.to(_base(mod).device)] for m, mod in zip(ms, mods, strict=True)]
    x, w = torch.cat(xs, 1), torch.cat(ws, 1)
    w_norm = w.norm(dim=1, keepdim=True)
    lam = x.norm(dim=1, keepdim=True) / max(1, steps_left)
    direction = torch.where(w_norm > 0, w / w_norm.clamp_min(1e-30), torch.zeros_like(w))
    new = x - lam * direction
    new[w_norm.squeeze(1) == 0] = 0  # a group already at zero stays there
    if steps_left <= 1:
        new.zero_()  # the period ends: exactly zero
    zero = (new * w).sum(1) < epsilon * w_norm.squeeze(1).pow(2)
    new[zero] = 0
    start = 0
    for m, mod, part in zip(ms, mods, xs, strict=True):
        width = part.shape[1]
        _write(_base(mod), m, sel, new[:, start : start + width])
        if lora_aware:
            _zero_lora(mod, m, sel)
        start += width
    return int(zero.sum())


@torch.no_grad()
def merge_lora_into_base(model: nn.Module) -> None:
    """Fold s·B·A into every LoRA layer's base weight and restart B at zero (period end). A
    dispatched model: one LoRA layer at a time materialized, its merged weight written back
    into accelerate's offload store."""
    for mod in [m for m in model.modules() if lora_parts(m)]:
        with materialized(mod):
            mod.base_layer.weight += _delta(mod).to(mod.base_layer.weight.dtype)
            for _, b in lora_parts(mod):
                b.weight.zero_()


@torch.no_grad()
def saliency_terms(model: nn.Module, arch: ArchInfo, unit: Unit) -> torch.Tensor:
    """[3, n]: ‖W_g‖, |⟨W_g, (s·BA)_g⟩| and cos(W_g, (s·BA)_g) + 1 of every group of ``unit``
    over all its coupled slices (all ≥ 0), before any normalisation."""
    layer = decoder_layers(model)[unit.layer]
    ws, ds = [], []
    with materialized(layer, write_back=False):  # a dispatched model: the layer's weights, read only
        for m in weight_members(arch, unit):
            mod = layer.get_submodule(m.path)
            ws.append(grouped(_base(mod).float(), m).cpu())
            ds.append(grouped(_delta(mod), m).cpu())
    w, d = torch.cat(ws, 1), torch.cat(ds, 1)
    cos = torch.nn.functional.cosine_similarity(w, d, dim=1) + 1
    return torch.stack([w.norm(dim=1), (w * d).sum(1).abs(), cos])


def normalised_sum(terms: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k terms[k] / scale[k] (scale: each term's max, here or over a larger set of groups;
    a term that is 0 everywhere contributes 0). Higher = keep."""
    scale = terms.max(dim=1).values if scale is None else scale
    return (terms / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]).sum(0)


@torch.no_grad()
def saliency(model: nn.Module, arch: ArchInfo, unit: Unit) -> torch.Tensor:
    """LoRA-aware group saliency: the per-unit normalised sum of ‖W_g‖, |⟨W_g, (s·BA)_g⟩| and
    cos(W_g, (s·BA)_g) + 1 (all ≥ 0; higher = keep)."""
    return normalised_sum(saliency_terms(model, arch, unit))
