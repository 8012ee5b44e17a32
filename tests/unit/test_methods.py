"""The shared method table: every method through the same checks (peft's test-table habit).

Adding a method = one row here. Checks: the requested ratio is met (masked-only groups — ATP
head_dim — counted as removed), outputs stay finite, masked == physically pruned, save → load
round-trips, LoRA merge == unmerged.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prunelab.methods import PruneContext, build_method
from prunelab.models.loading import load_pretrained, save_model
from prunelab.structure import arch_info, masked_params
from prunelab.structure.plan import plan_ratio
from tests.checks import LINEARS, lora_merge_matches, masked_vs_physical, sparse_masks_hold
from tests.conftest import make_model

SP = "prunelab.methods.structured.StructuredPruner"
LLM = "prunelab.methods.llm_pruner.LLMPruner"
LP = "prunelab.methods.loraprune.LoRAPrune"
# LoRAPrune fine-tunes while it prunes: a few steps on the embedded corpus (its tokenizer's vocab)
LP_TRAIN = {
    "format": "text",
    "cutoff_len": 32,
    "batch_size": 4,
    "micro_batch_size": 4,
    "max_steps": 10,
    "eval_every": 5,
    "val_size": 4,
    "warmup_steps": 0,
    "max_train_examples": 32,
}
LS = "prunelab.methods.lorashear.LoRAShear"
# LoRAShear: knowledge analysis + LHSPG periods on the same small budget; its recovery is a
# separate stage (tests/unit/test_lorashear.py)
LS_CFG = {
    "_target_": LS,
    "train": {k: v for k, v in LP_TRAIN.items() if k != "max_steps"},
    "knowledge": {"tokens": 256, "seq_len": 32},
    "lhspg": {"warmup_steps": 1, "periods": 2, "period_steps": 3},
    "recovery": {"enabled": False},
}
ATP = "prunelab.methods.atp.ATP"
ATP_CFG = {
    "_target_": ATP,
    "train": {**LP_TRAIN, "max_steps": 12},
    "generator": {"dim": 16, "heads": 2, "layers": 1, "lr": 5e-2},
    "freeze_patience": 2,
}
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
    ("loraprune-lora_grad", {"_target_": LP, "train": LP_TRAIN}, 0.1, 0.05),
    ("loraprune-taylor", {"_target_": LP, "importance": "taylor", "train": LP_TRAIN}, 0.1, 0.05),
    ("lorashear", LS_CFG, 0.1, 0.05),
    ("atp", ATP_CFG, 0.1, 0.01),
    ("atp-gru", {**ATP_CFG, "generator": {**ATP_CFG["generator"], "encoder": "gru"}}, 0.1, 0.01),
    ("atp-head_dim", {**ATP_CFG, "attention_space": "head_dim"}, 0.1, 0.01),
    ("lorashear-ablated", {**LS_CFG, "lora_aware": False, "knowledge": {"enabled": False},
                           "lhspg": {"enabled": False}}, 0.1, 0.05),
]
# fmt: on


def _pruned(method_cfg, ratio, tol, family=("llama", 2), out_dir=None):
    from omegaconf import OmegaConf

    extra = {"prune_freq": 2} if method_cfg["_target_"] == LP else {}
    method = build_method(
        OmegaConf.create({"name": "m", **method_cfg, "keep_first_layers": 1, "keep_last_layers": 1, **extra})
    )
    ctx = PruneContext(None, CALIB, 0)
    if getattr(method, "trains", False):
        from transformers import AutoTokenizer

        from prunelab.data.sources import load_source_config
        from prunelab.models.embedded import asset_dir

        model = make_model(*family, layers=6, inter=128, vocab=2048, max_pos=256)
        tok = AutoTokenizer.from_pretrained(asset_dir("tiny_llama"))
        ctx = PruneContext(
            tok, None, 0, data_cfg=load_source_config("embedded"), out_dir=out_dir, ratio_tolerance=tol
        )
    else:
        model = make_model(*family, layers=6, inter=128)
    arch = arch_info(model.config)
    plan = plan_ratio(arch, ratio, method.targets, method.layers(arch.num_layers), tol)
    masks = method.prune(model, plan, ctx)
    return model, plan, masks


@pytest.mark.parametrize("name,method_cfg,ratio,tol", METHODS, ids=[m[0] for m in METHODS])
def test_method_shared_checks(name, method_cfg, ratio, tol, inputs, tmp_path):
    model, plan, masks = _pruned(method_cfg, ratio, tol, out_dir=tmp_path / "train")
    masked = masked_params(arch_info(model.config), masks)  # ATP head_dim: zeroed in place
    assert masked > 0 if name == "atp-head_dim" else masked == 0
    ref, out, new_arch = masked_vs_physical(model, masks, inputs)

    n_params = sum(p.numel() for p in model.parameters())
    achieved = 1 - (n_params - masked) / plan.params_before
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
    lora_merge_matches(model, inputs, LINEARS, tol=1e-4)


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


# ------------------------------------------------------------------ the layer-wise (element-wise) family
LW = "prunelab.methods.layerwise."
# (id, method config, ratio); ratio = sparsity of the pruned linears
# fmt: off
SPARSE_METHODS = [
    ("magnitude-50", {"_target_": LW + "Magnitude"}, 0.5),
    ("magnitude-row-70", {"_target_": LW + "Magnitude", "scope": "row"}, 0.7),
    ("magnitude-2:4", {"_target_": LW + "Magnitude", "sparsity_pattern": "2:4"}, 0.5),
    ("wanda-50", {"_target_": LW + "Wanda"}, 0.5),
    ("wanda-layer-60", {"_target_": LW + "Wanda", "scope": "layer"}, 0.6),
    ("wanda-4:8", {"_target_": LW + "Wanda", "sparsity_pattern": "4:8"}, 0.5),
    ("sparsegpt-50", {"_target_": LW + "SparseGPT", "blocksize": 16}, 0.5),
    ("sparsegpt-row-70", {"_target_": LW + "SparseGPT", "scope": "row"}, 0.7),
    ("sparsegpt-2:4", {"_target_": LW + "SparseGPT", "sparsity_pattern": "2:4"}, 0.5),
    ("sparsegpt-1:4", {"_target_": LW + "SparseGPT", "sparsity_pattern": "1:4"}, 0.75),
    ("admm-50", {"_target_": LW + "ADMM"}, 0.5),
    ("admm-layer-60", {"_target_": LW + "ADMM", "scope": "layer", "layer_errors": True}, 0.6),
    ("admm-2:4", {"_target_": LW + "ADMM", "sparsity_pattern": "2:4"}, 0.5),
    ("admm-no-schedule", {"_target_": LW + "ADMM", "schedule": "none", "iterations": 5, "mask_iterations": 2}, 0.5),
    ("admm-mlp-only-kept-ends", {"_target_": LW + "ADMM", "modules": ["gate_proj", "up_proj", "down_proj"],
                                 "keep_first_layers": 1, "keep_last_layers": 1}, 0.5),
]
# fmt: on


@pytest.mark.parametrize("name,method_cfg,ratio", SPARSE_METHODS, ids=[m[0] for m in SPARSE_METHODS])
def test_layerwise_method_shared_checks(name, method_cfg, ratio, inputs, tmp_path):
    from omegaconf import OmegaConf

    from prunelab.recovery.lora import remask
    from prunelab.sparsity.checkpoint import load_masks, mark_config, save_masks, sparsity_summary
    from prunelab.structure.plan import plan_sparsity

    model = make_model("llama", 2, layers=4, inter=128)
    dense = copy.deepcopy(model)
    method = build_method(OmegaConf.create({"name": name, **method_cfg, "calibration_samples": 4}))
    arch = arch_info(model.config)
    layers = method.layers(arch.num_layers)
    plan = plan_sparsity(arch, ratio, method.pattern, method.scope, method.modules, layers)
    masks = method.prune(model, plan, PruneContext(None, CALIB, 0))

    # ratio met exactly, in the requested pattern, on the requested layers and modules only
    assert len(masks) == len(layers) * len(method.modules)
    summary = sparsity_summary(model, masks)
    assert summary["achieved"] == pytest.approx(plan.achieved, abs=1e-12)
    assert abs(plan.achieved - ratio) < 0.01
    sparse_masks_hold(model, dense, masks, ratio, method)
    if "layer_errors" in method_cfg:
        assert all(0 < r["rel_error"] < 1 for r in method.report.values())
    out = model(input_ids=inputs).logits
    assert torch.isfinite(out).all()

    # masked == pruned: re-applying the masks changes nothing
    from prunelab.sparsity.checkpoint import apply_weight_masks

    again = copy.deepcopy(model)
    apply_weight_masks(again, masks)
    assert torch.equal(again(input_ids=inputs).logits, out)

    # save -> load: same model, pattern recorded, masks round-trip
    mark_config(model, {"pattern": str(method.pattern), "sparsity": plan.achieved})
    save_model(model, None, tmp_path / "m")
    save_masks(masks, tmp_path / "masks.safetensors")
    loaded = load_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded(input_ids=inputs).logits, out)
    assert loaded.config.prunelab_sparsity["pattern"] == str(method.pattern)
    back = load_masks(tmp_path / "masks.safetensors")
    assert all(torch.equal(back[n], masks[n]) for n in masks)

    # LoRA merge == unmerged adapter; re-masking restores the exact sparsity
    merged = lora_merge_matches(model, inputs, list(method.modules), tol=1e-4)
    info = remask(merged, masks, {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)})
    assert info["weights_zeroed"] > 0
    assert sparsity_summary(merged, masks)["achieved"] == pytest.approx(plan.achieved, abs=1e-12)


def test_every_method_is_in_the_shared_tables_and_the_bench():
    """Adding a method (docs/adding_a_method.md): its config must reach the shared checks
    here and the benchmark's default list; both are checked from conf/method, not by hand."""
    from prunelab.api import compose
    from prunelab.bench import all_methods
    from prunelab.methods import base_method_configs

    tested = {cfg["_target_"] for _, cfg, *_ in METHODS + SPARSE_METHODS}
    for name in base_method_configs():
        target = compose([f"method={name}"]).method._target_
        assert target in tested, f"method={name} ({target}) has no row in the shared method tables"
        assert name in all_methods(), f"method={name} is missing from prunelab-bench's methods"
