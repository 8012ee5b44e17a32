"""Structured pruning on the families beyond LLaMA (issue 21, part 2): Qwen3, OLMo-2, Gemma 2,
Gemma 3, Phi-3 — each one declarative ``Family`` in ``prunelab.structure.arch``.

Per family: the parameter count read from the config equals the model's, masked ==
physically pruned (logits, and greedy generation through the KV cache), save → load (per-layer
and uniform shapes, the latter with plain transformers), the ratio plan met exactly by whole
GQA groups, the family's own coupled norms handled (kept whole or sliced and rescaled), and
the kinds a family cannot prune exactly refused before any model loads, with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from prunelab.errors import ConfigError
from prunelab.methods import PruneContext, build_method
from prunelab.models.loading import load_pretrained, save_model
from prunelab.runner import make_plan, plan_arch
from prunelab.structure import apply_masks, arch_info, prune_physically, units
from tests.conftest import make_model

# (family, kv heads, head_dim): GQA everywhere, head_dim ≠ hidden/heads where the family has
# it independent (Qwen3, Gemma), MHA once, q/k/v biases once
FAMS = [
    pytest.param(("qwen3", 2, 24), id="qwen3-gqa-hd24"),
    pytest.param(("qwen3_bias", 2, None), id="qwen3-bias"),
    pytest.param(("olmo2", 2, None), id="olmo2-gqa"),
    pytest.param(("olmo2", 4, None), id="olmo2-mha"),
    pytest.param(("gemma2", 2, 24), id="gemma2-gqa-hd24"),
    pytest.param(("gemma3", 2, 24), id="gemma3-gqa-hd24"),
    pytest.param(("gemma3", 4, None), id="gemma3-mha"),
    pytest.param(("phi3", 2, None), id="phi3-gqa-fused"),
    pytest.param(("phi3", 4, None), id="phi3-mha-fused"),
]
X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def fam_model(f, **kw):
    name, kv, hd = f
    return make_model(name, kv, head_dim=hd, **kw)


def name_of(model) -> str:
    return model.config.model_type


def some_masks(arch, seed=0):
    """Every layer loses one attention group (a different one per layer) and ~40% of its MLP
    channels: every unit is really pruned, so nothing passes by being left alone."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for u in units(arch, ("attn", "mlp")):
        if u.kind == "attn":
            keep = torch.ones(u.n, dtype=torch.bool)
            keep[u.layer % u.n] = False
        else:
            keep = torch.rand(u.n, generator=gen) > 0.4
            keep[0] = True
        masks[u.key] = keep
    return masks


@pytest.mark.parametrize("f", FAMS)
def test_param_count_from_config_matches_model(f):
    model = fam_model(f)
    assert arch_info(model.config).total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("f", FAMS)
def test_masked_equals_physically_pruned_and_generates_alike(f):
    model = fam_model(f)
    dense = model(input_ids=X).logits
    arch = arch_info(model.config)
    masks = some_masks(arch)
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    ref = masked(input_ids=X).logits
    new_arch = prune_physically(model, masks)
    out = model(input_ids=X).logits
    assert (ref - out).abs().max().item() <= 1e-5
    assert (dense - out).abs().max().item() > 1e-3  # something was really removed
    n = sum(p.numel() for p in model.parameters())
    assert new_arch.total_params() == n
    removed = sum(
        int((~k).sum()) * (arch.attn_group_params(0) if key.endswith("attn") else arch.mlp_channel_params())
        for key, k in masks.items()
    )
    assert arch.total_params() - n == removed  # the per-group accounting is what is removed
    for i, layer in enumerate(model.model.layers):  # whole GQA groups: q heads = group size · kv
        s = new_arch.layers[i]
        assert s.num_key_value_heads == arch.layers[i].num_key_value_heads - 1
        q_rows = (
            (s.num_attention_heads + 2 * s.num_key_value_heads)
            if name_of(model) == "phi3"
            else s.num_attention_heads
        )
        attn = layer.self_attn
        q = attn.qkv_proj if name_of(model) == "phi3" else attn.q_proj
        assert q.out_features == q_rows * arch.head_dim
        assert s.num_attention_heads == arch.group_size(i) * s.num_key_value_heads
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(masked.generate(prompt, **kw), model.generate(prompt, **kw))


