"""Coupled groups, masks and physical removal on tiny seeded models of every family."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelab.importance import select_masks
from prunelab.importance.magnitude import MagnitudeImportance
from prunelab.models.loading import load_pretrained, save_model
from prunelab.structure import apply_masks, arch_info, prune_physically, units
from prunelab.structure.groups import Unit
from tests.conftest import FAMILIES, make_model


def random_masks(arch, seed=0, kinds=("attn", "mlp")):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for u in units(arch, kinds):
        keep = torch.rand(u.n, generator=gen) > 0.4
        keep[torch.randint(u.n, (1,), generator=gen)] = True  # never empty
        masks[u.key] = keep
    return masks


@pytest.mark.parametrize("family", FAMILIES)
def test_param_count_from_config_matches_model(family):
    model = make_model(*family)
    assert arch_info(model.config).total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_physically_pruned(family, inputs):
    model = make_model(*family)
    masks = random_masks(arch_info(model.config))
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    ref = masked(input_ids=inputs).logits
    new_arch = prune_physically(model, masks)
    out = model(input_ids=inputs).logits
    assert (ref - out).abs().max().item() <= 1e-5
    assert new_arch.total_params() == sum(p.numel() for p in model.parameters())
    # the masks really removed something, and outputs changed vs the dense model
    assert sum(int((~m).sum()) for m in masks.values()) > 0
    dense = make_model(*family)(input_ids=inputs).logits
    assert (dense - out).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_pruned_with_kv_cache_generation(family):
    model = make_model(*family)
    masks = random_masks(arch_info(model.config), seed=3)
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    prune_physically(model, masks)
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(masked.generate(prompt, **kw), model.generate(prompt, **kw))


def test_layer_mask_equals_layer_removal(inputs):
    model = make_model("llama", 2, layers=4)
    masks = {"layers": torch.tensor([True, False, True, False])}
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    ref = masked(input_ids=inputs).logits
    arch = prune_physically(model, masks)
    assert arch.num_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert (ref - model(input_ids=inputs).logits).abs().max().item() <= 1e-5


def test_gqa_group_scores_aggregate_exactly_their_query_heads():
    # 8 query heads, 2 KV heads: KV head j is read by query heads 4j..4j+3.
    model = make_model("llama", kv=2, heads=8, layers=1, hidden=64)
    arch = arch_info(model.config)
    attn = model.model.layers[0].self_attn
    d = arch.head_dim
    with torch.no_grad():
        for p in attn.parameters():
            p.zero_()
        # Only query heads 4..7 carry weight: they belong to KV group 1, never to group 0.
        attn.q_proj.weight[4 * d : 8 * d] = 1.0
    scores = MagnitudeImportance(p=1).scores(model, arch, [Unit(0, "attn", 2)])["0.attn"]
    assert scores.tolist() == [0.0, 4 * d * 64]
    # and the o_proj columns of query heads 0..3 score group 0
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.o_proj.weight[:, : 4 * d] = 2.0
    scores = MagnitudeImportance(p=1).scores(model, arch, [Unit(0, "attn", 2)])["0.attn"]
    assert scores.tolist() == [2.0 * 64 * 4 * d, 0.0]


def test_gqa_pruning_removes_whole_kv_groups():
    model = make_model("llama", kv=2, heads=8, layers=1, hidden=64)
    arch = prune_physically(model, {"0.attn": torch.tensor([False, True])})
    attn = model.model.layers[0].self_attn
    assert arch.layers[0].num_attention_heads == 4 and arch.layers[0].num_key_value_heads == 1
    assert (
        attn.q_proj.out_features == 4 * 8 and attn.k_proj.out_features == 8 and attn.o_proj.in_features == 32
    )
    assert attn.num_key_value_groups == 4


def test_select_masks_drops_lowest_scores():
    masks = select_masks({"0.mlp": torch.tensor([3.0, 1.0, 2.0, 0.5])}, {"0.mlp": 2})
    assert masks["0.mlp"].tolist() == [True, False, True, False]


def test_removing_every_group_is_refused():
    model = make_model("llama", 2)
    with pytest.raises(ValueError, match="removes every attn group"):
        prune_physically(model, {"0.attn": torch.tensor([False, False])})


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip_per_layer_shapes(family, inputs, tmp_path):
    model = make_model(*family)
    prune_physically(model, random_masks(arch_info(model.config), seed=5))
    ref = model(input_ids=inputs).logits
    save_model(model, None, tmp_path)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").exists()
    loaded = load_pretrained(tmp_path).eval()
    assert torch.equal(loaded(input_ids=inputs).logits, ref)


def test_uniform_pruned_model_loads_with_plain_transformers(inputs, tmp_path):
    model = make_model("llama", 4)
    arch = arch_info(model.config)
    masks = {
        u.key: torch.arange(u.n) % 2 == 0 for u in units(arch)
    }  # every layer: 2 of 4 heads, half the channels
    prune_physically(model, masks)
    assert "prunelab_layer_shapes" not in model.config.to_dict()
    ref = model(input_ids=inputs).logits
    save_model(model, None, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(plain(input_ids=inputs).logits, ref)


def test_per_layer_checkpoint_refuses_plain_silent_reinit(tmp_path):
    """A compact per-layer checkpoint (the padded default loads plainly: test_export.py) is not
    silently re-initialised by plain transformers without its remote code: it fails."""
    model = make_model("llama", 4)
    prune_physically(model, {"0.mlp": torch.arange(96) < 50})
    save_model(model, None, tmp_path, layout="compact")
    with pytest.raises(RuntimeError):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_channel_masked_equals_physically_pruned(family, inputs, tmp_path):
    model = make_model(*family)
    arch = arch_info(model.config)
    keep = torch.ones(arch.hidden_size, dtype=torch.bool)
    keep[torch.randperm(arch.hidden_size, generator=torch.Generator().manual_seed(0))[:13]] = False
    masked = copy.deepcopy(model)
    apply_masks(masked, {"hidden": keep})
    ref = masked(input_ids=inputs).logits
    new_arch = prune_physically(model, {"hidden": keep})
    out = model(input_ids=inputs).logits
    assert (ref - out).abs().max().item() <= 1e-5  # RMSNorm weights and eps rescaled: exact
    assert new_arch.hidden_size == arch.hidden_size - 13
    assert arch.total_params() - new_arch.total_params() == 13 * arch.hidden_channel_params()
    assert new_arch.total_params() == sum(p.numel() for p in model.parameters())
    save_model(model, None, tmp_path)
    assert torch.equal(load_pretrained(tmp_path).eval()(input_ids=inputs).logits, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_aware_groups_prune_an_unmerged_adapter_model(family):
    """Removing a head group / MLP channel removes its LoRA slices too (lora_B rows of
    q/k/v/gate/up, lora_A columns of o/down): masked == physically pruned with the adapters
    still separate, pruning then merging == merging then pruning, and the pruned adapter
    model still trains."""
    from peft import LoraConfig, get_peft_model

    from prunelab.structure import apply_masks, arch_info, prune_physically

    torch.manual_seed(0)
    model = make_model(*family, layers=3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    arch = arch_info(model.config)
    kv = arch.layers[0].num_key_value_heads
    masks = {
        "0.attn": torch.tensor([True] * (kv - 1) + [False]),
        "1.mlp": torch.rand(96, generator=torch.Generator().manual_seed(1)) > 0.4,
        "2.attn": torch.tensor([False] + [True] * (kv - 1)),
    }
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    pm.eval()
    masked = copy.deepcopy(pm)
    apply_masks(masked, masks)
    ref = masked(input_ids=ids).logits
    merged_then_pruned = copy.deepcopy(pm).merge_and_unload()
    apply_masks(merged_then_pruned, masks)
    prune_physically(merged_then_pruned, masks)

    prune_physically(pm, masks)
    out = pm(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= 1e-5
    layer = pm.base_model.model.model.layers[1]
    kept = int(masks["1.mlp"].sum())
    assert layer.mlp.up_proj.lora_B["default"].weight.shape[0] == kept
    assert layer.mlp.down_proj.lora_A["default"].weight.shape[1] == kept
    assert layer.mlp.up_proj.out_features == kept and layer.mlp.down_proj.in_features == kept
    assert (merged_then_pruned(input_ids=ids).logits - out).abs().max().item() <= 1e-5
    # the pruned adapter model still trains: gradients reach the sliced adapters
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    assert layer.mlp.down_proj.lora_A["default"].weight.grad.shape[1] == kept
