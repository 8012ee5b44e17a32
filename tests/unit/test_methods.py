"""The shared method table: every method through the same checks (peft's test-table habit).

Adding a method = one row here. Checks: the requested ratio is met, outputs stay finite,
masked == physically pruned, save → load round-trips, LoRA merge == unmerged.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prunelab.methods import PruneContext, build_method
from prunelab.models.loading import load_pretrained, save_model
from prunelab.structure import apply_masks, arch_info, prune_physically
from prunelab.structure.plan import plan_ratio
from tests.conftest import make_model

SP = "prunelab.methods.structured.StructuredPruner"
LLM = "prunelab.methods.llm_pruner.LLMPruner"
CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(7))

# (id, method config, ratio, relative tolerance); whole-head/-layer rows get the nearest amount
# fmt: off
METHODS = [
    ("structured-magnitude", {"_target_": SP, "importance": "magnitude"}, 0.3, 0.01),
    ("structured-l2", {"_target_": SP, "importance": "magnitude", "norm": 2}, 0.3, 0.01),
    ("structured-random", {"_target_": SP, "importance": "random", "seed": 3}, 0.3, 0.01),
    ("structured-mlp-only", {"_target_": SP, "targets": ["mlp"]}, 0.2, 0.01),
    ("structured-attn-only", {"_target_": SP, "targets": ["attn"]}, 0.1, 0.35),
    ("structured-layers", {"_target_": SP, "targets": ["layer"]}, 0.2, 0.35),
    ("llm_pruner-element1", {"_target_": LLM, "importance": "element1"}, 0.3, 0.01),
    ("llm_pruner-element2", {"_target_": LLM, "importance": "element2"}, 0.3, 0.01),
    ("llm_pruner-second", {"_target_": LLM, "importance": "second"}, 0.3, 0.01),
    ("llm_pruner-vector", {"_target_": LLM, "importance": "vector"}, 0.3, 0.01),
    ("llm_pruner-l2", {"_target_": LLM, "importance": "l2"}, 0.3, 0.01),
    ("llm_pruner-global", {"_target_": LLM, "ranking": "global"}, 0.3, 0.01),
    ("llm_pruner-iterative", {"_target_": LLM, "iterative_steps": 3}, 0.3, 0.01),
    ("llm_pruner-layers", {"_target_": LLM, "mode": "layer"}, 0.2, 0.35),
    ("llm_pruner-channel", {"_target_": LLM, "mode": "channel"}, 0.2, 0.05),
]
# fmt: on


def _pruned(method_cfg, ratio, tol, family=("llama", 2)):
    from omegaconf import OmegaConf

    model = make_model(*family, layers=6, inter=128)
    method = build_method(
        OmegaConf.create({"name": "m", **method_cfg, "keep_first_layers": 1, "keep_last_layers": 1})
    )
    arch = arch_info(model.config)
    plan = plan_ratio(arch, ratio, method.targets, method.layers(arch.num_layers), tol)
    masks = method.prune(model, plan, PruneContext(None, CALIB, 0))
    return model, plan, masks


@pytest.mark.parametrize("name,method_cfg,ratio,tol", METHODS, ids=[m[0] for m in METHODS])
def test_method_shared_checks(name, method_cfg, ratio, tol, inputs, tmp_path):
    model, plan, masks = _pruned(method_cfg, ratio, tol)
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    ref = masked(input_ids=inputs).logits
    new_arch = prune_physically(model, masks)
    out = model(input_ids=inputs).logits

    n_params = sum(p.numel() for p in model.parameters())
    achieved = 1 - n_params / plan.params_before
    assert abs(achieved - ratio) <= tol * ratio, f"achieved {achieved:.4f} vs requested {ratio}"
    assert new_arch.total_params() == n_params
    assert torch.isfinite(out).all()
    assert (ref - out).abs().max().item() <= 1e-5
    for i in range(6):  # protected layers untouched
        if i not in plan.prunable_layers and "layers" not in masks:
            assert (
                new_arch.layers[i] == arch_info(make_model("llama", 2, layers=6, inter=128).config).layers[i]
            )

    save_model(model, None, tmp_path)
    assert torch.equal(load_pretrained(tmp_path).eval()(input_ids=inputs).logits, out)

    # LoRA on the pruned model: merged weights give the adapter model's outputs.
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B starts at zero; make the adapter matter
    peft_model.eval()
    adapted = peft_model(input_ids=inputs).logits
    merged = peft_model.merge_and_unload()
    assert (adapted - out).abs().max().item() > 1e-4
    assert (merged(input_ids=inputs).logits - adapted).abs().max().item() <= 1e-4


def test_random_importance_depends_on_seed():
    cfg = METHODS[2][1]
    _, _, m1 = _pruned({**cfg, "seed": 1}, 0.3, 0.01)
    _, _, m2 = _pruned({**cfg, "seed": 2}, 0.3, 0.01)
    _, _, m1b = _pruned({**cfg, "seed": 1}, 0.3, 0.01)
    assert all(torch.equal(m1[k], m1b[k]) for k in m1)
    assert any(not torch.equal(m1[k], m2[k]) for k in m1)


def test_magnitude_prunes_the_smallest_mlp_channel():
    from omegaconf import OmegaConf

    model = make_model("llama", 2, layers=3, inter=128)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[7] *= 1e-4
        model.model.layers[1].mlp.gate_proj.weight[7] *= 1e-4
        model.model.layers[1].mlp.down_proj.weight[:, 7] *= 1e-4
    method = build_method(
        OmegaConf.create({"_target_": "prunelab.methods.structured.StructuredPruner", "targets": ["mlp"]})
    )
    arch = arch_info(model.config)
    plan = plan_ratio(arch, arch.mlp_channel_params() / arch.total_params(), ("mlp",), [1])  # one channel
    assert plan.remove == {"1.mlp": 1}
    masks = method.prune(model, plan, PruneContext(None, None, 0))
    assert torch.nonzero(~masks["1.mlp"]).flatten().tolist() == [7]