@pytest.mark.parametrize("f", FAMS)
def test_save_load_per_layer_and_uniform_shapes(f, tmp_path):
    """Per-layer shapes in both checkpoint layouts (models/export.py). ``padded`` pads every
    layer to the largest head count, and when that count no longer divides the hidden size
    (here every layer lost a group), the hidden size too — which Qwen3, OLMo-2 and Gemma cannot
    do exactly (on the Gemma 3 MHA model it moved the logits by 0.007): refused, naming
    ``compact``, as are Phi-3's fused projections."""
    model = fam_model(f)
    arch = arch_info(model.config)
    prune_physically(model, some_masks(arch, seed=5))  # per-layer shapes
    out = model(input_ids=X).logits
    s = arch_info(model.config).layers
    heads = max(x.num_key_value_heads for x in s) * arch.group_size(0)
    unpaddable = arch.family.fused_qkv or (arch.hidden_size % heads and "hidden" in arch.family.refuse)
    for layout in ("compact", "padded"):
        if layout == "padded" and unpaddable:
            with pytest.raises(ConfigError, match=r"checkpoint_layout='padded' cannot save .*compact"):
                save_model(model, None, tmp_path / layout, layout=layout)
            continue
        save_model(model, None, tmp_path / layout, layout=layout)
        assert torch.equal(load_pretrained(tmp_path / layout).eval()(input_ids=X).logits, out), layout
    # every layer alike: a plain transformers config, loadable without prunelab
    model = fam_model(f)
    arch = arch_info(model.config)
    prune_physically(model, {u.key: torch.arange(u.n) % 2 == 0 for u in units(arch)})
    assert "prunelab_layer_shapes" not in model.config.to_dict()
    out = model(input_ids=X).logits
    save_model(model, None, tmp_path / "uniform")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    assert torch.equal(plain(input_ids=X).logits, out)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_head_dim_norms_are_kept_whole(name):
    """Qwen3 / Gemma 3 normalise each head over head_dim with one weight shared by all heads:
    removing heads leaves it as it was."""
    model = make_model(name, 2, head_dim=24)
    before = {
        k: v.clone() for k, v in model.state_dict().items() if k.endswith(("q_norm.weight", "k_norm.weight"))
    }
    prune_physically(model, some_masks(arch_info(model.config)))
    after = {k: v for k, v in model.state_dict().items() if k in before}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_olmo2_projection_norms_are_sliced_with_their_heads_and_rescaled():
    """OLMo-2's q_norm/k_norm run over the whole projection: a removed group takes its heads'
    slices, and the kept weights are scaled by sqrt(N/N') (the RMS no longer averages over
    the removed heads' zeros). Checked against the formula, and against an OLMo-2 built with
    the pruned sizes from scratch (transformers' own forward, not ours)."""
    import transformers as tf

    model = make_model("olmo2", 4, layers=1)  # MHA: 4 heads of 16
    attn = model.model.layers[0].self_attn
    q0, k0 = attn.q_norm.weight.detach().clone(), attn.k_norm.weight.detach().clone()
    keep = torch.tensor([True, False, True, True])
    rows = keep.repeat_interleave(16)
    masked = copy.deepcopy(model)
    apply_masks(masked, {"0.attn": keep})
    prune_physically(model, {"0.attn": keep})
    torch.testing.assert_close(attn.q_norm.weight, q0[rows] * (4 / 3) ** 0.5, rtol=0, atol=0)
    torch.testing.assert_close(attn.k_norm.weight, k0[rows] * (4 / 3) ** 0.5, rtol=0, atol=0)
    assert attn.q_norm.variance_epsilon == model.config.rms_norm_eps
    # a fresh 3-head OLMo-2 given the pruned weights computes the same logits
    cfg = tf.Olmo2Config(**{**model.config.to_dict(), "num_attention_heads": 3, "num_key_value_heads": 3})
    fresh = tf.Olmo2ForCausalLM(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    out = model(input_ids=X).logits
    assert torch.equal(fresh(input_ids=X).logits, out)
    assert (masked(input_ids=X).logits - out).abs().max().item() <= 1e-5


def _method(cfg: dict):
    return build_method(OmegaConf.create({"name": "m", "keep_first_layers": 0, "keep_last_layers": 0, **cfg}))


SP = "prunelab.methods.structured.StructuredPruner"


@pytest.mark.parametrize("f", FAMS)
@pytest.mark.parametrize("ratio", [0.15, 0.4])
def test_ratio_plan_is_met_by_whole_groups(f, ratio):
    """The plan (from the config alone) is what pruning removes, to the parameter."""
    model = fam_model(f, layers=4, inter=128)
    method = _method({"_target_": SP, "importance": "magnitude"})
    plan = make_plan(method, plan_arch(method, model.config), ratio)
    assert abs(plan.achieved - ratio) <= 0.01 * ratio
    masks = method.prune(model, plan, PruneContext(None, None, 0))
    assert {k: int((~masks[k]).sum()) if k in masks else 0 for k in plan.remove} == plan.remove
    if ratio == 0.4:  # large enough for whole KV groups to go
        assert any(n for k, n in plan.remove.items() if k.endswith("attn"))
    apply_masks(model, masks)
    prune_physically(model, masks)
    assert sum(p.numel() for p in model.parameters()) == plan.params_after


@pytest.mark.parametrize(
    "name,why",
    [
        ("qwen3", "rms_norm_eps"),
        ("olmo2", "rms_norm_eps"),
        ("gemma2", "sqrt\\(config.hidden_size\\)"),
        ("gemma3", "sqrt\\(config.hidden_size\\)"),
    ],
)
@pytest.mark.parametrize(
    "cfg",
    [
        {"_target_": SP, "targets": ["hidden"]},
        {"_target_": "prunelab.methods.llm_pruner.LLMPruner", "mode": "channel"},
    ],
    ids=["structured-hidden", "llm_pruner-channel"],
)
def test_channel_mode_is_refused_with_the_reason_before_loading(name, why, cfg):
    config = make_model(name, 2, layers=2).config  # only the config reaches the plan
    method = _method(cfg)
    with pytest.raises(ConfigError, match=f"model_type='{config.model_type}': .*{why}"):
        make_plan(method, plan_arch(method, config), 0.1)


def test_library_refuses_hidden_masks_on_a_family_that_cannot_narrow_exactly():
    model = make_model("gemma2", 2, layers=2)
    keep = torch.ones(64, dtype=torch.bool)
    keep[:8] = False
    with pytest.raises(ConfigError, match=r"hidden channels.*gemma2"):
        prune_physically(model, {"hidden": keep})
    with pytest.raises(ConfigError, match=r"hidden channels.*gemma2"):
        apply_masks(model, {"hidden": keep})


# ------------------------------------------------------------ the shared method table, per family
# Every structured method on every new family through the shared checks of
# tests/unit/test_methods.py (ratio met, masked == physically pruned, save → load, LoRA merge).
# The methods that train (LoRAPrune, LoRAShear, ATP) are slow: a few steps of real fine-tuning.
TABLE_FAMILIES = [("qwen3", 2), ("olmo2", 2), ("gemma2", 2), ("gemma3", 2), ("phi3", 2)]
TABLE_METHODS = [
    "structured-magnitude",
    "structured-layers",
    "llm_pruner-element1",
    "llm_pruner-vector",
    "loraprune-lora_grad",
    "lorashear",
    "atp",
    "atp-head_dim",
]
TRAINS = ("loraprune", "lorashear", "atp")


def _table():
    from tests.unit.test_methods import METHODS

    rows = {m[0]: m for m in METHODS}
    for fam in TABLE_FAMILIES:
        for name in TABLE_METHODS:
            marks = [pytest.mark.slow] if name.startswith(TRAINS) else []
            yield pytest.param(fam, *rows[name], marks=marks, id=f"{fam[0]}-{name}")


@pytest.mark.parametrize("fam,name,method_cfg,ratio,tol", list(_table()))
def test_structured_method_on_family(fam, name, method_cfg, ratio, tol, inputs, tmp_path):
    from prunelab.structure import masked_params
    from tests.checks import LINEARS, lora_merge_matches, masked_vs_physical
    from tests.unit.test_methods import _pruned

    model, plan, masks = _pruned(method_cfg, ratio, tol, family=fam, out_dir=tmp_path / "train")
    assert model.config.model_type == arch_info(model.config).model_type != "llama"
    masked = masked_params(arch_info(model.config), masks)
    assert masked > 0 if name == "atp-head_dim" else masked == 0
    assert any(not bool(v.all()) for v in masks.values())
    ref, out, new_arch = masked_vs_physical(model, masks, inputs)
    n_params = sum(p.numel() for p in model.parameters())
    achieved = 1 - (n_params - masked) / plan.params_before
    assert abs(achieved - ratio) <= tol * ratio, f"achieved {achieved:.4f} vs requested {ratio}"
    assert new_arch.total_params() == n_params
    assert torch.isfinite(out).all()
    assert (ref - out).abs().max().item() <= 1e-5
    save_model(model, None, tmp_path / "saved", layout="compact")  # padded: test_save_load_per_layer…
    assert torch.equal(load_pretrained(tmp_path / "saved").eval()(input_ids=inputs).logits, out)
    lora_merge_matches(model, inputs, [*LINEARS, "qkv_proj", "gate_up_proj"], tol=1e-4)  # + Phi-3's fused


def test_phi3_fused_parts_keep_their_own_rows():
    """Phi-3's qkv_proj holds [q | k | v] and gate_up_proj [gate | up]: removing KV group 1 of
    2 (query heads 2, 3; KV head 1) and MLP channel 5 keeps exactly the other rows of each part,
    checked by index against the dense weights; the per-layer head count reaches the attention."""
    model = make_model("phi3", 2, layers=2)  # 4 heads of 16, 2 KV heads, 96 channels
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv, gu = attn.qkv_proj.weight.detach().clone(), mlp.gate_up_proj.weight.detach().clone()
    keep_mlp = torch.ones(96, dtype=torch.bool)
    keep_mlp[5] = False
    prune_physically(model, {"0.attn": torch.tensor([True, False]), "0.mlp": keep_mlp})
    rows = [*range(0, 32), *range(64, 80), *range(96, 112)]  # q heads 0-1, k head 0, v head 0
    assert torch.equal(attn.qkv_proj.weight, qkv[rows])
    gate_up = [i for i in range(96) if i != 5] + [96 + i for i in range(96) if i != 5]
    assert torch.equal(mlp.gate_up_proj.weight, gu[gate_up])
    assert attn.num_key_value_heads == 1 and attn.config.num_attention_heads == 2
    # layer 1 keeps 4 heads: the shared config says 4, layer 0's attention has its own 2
    assert (
        model.config.num_attention_heads == 4
        and model.model.layers[1].self_attn.config.num_attention_heads == 4
    )
    dense = make_model("phi3", 2, layers=2)
    masked = copy.deepcopy(dense)
    apply_masks(masked, {"0.attn": torch.tensor([True, False]), "0.mlp": keep_mlp})
    assert (masked(input_ids=X).logits - model(input_ids=X).logits).abs().max().item() <= 1e-5


def test_phi3_lora_on_fused_modules_is_sliced_with_its_parts():
    """An un-merged LoRA adapter on qkv_proj / gate_up_proj loses the rows of the removed parts
    (lora_B), masked == physically pruned with the adapter still separate."""
    from peft import LoraConfig, get_peft_model

    model = make_model("phi3", 2, layers=2)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    pm.eval()
    masks = some_masks(arch_info(model.config))
    masked = copy.deepcopy(pm)
    apply_masks(masked, masks)
    ref = masked(input_ids=X).logits
    prune_physically(pm, masks)
    assert (pm(input_ids=X).logits - ref).abs().max().item() <= 1e-5
    layer = pm.base_model.model.model.layers[0]
    assert layer.self_attn.qkv_proj.lora_B["default"].weight.shape[0] == layer.self_attn.qkv_proj.out_features


def test_phi3_hidden_channels_are_exact(tmp_path):
    """Phi-3's norms are plain RMSNorms with nothing else reading the eps: channel mode works,
    each fused linear narrowed once."""
    model = fam_model(("phi3", 2, None))
    arch = arch_info(model.config)
    keep = torch.ones(arch.hidden_size, dtype=torch.bool)
    keep[torch.randperm(arch.hidden_size, generator=torch.Generator().manual_seed(0))[:13]] = False
    masked = copy.deepcopy(model)
    apply_masks(masked, {"hidden": keep})
    ref = masked(input_ids=X).logits
    new_arch = prune_physically(model, {"hidden": keep})
    out = model(input_ids=X).logits
    assert (ref - out).abs().max().item() <= 1e-5
    assert arch.total_params() - new_arch.total_params() == 13 * arch.hidden_channel_params()
    assert new_arch.total_params() == sum(p.numel() for p in model.parameters())
    save_model(model, None, tmp_path, layout="compact")
    assert torch.equal(load_pretrained(tmp_path).eval()(input_ids=X).logits, out)


# the hub configs (conf/model/*.yaml): each family's layout at its published dimensions
# (config.json of the named repository), planned from the config alone as a dry run does
HUB = {
    "qwen3_8b": (
        "Qwen3Config",
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
    ),
    "olmo2_7b": (
        "Olmo2Config",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=100352,
        ),
    ),
    "gemma2_9b": (
        "Gemma2Config",
        dict(
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            vocab_size=256000,
        ),
    ),
    "gemma3_1b": (
        "Gemma3TextConfig",
        dict(
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=262144,
        ),
    ),
    "phi3_mini": (
        "Phi3Config",
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
        ),
    ),
}


