"""ATP's paper attention space (issue 18.3 a, ``method.attention_space=head_dim``): per layer one
head-dimension channel mask for q/k and one for v/o, shared by every head, as the official
``layer_uniform_attn``. Checked against computations written here: zeroing by hand-computed
indices, the official pre-RoPE gating of the projection outputs, hand parameter counts and the
official ``caculate_remaining_parmams`` formula, the gates of both training steps, the proximal
step on the strided LoRA slices, and what the runner reports (masked vs stored parameters)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.methods import PruneContext, build_method
from prunelab.methods.atp import pruner as atp
from prunelab.structure import apply_masks, arch_info, masked_params, prune_physically, units
from prunelab.structure.arch import ArchInfo, LayerShape
from prunelab.structure.groups import Unit
from prunelab.structure.plan import plan_ratio
from tests.conftest import make_model, make_peft

HD, HEADS, KV, HIDDEN = 16, 4, 2, 64  # make_model("llama", 2): head_dim 16, 4 query heads, 2 KV heads


def _rows(channels: list[int], heads: int) -> list[int]:
    """Row h·head_dim + j of every head h for every channel j, written out by hand."""
    return [h * HD + j for h in range(heads) for j in channels]


def _keep(n: int, drop: list[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[drop] = False
    return keep


def _zero_by_hand(model, layer: int, qk: list[int], vo: list[int]) -> None:
    attn = model.model.layers[layer].self_attn
    with torch.no_grad():
        for lin, heads in ((attn.q_proj, HEADS), (attn.k_proj, KV)):
            lin.weight[_rows(qk, heads)] = 0
            if lin.bias is not None:
                lin.bias[_rows(qk, heads)] = 0
        attn.v_proj.weight[_rows(vo, KV)] = 0
        if attn.v_proj.bias is not None:
            attn.v_proj.bias[_rows(vo, KV)] = 0
        attn.o_proj.weight[:, _rows(vo, HEADS)] = 0


@pytest.mark.parametrize("family", ["llama", "llama_bias", "qwen2"])
def test_masks_zero_exactly_the_hand_indexed_rows_and_columns(family, inputs):
    """apply_masks and prune_physically on qk/vo keys == zeroing rows h·d + j of q (every
    query head), k and v (every KV head) and o's columns h·d + j, by hand; nothing else moves."""
    model = make_model(family, KV)
    masks = {"1.qk": _keep(HD, [3, 11, 5]), "1.vo": _keep(HD, [0, 9]), "2.vo": _keep(HD, [15])}
    ref = copy.deepcopy(model)
    _zero_by_hand(ref, 1, [3, 11, 5], [0, 9])
    _zero_by_hand(ref, 2, [], [15])
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    physical = copy.deepcopy(model)
    new_arch = prune_physically(physical, masks)  # masked-only kinds: zeroed, shapes unchanged
    want = dict(ref.named_parameters())
    for m in (masked, physical):
        for n, p in m.named_parameters():
            assert torch.equal(p, want[n]), n
    assert new_arch == arch_info(model.config)
    out = physical(input_ids=inputs).logits
    torch.testing.assert_close(out, ref(input_ids=inputs).logits, rtol=0, atol=0)
    assert (out - model(input_ids=inputs).logits).abs().max() > 1e-3  # the masks matter


