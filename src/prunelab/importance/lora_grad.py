"""LoRA-guided importance (LoRAPrune, Zhang et al. 2024): structure scores from the LoRA
factors and *their* gradients only — no gradient of a frozen base weight is ever computed.

For a LoRA-adapted linear W' = W0 + s·B·A (s = α/r), with ∇A, ∇B the gradients of A, B:

    Ĝ = ∇B·A + B·∇A − ∇B·∇A          (estimate of ∇W', the frozen weight's gradient)
    I = |Ĝ ⊙ (W0 + s·B·A)|            (element importance)

Why Ĝ: one SGD step of size 1 on A and B changes the product by
(B − ∇B)(A − ∇A) − BA = −(∇B·A + B·∇A − ∇B·∇A) = −Ĝ, i.e. Ĝ is the update LoRA would make to
W' — with ∇B = s·∇W'·Aᵀ and ∇A = s·Bᵀ·∇W' it equals s·(∇W'·AᵀA + BBᵀ·∇W') − s²·∇W'·AᵀBᵀ∇W',
the true gradient seen through the adapter's row and column spaces (tested exactly).

A group's score sums its elements per module; each module's score vector is L2-normalised,
then the coupled modules of the group are summed (q, k, v, o per head / KV group; gate, up,
down per MLP channel). The estimators here share one signature, so ``magnitude`` (|W0 + s·B·A|)
and ``taylor`` (|∇W0 ⊙ W0|, true base-weight gradients: the memory-hungry comparison) are
config-selectable ablations.
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.structure import ArchInfo, Unit
from prunelab.structure.groups import base_weight, decoder_layers, grouped, lora_delta, weight_members

ESTIMATORS = ("lora_grad", "taylor", "magnitude")


def _lora_parts(module: nn.Module, adapter: str = "default"):
    """(A, B, scaling) of a peft LoRA linear."""
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]


def lora_grad_estimate(module: nn.Module, adapter: str = "default") -> torch.Tensor:
    """Ĝ = ∇B·A + B·∇A − ∇B·∇A (fp32) from the LoRA factors' current gradients."""
    a, b, _ = _lora_parts(module, adapter)
    if a.grad is None or b.grad is None:
        raise RuntimeError("lora_grad importance needs the LoRA gradients of a backward pass")
    a_, b_, ga, gb = a.detach().float(), b.detach().float(), a.grad.float(), b.grad.float()
    return gb @ a_ + b_ @ ga - gb @ ga


def merged_weight(module: nn.Module) -> torch.Tensor:
    """W0 + s·B·A (fp32)."""
    return base_weight(module).detach().float() + lora_delta(module)


def element_importance(module: nn.Module, estimator: str, adapter: str = "default") -> torch.Tensor:
    if estimator == "lora_grad":
        return (lora_grad_estimate(module, adapter) * merged_weight(module)).abs()
    if estimator == "magnitude":
        return merged_weight(module).abs()
    if estimator == "taylor":
        w = module.base_layer.weight
        if w.grad is None:
            raise RuntimeError("taylor importance needs the base weights' gradients (requires_grad on them)")
        return (w.grad.float() * w.detach().float()).abs()
    raise ValueError(f"estimator={estimator!r} not in {ESTIMATORS}")


def unit_scores(
    model: nn.Module, arch: ArchInfo, units: list[Unit], estimator: str
) -> dict[str, torch.Tensor]:
    """Group scores per unit: per-module group sums, L2-normalised, summed over the modules."""
    from prunelab.models.placement import materialized

    layers = decoder_layers(model)
    out = {}
    for unit in units:
        total = torch.zeros(unit.n)
        # a dispatched model: the layer's offloaded base weights, read only, for W0 + s·B·A
        with materialized(layers[unit.layer], write_back=False):
            for m in weight_members(arch, unit):  # biases and norms carry no LoRA factor
                module = layers[unit.layer].get_submodule(m.path)
                if not hasattr(module, "lora_A"):
                    raise ValueError(
                        f"{m.path} of layer {unit.layer} has no LoRA adapter; it belongs to {unit.key}"
                    )
                s = grouped(element_importance(module, estimator), m).sum(1).cpu()
                norm = s.norm()
                if not torch.isfinite(norm):
                    total = torch.full((unit.n,), float("nan"))  # the caller skips this update
                    break
                if norm > 0:
                    total += s / norm
        out[unit.key] = total
    return out


def base_weight_grads_absent(model: nn.Module) -> bool:
    """True when no non-LoRA parameter requires or holds a gradient (the LoRAPrune promise)."""
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        if p.requires_grad or p.grad is not None:
            return False
    return True