@pytest.mark.parametrize("name", list(HUB))
def test_hub_config_plans_at_its_real_dimensions(name):
    """The model config composes, and LLM-Pruner's plan at 20% meets the ratio on the family's
    real dimensions (config only; with more than one KV head, whole KV groups go too); the
    parameter count equals a meta-device model's."""
    import transformers as tf

    from prunelab.sparsity.blocks import meta_model
    from tests.unit.test_config import compose_cfg

    assert compose_cfg(f"model={name}").model.name == name
    cls, dims = HUB[name]
    config = getattr(tf, cls)(**dims)
    arch = arch_info(config)
    assert arch.total_params() == sum(p.numel() for p in meta_model(config).parameters())
    method = _method(
        {"_target_": "prunelab.methods.llm_pruner.LLMPruner", "keep_first_layers": 4, "keep_last_layers": 2}
    )
    plan = make_plan(method, plan_arch(method, config), 0.2)
    assert abs(plan.achieved - 0.2) <= 0.01 * 0.2
    attn = sum(n for k, n in plan.remove.items() if k.endswith("attn"))
    assert (attn > 0) == (arch.layers[0].num_key_value_heads > 1)


def test_lora_targets_on_fused_projections():
    """recovery.target_modules keep their leaf names (q_proj …); on Phi-3 the adapters go on the
    fused projections that hold them, only when every part is asked for."""
    from prunelab.recovery.lora import TARGET_MODULES, adapter_targets

    names = {n.rsplit(".", 1)[-1] for n, _ in make_model("phi3", 2, layers=1).named_modules()}
    assert adapter_targets(TARGET_MODULES, names) == (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], [])
    assert adapter_targets(("q_proj", "o_proj", "up_proj"), names) == (["o_proj"], ["q_proj", "up_proj"])
    llama = {n.rsplit(".", 1)[-1] for n, _ in make_model("llama", 2, layers=1).named_modules()}
    assert adapter_targets(TARGET_MODULES, llama) == (list(TARGET_MODULES), [])


