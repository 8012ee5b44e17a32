"""ATP: the decision generator, its losses, the budget projection, the joint loop end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.errors import ConfigError
from prunelab.methods import PruneContext, build_method
from prunelab.methods.atp.generator import DecisionGenerator, straight_through
from prunelab.methods.atp.pruner import (
    budget_loss,
    kept_fraction,
    lora_group_norms,
    meet_budget,
    structure_params,
)
from prunelab.structure import Unit, apply_masks, arch_info, prune_physically, units
from prunelab.structure.plan import plan_ratio
from tests.conftest import Recorder, make_model


def test_straight_through_is_binary_forward_and_soft_backward():
    z = torch.tensor([-2.0, -0.1, 0.1, 3.0], requires_grad=True)
    s = torch.sigmoid(z / 0.4)
    d = straight_through(s)
    assert d.tolist() == [0.0, 0.0, 1.0, 1.0]
    (d * torch.arange(1.0, 5.0)).sum().backward()
    expected = torch.arange(1.0, 5.0) * s.detach() * (1 - s.detach()) / 0.4  # d/dz of sigmoid(z/T)
    assert torch.allclose(z.grad, expected)
    assert bool((z.grad != 0).all())


def test_budget_loss_is_zero_exactly_at_the_target_and_symmetric_in_ratio():
    assert float(budget_loss(torch.tensor(0.6, dtype=torch.float64), 0.6)) == 0.0
    assert float(budget_loss(torch.tensor(0.6), 0.6)) < 1e-7  # a float32 r: its rounding only
    assert float(budget_loss(torch.tensor(0.5), 0.6)) > 0 and float(budget_loss(torch.tensor(0.7), 0.6)) > 0
    assert math.isclose(
        float(budget_loss(torch.tensor(0.3), 0.6)),
        float(budget_loss(torch.tensor(1.2), 0.6)),
        rel_tol=1e-6,
    )


def test_kept_fraction_counts_parameters_not_structures():
    arch = arch_info(make_model("llama", 2, layers=2).config)
    us = units(arch, ("attn", "mlp"))
    w = {u.key: structure_params(arch, u) for u in us}
    total = sum(u.n * w[u.key] for u in us)
    keep = {u.key: torch.ones(u.n) for u in us}
    keep["0.attn"][0] = 0  # one KV group: many more parameters than one channel
    keep["0.mlp"][0] = 0
    r = float(kept_fraction(keep, w, total))
    assert math.isclose(r, 1 - (w["0.attn"] + w["0.mlp"]) / total, rel_tol=1e-6)
    assert w["0.attn"] == arch.attn_group_params(0) and w["0.mlp"] == arch.mlp_channel_params()


def test_generator_starts_with_everything_kept_and_both_encoders_work():
    arch = arch_info(make_model("llama", 2, layers=3).config)
    us = units(arch, ("attn", "mlp"))
    for enc in ("transformer", "gru"):
        gen = DecisionGenerator(us, arch.num_layers, dim=16, heads=4, layers=1, encoder=enc)
        assert all(bool(v.all()) for v in gen.decisions().values())
        soft, hard = gen(noise=True)
        assert set(soft) == {u.key for u in us}
        assert all(bool(((h == 0) | (h == 1)).all()) for h in hard.values())
        sum(h.sum() for h in hard.values()).backward()  # straight-through: gradients reach the heads
        assert all(p.grad is not None for p in gen.heads.parameters())
        assert not gen.tokens.requires_grad  # fixed inputs


def test_meet_budget_flips_least_confident_and_keeps_one_per_unit():
    w = {"0.attn": 10, "0.mlp": 1}
    keep = {"0.attn": torch.tensor([True, True, True]), "0.mlp": torch.ones(6, dtype=torch.bool)}
    margins = {"0.attn": torch.tensor([3.0, 0.1, 2.0]), "0.mlp": torch.tensor([0.5, 4, 4, 4, 4, 0.2])}
    out, flips = meet_budget(keep, margins, w, target=24)  # 36 kept → remove ~12
    kept = sum(int(out[k].sum()) * w[k] for k in w)
    assert abs(kept - 24) <= 5 and flips >= 1
    assert not bool(out["0.attn"][1])  # the lowest attention margin went first
    out2, _ = meet_budget(keep, margins, w, target=0)  # impossible: one structure per unit stays
    assert int(out2["0.attn"].sum()) == 1 and int(out2["0.mlp"].sum()) == 1
    empty = {"0.attn": torch.zeros(3, dtype=torch.bool), "0.mlp": torch.ones(6, dtype=torch.bool)}
    out3, _ = meet_budget(empty, margins, w, target=16)  # a unit the generator emptied
    assert bool(out3["0.attn"][0]) and int(out3["0.attn"].sum()) >= 1


def test_lora_group_norms_match_the_slices():
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(
        make_model("llama", 2, layers=2), LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_()
    arch = arch_info(pm.get_base_model().config)
    layer = pm.get_base_model().model.layers[1]
    unit = Unit(1, "mlp", arch.layers[1].intermediate_size)
    got = lora_group_norms(pm, arch, unit)
    j = 3
    sq = sum(
        layer.mlp.get_submodule(m).lora_B["default"].weight[j].pow(2).sum() for m in ("gate_proj", "up_proj")
    )
    sq = sq + layer.mlp.down_proj.lora_A["default"].weight[:, j].pow(2).sum()
    assert torch.isclose(got[j], sq.sqrt(), rtol=1e-5)


ATP_TRAIN = {
    "format": "text",
    "cutoff_len": 32,
    "batch_size": 4,
    "micro_batch_size": 4,
    "max_steps": 40,
    "eval_every": 10,
    "val_size": 4,
    "warmup_steps": 0,
    "lr": 2e-3,
    "max_train_examples": 64,
}


def _atp(**kw):
    cfg = {
        "_target_": "prunelab.methods.atp.ATP",
        "name": "atp",
        "generator": {"dim": 16, "heads": 2, "layers": 1, "lr": 5e-2},
        "freeze_patience": 3,
        "train": ATP_TRAIN,
        **kw,
    }
    return build_method(OmegaConf.create(cfg))


def test_atp_end_to_end_meets_the_budget_and_removal_is_nearly_free(tmp_path, tok):
    from prunelab.data.sources import load_source_config

    model = make_model("llama", 2, layers=4, vocab=2048, max_pos=256, inter=128)
    arch = arch_info(model.config)
    method = _atp(lasso=1.0)
    plan = plan_ratio(arch, 0.2, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
    tracker = Recorder()
    ctx = PruneContext(
        tok,
        None,
        0,
        data_cfg=load_source_config("embedded"),
        out_dir=tmp_path / "t",
        tracker=tracker,
        run_dir=tmp_path,
    )
    masks = method.prune(model, plan, ctx)
    h = method.history
    assert h["frozen_at"] is not None and h["frozen_at"] <= 20  # freeze_by 0.5 of 40 steps at the latest
    # the final parameter count within 1% of the target
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(1))
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    ref = masked(input_ids=ids).logits
    new = prune_physically(model, masks)
    assert (model(input_ids=ids).logits - ref).abs().max().item() <= 1e-5
    achieved = 1 - new.total_params() / plan.params_before
    assert abs(achieved - 0.2) <= 0.01 * 0.2, achieved
    assert method.final_plan.params_after == new.total_params()
    # the lasso drove the pruned structures' LoRA slices to (near) zero: removal is nearly free
    assert h["removal_max_abs_logit_change"] < 0.05
    # decisions over training: logged per unit, saved and plotted
    keys = {k for _, d in tracker.logged for k in d}
    assert {"atp/budget_loss", "atp/kept_params", "atp/kept/1.mlp"} <= keys
    assert json.loads((tmp_path / "atp_decisions.json").read_text())[0]["kept"]
    assert (tmp_path / "atp_decisions.png").read_bytes()[:4] == b"\x89PNG"
    assert tracker.images == [("atp/decisions", str(tmp_path / "atp_decisions.png"))]


def test_without_the_lasso_removal_costs_more(tmp_path, tok):
    from prunelab.data.sources import load_source_config

    costs = {}
    for lasso in (0.0, 1.0):
        model = make_model("llama", 2, layers=4, vocab=2048, max_pos=256, inter=128)
        arch = arch_info(model.config)
        method = _atp(lasso=lasso)
        plan = plan_ratio(arch, 0.2, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
        ctx = PruneContext(
            tok, None, 0, data_cfg=load_source_config("embedded"), out_dir=tmp_path / str(lasso)
        )
        method.prune(model, plan, ctx)
        costs[lasso] = method.history["removal_max_abs_logit_change"]
    assert costs[1.0] < costs[0.0]


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"generator": {"encoder": "lstm"}}, "method.generator.encoder"),
        ({"generator": {"dim": 10, "heads": 4}}, "method.generator.heads=4 must divide"),
        ({"generator": {"offset": -1}}, "method.generator.offset=-1"),
        ({"generator": {"depth": 2}}, "method.generator.depth is not a key"),
        ({"lasso": -0.1}, "method.lasso=-0.1"),
        ({"freeze_by": 0}, "method.freeze_by=0"),
        ({"train": {**ATP_TRAIN, "patience": 2}}, "method.train.patience cannot be set"),
        ({"train": {**ATP_TRAIN, "target_modules": ["q_proj"]}}, "misses"),
    ],
)
def test_bad_atp_values_name_their_key(kw, message):
    with pytest.raises(ConfigError, match=message):
        _atp(**kw)


def test_meet_budget_skips_a_structure_too_large_for_the_gap():
    """Mixed sizes: 4 heads of 100 parameters, 50 channels of 3. Kept 550, target 520: the least
    confident kept structure is a head, but removing it would land 50 below, farther than the
    30 above. The search must skip it (not stop there, which left ATP half a head off its
    budget) and take the ten least confident channels: exactly 520."""
    keep = {"0.attn": torch.ones(4, dtype=torch.bool), "0.mlp": torch.ones(50, dtype=torch.bool)}
    margins = {"0.attn": torch.tensor([0.0, 5, 5, 5]), "0.mlp": torch.linspace(1, 2, 50)}
    w = {"0.attn": 100, "0.mlp": 3}
    out, flips = meet_budget(keep, margins, w, target=520)
    assert sum(int(out[k].sum()) * w[k] for k in w) == 520 and flips == 10 and bool(out["0.attn"].all())
    assert torch.equal(~out["0.mlp"], torch.arange(50) < 10)
    # upwards: kept 203, target 230 — a head would overshoot by 73; nine channels hit 230
    down = {"0.attn": torch.tensor([True, True, False, False]), "0.mlp": torch.arange(50) == 0}
    out, flips = meet_budget(down, margins, w, target=230)
    assert sum(int(out[k].sum()) * w[k] for k in w) == 230 and flips == 9
    assert torch.equal(out["0.mlp"], (torch.arange(50) == 0) | (torch.arange(50) >= 41))  # most confident