def test_masked_model_is_the_official_pre_rope_gating_of_q_k_v(inputs):
    """The official masked forward (custom_llms/llama.py, eval branch): the q/k/v projection
    outputs multiplied by the layer's masks — K's and V's repeated over the KV heads, Q's over
    the query heads — before RoPE, o_proj unmasked. Zeroed weights give the same logits."""
    model = make_model("llama", KV, layers=2)
    qk, vo = _keep(HD, [1, 2, 9]), _keep(HD, [4, 7, 8])
    gated = copy.deepcopy(model)
    attn = gated.model.layers[0].self_attn
    m_k, m_v = qk.float().repeat(KV), vo.float().repeat(KV)  # [n_kv·d], as transform_output tiles
    m_q = m_k.repeat(HEADS // KV)  # pruning_K_mask.repeat(num_key_value_groups)
    hooks = [
        lin.register_forward_hook(lambda mod, a, out, g=g: out * g)
        for lin, g in ((attn.q_proj, m_q), (attn.k_proj, m_k), (attn.v_proj, m_v))
    ]
    ref = gated(input_ids=inputs).logits
    for h in hooks:
        h.remove()
    apply_masks(model, {"0.qk": qk, "0.vo": vo})
    torch.testing.assert_close(model(input_ids=inputs).logits, ref, rtol=1e-5, atol=1e-6)


def test_a_masked_qk_channel_with_its_rotary_partner_kept_still_contributes():
    """Why q/k channels are masked, not removed: RoPE rotates channel j with j + d/2, so with
    q_j = k_j = 0 the pair still adds q_p·k_p·cos((m − n)θ_j) — a model without channel j
    (the pair's other half alone, unrotated, or rotated at another frequency) differs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 2, HD, generator=g), torch.randn(1, 1, 2, HD, generator=g)
    j, p = 2, 2 + HD // 2
    q[..., j] = 0
    k[..., j] = 0
    theta = 10000.0 ** (-torch.arange(0, HD, 2).float() / HD)
    pos = torch.tensor([0.0, 5.0])
    freqs = torch.cat([torch.outer(pos, theta)] * 2, dim=-1)[None]
    qr, kr = apply_rotary_pos_emb(q, k, freqs.cos(), freqs.sin())
    pair = qr[0, 0, 1, [j, p]] @ kr[0, 0, 0, [j, p]]  # query at 5, key at 0
    torch.testing.assert_close(pair, q[0, 0, 1, p] * k[0, 0, 0, p] * math.cos(5 * theta[j]))
    assert abs(float(pair)) > 1e-3 and abs(float(pair - q[0, 0, 1, p] * k[0, 0, 0, p])) > 1e-3


def test_channel_parameters_match_a_hand_count_and_the_zeros_they_leave():
    """make_model("llama_bias", 2): a q/k channel is a q row in 4 heads and a k row in 2 KV
    heads, 64 inputs each, plus those 6 bias entries = 390; a v/o channel 2 v rows + 2 v bias
    entries + 4 o columns of 64 = 386. Over the 16 channels: exactly q, k, v, o and their
    biases. And masking one channel zeroes exactly that many (random, nonzero) parameters."""
    model = make_model("llama_bias", KV)
    arch = arch_info(model.config)
    assert arch.qk_channel_params(0) == (4 + 2) * 64 + 6 == 390
    assert arch.vo_channel_params(0) == 2 * 64 + 2 + 4 * 64 == 386
    attn = model.model.layers[0].self_attn
    qkvo = sum(p.numel() for n, p in attn.named_parameters() if not n.startswith("o_proj.bias"))
    assert HD * (arch.qk_channel_params(0) + arch.vo_channel_params(0)) == qkvo
    assert atp.structure_params(arch, Unit(0, "qk", HD)) == 390
    assert atp.structure_params(arch, Unit(0, "vo", HD)) == 386
    before = sum(int((p == 0).sum()) for p in model.parameters())
    for key, n in (("1.qk", 390), ("2.vo", 386)):
        m = copy.deepcopy(model)
        masks = {key: _keep(HD, [6])}
        apply_masks(m, masks)
        assert sum(int((p == 0).sum()) for p in m.parameters()) - before == n == masked_params(arch, masks)


def test_kept_parameters_equal_the_official_remaining_params_formula_on_llama3_8b():
    """train_llm.py ``caculate_remaining_parmams`` (llama3-8b): with m_K, m_V the layer masks
    tiled over the 8 KV heads [32, 1024], m_Q = m_K.repeat(1, 4), m_O = m_V.repeat(1, 4):
    remaining = 4096·(Σm_K + Σm_Q + Σm_V + Σm_O) + 3·4096·Σm_up. ATP's kept parameters under
    the same decisions, from its per-structure weights, must be that number."""
    arch = ArchInfo("llama", 4096, 128, 128256, False, False, False, False, (LayerShape(32, 8, 14336),) * 32)
    todo = units(arch, ("qk", "vo", "mlp"))
    weights = {u.key: atp.structure_params(arch, u) for u in todo}
    g = torch.Generator().manual_seed(0)
    keep = {u.key: (torch.rand(u.n, generator=g) < 0.6).long() for u in todo}
    m_k = torch.stack([keep[f"{i}.qk"].repeat(8) for i in range(32)])
    m_v = torch.stack([keep[f"{i}.vo"].repeat(8) for i in range(32)])
    m_up = torch.stack([keep[f"{i}.mlp"] for i in range(32)])
    m_q, m_o = m_k.repeat(1, 4), m_v.repeat(1, 4)
    official = 4096 * (m_k.sum() + m_q.sum() + m_v.sum() + m_o.sum()) + 3 * 4096 * m_up.sum()
    prunable = sum(u.n * weights[u.key] for u in todo)
    assert sum(int(keep[k].sum()) * w for k, w in weights.items()) == int(official)
    kept = atp.kept_fraction({k: v.double() for k, v in keep.items()}, weights, prunable)
    assert float(kept) == pytest.approx(int(official) / prunable, rel=1e-12)
    # the denominator: every q/k/v/o/gate/up/down weight (the official one adds 2 RMSNorms a layer)
    assert prunable == 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 14336 * 4096 * 3)


def test_gates_on_shared_channels_hard_on_the_frozen_path_soft_on_the_merged_path(inputs):
    """LoRA step: y = (W·x)⊙d + B·A·x — a plain copy with the frozen q/k/v rows of the pruned
    channels zeroed by hand and the adapters kept. Generator step: y = (W·x + B·A·x)⊙s — a
    merged copy whose q/k/v rows (and biases) are scaled by s by hand."""
    pm = make_peft(layers=2)
    arch = arch_info(pm.get_base_model().config)
    todo = units(arch, ("qk", "vo", "mlp"))
    gates = atp._Gates(arch, todo)
    gates.install(pm)
    d = {u.key: torch.ones(u.n) for u in todo}
    d["1.qk"][[0, 8, 13]] = 0
    d["1.vo"][[2, 5]] = 0
    ref = copy.deepcopy(pm)
    attn = ref.get_base_model().model.layers[1].self_attn
    with torch.no_grad():
        attn.q_proj.base_layer.weight[_rows([0, 8, 13], HEADS)] = 0
        attn.k_proj.base_layer.weight[_rows([0, 8, 13], KV)] = 0
        attn.v_proj.base_layer.weight[_rows([2, 5], KV)] = 0
        gates.mode, gates.values = "hard", d
        torch.testing.assert_close(
            pm(input_ids=inputs).logits, ref(input_ids=inputs).logits, rtol=1e-5, atol=1e-5
        )
        s = {u.key: torch.rand(u.n, generator=torch.Generator().manual_seed(3)) for u in todo}
        merged = copy.deepcopy(pm).merge_and_unload()
        for i, layer in enumerate(merged.model.layers):
            attn = layer.self_attn
            for lin, kind, heads in (
                (attn.q_proj, "qk", HEADS),
                (attn.k_proj, "qk", KV),
                (attn.v_proj, "vo", KV),
            ):
                for h in range(heads):
                    lin.weight[h * HD : (h + 1) * HD] *= s[f"{i}.{kind}"][:, None]
            for name in ("gate_proj", "up_proj"):
                getattr(layer.mlp, name).weight.mul_(s[f"{i}.mlp"][:, None])
        gates.mode, gates.values = "soft", s
        torch.testing.assert_close(
            pm(input_ids=inputs).logits, merged(input_ids=inputs).logits, rtol=1e-4, atol=1e-5
        )
    gates.remove()


def test_group_lasso_prox_on_a_shared_channel_thresholds_its_strided_lora_slices():
    """A pruned q/k channel j: its q lora_B rows h·d + j (4 heads × r = 4 entries each) form
    one group, its k lora_B rows another; a v/o channel: v lora_B rows and o lora_A columns.
    w_g ← w_g·max(0, 1 − t·√p_g/‖w_g‖); the kept channels' slices untouched."""
    pm = make_peft(layers=2)
    arch = arch_info(pm.get_base_model().config)
    attn = pm.get_base_model().model.layers[1].self_attn
    slices = {
        "q": (attn.q_proj.lora_B["default"].weight, 0, HEADS),
        "k": (attn.k_proj.lora_B["default"].weight, 0, KV),
        "v": (attn.v_proj.lora_B["default"].weight, 0, KV),
        "o": (attn.o_proj.lora_A["default"].weight, 1, HEADS),
    }
    before = {k: t.detach().clone() for k, (t, _, _) in slices.items()}
    pruned = torch.zeros(HD, dtype=torch.bool)
    pruned[[1, 10]] = True
    t = 0.02
    atp.group_lasso_prox(pm, arch, Unit(1, "qk", HD), pruned, t)
    atp.group_lasso_prox(pm, arch, Unit(1, "vo", HD), pruned, t)
    for k, (tensor, dim, heads) in slices.items():
        for j in range(HD):
            idx = _rows([j], heads)
            old = before[k][idx] if dim == 0 else before[k][:, idx]
            new = tensor[idx] if dim == 0 else tensor[:, idx]
            factor = max(0.0, 1 - t * math.sqrt(old.numel()) / float(old.norm())) if pruned[j] else 1.0
            torch.testing.assert_close(new.detach(), old * factor, rtol=1e-5, atol=1e-8)
    assert not torch.equal(slices["q"][0].detach(), before["q"])  # the step did something


def test_bad_attention_space_names_its_key():
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method.attention_space='heads_dim'.*heads, head_dim"):
        build_method(
            OmegaConf.create({"_target_": "prunelab.methods.atp.ATP", "attention_space": "heads_dim"})
        )


def test_paper_recipe_uses_the_papers_space_and_atp_keeps_heads():
    from hydra import compose, initialize_config_dir

    import prunelab.cli  # noqa: F401  (the run_dir_name resolver)
    from prunelab.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        paper = compose(config_name="config", overrides=["method=atp_paper"])
        small = compose(config_name="config", overrides=["method=atp"])
        real = compose(config_name="config", overrides=["method=atp_smollm2"])
    assert paper.method.attention_space == "head_dim"
    assert small.method.attention_space == real.method.attention_space == "heads"


ATP_TRAIN = {
    "format": "text",
    "cutoff_len": 32,
    "batch_size": 4,
    "micro_batch_size": 4,
    "max_steps": 30,
    "eval_every": 10,
    "val_size": 4,
    "warmup_steps": 0,
    "lr": 2e-3,
    "max_train_examples": 64,
}


def test_head_dim_run_meets_the_ratio_counting_masked_channels_and_reports_both(tmp_path, tok, inputs):
    """End to end on a tiny model: the generator decides qk/vo/mlp units; the achieved ratio —
    masked q/k/v/o channels counted as removed, MLP channels removed — is within
    ratio_tolerance; apply_method reports the stored count beside it; the pruned model holds
    exact zeros at every masked channel's rows and columns and loads back unchanged."""
    from prunelab.data.sources import load_source_config
    from prunelab.models.loading import load_pretrained, save_model
    from prunelab.runner import apply_method, ratio_record

    model = make_model("llama", KV, layers=4, vocab=2048, max_pos=256, inter=128)
    arch = arch_info(model.config)
    method = build_method(
        OmegaConf.create(
            {
                "_target_": "prunelab.methods.atp.ATP",
                "name": "atp",
                "attention_space": "head_dim",
                "schedule": "fast",
                "generator": {"dim": 16, "heads": 2, "layers": 1, "lr": 5e-2},
                "freeze_patience": 3,
                "train": ATP_TRAIN,
            }
        )
    )
    plan = plan_ratio(arch, 0.2, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
    ctx = PruneContext(
        tok, None, 0, data_cfg=load_source_config("embedded"), out_dir=tmp_path / "t", ratio_tolerance=0.01
    )
    done = apply_method(method, model, plan, ctx)
    masks = done.masks
    assert {k.split(".")[1] for k in masks} <= {"qk", "vo", "mlp"}
    qkvo = [k for k in masks if k.endswith((".qk", ".vo"))]
    assert qkvo, "the generator pruned no attention channel: the test would not test masking"
    masked = masked_params(arch, masks)
    assert masked == done.masked_params == method.history["params_masked"] > 0
    # the physical part: MLP channels only, the attention shapes unchanged
    for i, s in enumerate(done.arch.layers):
        assert (s.num_attention_heads, s.num_key_value_heads) == (HEADS, KV)
        assert s.intermediate_size == int(masks[f"{i}.mlp"].sum()) if f"{i}.mlp" in masks else 128
    stored = sum(p.numel() for p in model.parameters())
    assert stored == done.arch.total_params() and done.params_after == stored - masked
    assert done.plan.params_after == done.params_after
    achieved = 1 - done.params_after / plan.params_before
    assert abs(achieved - 0.2) <= 0.01 * 0.2, achieved
    rec = ratio_record(plan, done.params_after, None, done.masked_params)
    assert rec["achieved"] == pytest.approx(achieved) and rec["params_stored"] == stored
    assert rec["achieved_physically"] == pytest.approx(1 - stored / plan.params_before)
    assert rec["achieved_physically"] < rec["achieved"]
    # every masked channel is zero in the stored model: rows of q/k/v, columns of o
    for key in qkvo:
        i, kind = int(key.split(".")[0]), key.split(".")[1]
        drop = torch.nonzero(~masks[key]).flatten().tolist()
        attn = model.model.layers[i].self_attn
        if kind == "qk":
            assert (
                not attn.q_proj.weight[_rows(drop, HEADS)].any()
                and not attn.k_proj.weight[_rows(drop, KV)].any()
            )
        else:
            assert not attn.v_proj.weight[_rows(drop, KV)].any()
            assert not attn.o_proj.weight[:, _rows(drop, HEADS)].any()
    save_model(model, None, tmp_path / "m")
    reloaded = load_pretrained(tmp_path / "m").eval()
    assert torch.equal(reloaded(input_ids=inputs).logits, model(input_ids=inputs).logits)


def test_ratio_record_rereads_the_linear_convention_from_the_parameters_left():
    """ATP re-plans (its own decisions, maybe masked channels): the paper's linear-layer ratio in
    results.json must be what it left — (before − after) / the linear layers' parameters — not
    the first plan's; the first plan's record stays as it was."""
    from prunelab.runner import ratio_record
    from prunelab.structure.plan import linear_params, plan_convention

    arch = arch_info(make_model("llama", KV, layers=4).config)
    plan = plan_convention(arch, 0.3, "linear", ("attn", "mlp"), [1, 2])
    first = dict(plan.convention)
    after = plan.params_after - 5000
    rec = ratio_record(plan, after, None, params_masked=1234)
    linear = linear_params(arch, [1, 2])
    assert plan.convention["params_base"] == linear
    assert rec["convention"]["achieved"] == pytest.approx((plan.params_before - after) / linear)
    assert rec["convention"]["achieved"] != pytest.approx(first["achieved"])
    assert plan.convention == first
    assert rec["params_stored"] == after + 1234 and rec["achieved"] == pytest.approx(
        1 - after / plan.params_before
    )
    assert "params_masked" not in ratio_record(plan, after, None)  # nothing masked: nothing added