def test_docs_family_table_names_every_described_family():
    """docs/models.md's "Model families" table has a row for every family the structure layer
    describes, and every family this file tests is one of them."""
    from pathlib import Path

    from prunelab.structure.arch import FAMILIES

    doc = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    table = doc[doc.index("## Model families") : doc.index("## How to add a model family")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for mt in FAMILIES:
        row = next((r for r in rows if f"`{mt}`" in r.split("|")[1]), None)
        assert row is not None, mt
        # the matrix's cells are what the structure layer does: structured methods yes; the hidden
        # column "refused" exactly where the family's description refuses hidden channels
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].startswith("yes") and cells[2].startswith("yes"), (mt, cells)
        assert cells[3].startswith("refused" if "hidden" in FAMILIES[mt].refuse else "yes"), (mt, cells[3])
    tested = {"gemma3": "gemma3_text"}
    for name, _ in TABLE_FAMILIES:
        assert tested.get(name, name) in FAMILIES


def test_loraprune_trains_the_olmo2_it_prunes():
    """LoRAPrune masks a head at o_proj's input while it trains; on OLMo-2 that alone would leave
    the head's q/k in the whole-projection RMS of the kept heads (without the norm hooks the
    logits here differ from the pruned model's by 0.38). Its hooks mask the norms' inputs too:
    the model it trains equals the masked (== physically pruned) model, and ``remove``
    restores the eps."""
    from peft import LoraConfig, get_peft_model

    from prunelab.methods.loraprune.pruner import PruneSchedule
    from prunelab.structure.groups import Unit

    model = make_model("olmo2", 4, layers=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    pm.eval()
    keep = torch.tensor([True, False, True, True])
    masked = copy.deepcopy(pm)
    apply_masks(masked, {"0.attn": keep})
    ref = masked(input_ids=X).logits
    before = pm(input_ids=X).logits
    arch = arch_info(model.config)
    sched = PruneSchedule(arch, [Unit(0, "attn", 4)], {"0.attn": 1}, "lora_grad", 0.9, 1, 0.0, 0.0)
    sched.masks["0.attn"] = keep.clone()
    sched.setup(pm)
    assert (pm(input_ids=X).logits - ref).abs().max().item() <= 1e-5
    sched.remove()
    assert pm.base_model.model.model.layers[0].self_attn.q_norm.variance_epsilon == model.config.rms_norm_eps
    assert torch.equal(pm(input_ids=X).logits, before)
