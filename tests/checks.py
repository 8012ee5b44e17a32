"""The shared checks of the method tables (tests/unit/test_methods.py on tiny models,
tests/integration/test_smollm2.py on the real model): one implementation for both."""

from __future__ import annotations

import copy

import torch
from torch import nn

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def masked_vs_physical(model: nn.Module, masks: dict, x: torch.Tensor):
    """(logits of a masked copy, logits of ``model`` physically pruned in place, its new arch)."""
    from prunelab.structure import apply_masks, prune_physically

    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    ref = masked(input_ids=x).logits
    new_arch = prune_physically(model, masks)
    return ref, model(input_ids=x).logits, new_arch


def lora_merge_matches(
    model: nn.Module, x: torch.Tensor, targets: list[str], tol: float, std: float = 0.05
) -> nn.Module:
    """A random LoRA adapter on ``model``: merged weights give the adapter model's logits within
    ``tol``, and the adapter moves them by more than 10 × ``tol`` (so the check can fail).
    Returns the merged model."""
    from peft import LoraConfig, get_peft_model

    base = model(input_ids=x).logits
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # B starts at zero; make the adapter matter
                p.normal_(0, std, generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    adapted = peft_model(input_ids=x).logits
    merged = peft_model.merge_and_unload()
    assert (adapted - base).abs().max().item() > 10 * tol
    assert (merged(input_ids=x).logits - adapted).abs().max().item() <= tol
    return merged


def sparse_masks_hold(model: nn.Module, dense: nn.Module, masks: dict, ratio: float, method) -> None:
    """Every mask has the requested count / N:M pattern, every masked weight is zero, and no
    parameter outside the masks changed."""
    from prunelab.sparsity.patterns import check_mask

    params, dense_params = dict(model.named_parameters()), dict(dense.named_parameters())
    for n, keep in masks.items():
        check_mask(keep, ratio, method.pattern, method.scope)
        assert bool((params[n][~keep] == 0).all())
    for n, p in params.items():
        if n not in masks:
            assert torch.equal(p, dense_params[n]), f"{n} changed but was not pruned"
