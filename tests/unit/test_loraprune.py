"""LoRAPrune: the LoRA-gradient estimate, the schedule, monotone masks, and the method end to
end on a tiny seeded model with the embedded tokenizer and data."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.importance import lora_grad
from prunelab.methods import PruneContext, build_method
from prunelab.methods.loraprune import pruner as lp
from prunelab.structure import apply_masks, arch_info, prune_physically
from prunelab.structure.plan import plan_ratio
from tests.conftest import make_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(model, r=4, alpha=8):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(n) % 1000))
    return pm


def test_lora_gradient_estimate_algebra():
    """Ĝ = ∇B·A + B·∇A − ∇B·∇A equals s(G·AᵀA + BBᵀ·G) − s²·G·AᵀBᵀG for the true gradient G of
    the merged weight — checked against G from autograd — and no base weight gets a gradient."""
    pm = _peft(make_model("llama", 2, layers=2))
    mod = pm.base_model.model.model.layers[1].mlp.up_proj
    seen = {}
    mod.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach()))
    mod.register_full_backward_hook(lambda m, gi, go: seen.__setitem__("gy", go[0].detach()))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    pm(input_ids=ids, labels=ids).loss.backward()
    assert lora_grad.base_weight_grads_absent(pm)
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    gy = seen["gy"].reshape(-1, seen["gy"].shape[-1]).double()
    g_true = gy.T @ x  # dL/dW' of y = x W'ᵀ
    a, b = mod.lora_A["default"].weight.detach().double(), mod.lora_B["default"].weight.detach().double()
    s = mod.scaling["default"]
    assert torch.allclose(mod.lora_B["default"].weight.grad.double(), s * g_true @ a.T, atol=1e-6)
    assert torch.allclose(mod.lora_A["default"].weight.grad.double(), s * b.T @ g_true, atol=1e-6)
    expected = s * (g_true @ a.T @ a + b @ b.T @ g_true) - s * s * g_true @ a.T @ b.T @ g_true
    est = lora_grad.lora_grad_estimate(mod).double()
    assert torch.allclose(est, expected, atol=1e-6)
    # it is the (negated) change of B·A under one unit SGD step on A and B
    ga, gb = mod.lora_A["default"].weight.grad.double(), mod.lora_B["default"].weight.grad.double()
    assert torch.allclose(b @ a - (b - gb) @ (a - ga), est, atol=1e-6)
    # importance = |Ĝ ⊙ (W0 + s·B·A)|
    merged = mod.base_layer.weight.detach().double() + s * b @ a
    imp = lora_grad.element_importance(mod, "lora_grad").double()
    assert torch.allclose(imp, (est * merged).abs(), atol=1e-6)


def test_unit_scores_are_normalised_per_module_and_summed():
    pm = _peft(make_model("llama", 2, layers=2))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    pm(input_ids=ids, labels=ids).loss.backward()
    arch = arch_info(pm.base_model.model.config)
    from prunelab.structure import units

    us = units(arch, ("attn", "mlp"))
    scores = lora_grad.unit_scores(pm, arch, us, "lora_grad")
    # MLP: three members (gate/up rows, down columns), each L2-normalised: the sum's norm ≤ 3
    mlp = scores["0.mlp"]
    assert mlp.shape == (96,) and 1.0 < float(mlp.norm()) <= 3.0 + 1e-5
    assert set(scores) == {u.key for u in us}


def test_nonfinite_module_score_makes_the_unit_score_nan():
    """So LoRAPrune's moving average skips the update instead of using a partial sum."""
    pm = _peft(make_model("llama", 2, layers=2))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    pm(input_ids=ids, labels=ids).loss.backward()
    pm.base_model.model.model.layers[0].mlp.up_proj.lora_B["default"].weight.grad[0, 0] = float("nan")
    arch = arch_info(pm.base_model.model.config)
    from prunelab.structure import units

    scores = lora_grad.unit_scores(pm, arch, units(arch, ("attn", "mlp")), "lora_grad")
    assert torch.isnan(scores["0.mlp"]).all() and torch.isfinite(scores["1.mlp"]).all()


def test_cubic_schedule():
    f = [lp.cubic_fraction(s, 100, 0.1, 0.1) for s in range(101)]
    assert f[:11] == [0.0] * 11  # nothing before warm-up ends
    assert f[90:] == [1.0] * 11  # the final ratio from the cool-down on
    assert all(a <= b for a, b in itertools.pairwise(f))
    assert f[20] > 1 - (1 - 10 / 80) ** 3 - 1e-9  # cubic: fast early


def test_grow_masks_only_adds_zeros():
    masks = {"0.mlp": torch.ones(6, dtype=torch.bool)}
    lp.grow_masks(masks, {"0.mlp": torch.tensor([5.0, 1, 4, 2, 6, 3])}, {"0.mlp": 2})
    assert (~masks["0.mlp"]).nonzero().flatten().tolist() == [1, 3]
    # the scores flip: masked groups stay masked, the next lowest kept ones follow
    lp.grow_masks(masks, {"0.mlp": torch.tensor([0.0, 9, 1, 9, 2, 3])}, {"0.mlp": 4})
    assert (~masks["0.mlp"]).nonzero().flatten().tolist() == [0, 1, 2, 3]
    lp.grow_masks(masks, {"0.mlp": torch.zeros(6)}, {"0.mlp": 1})  # a lower target never restores
    assert int((~masks["0.mlp"]).sum()) == 4


def _method(**kw):
    train = {
        "data": "embedded",
        "format": "text",
        "cutoff_len": 32,
        "batch_size": 4,
        "micro_batch_size": 4,
        "max_steps": 20,
        "eval_every": 5,
        "val_size": 4,
        "warmup_steps": 0,
        "lr": 1e-3,
        "max_train_examples": 64,
    }
    cfg = {
        "_target_": "prunelab.methods.loraprune.LoRAPrune",
        "name": "loraprune",
        "prune_freq": 2,
        "keep_first_layers": 1,
        "keep_last_layers": 1,
        "train": train,
        **kw,
    }
    return build_method(OmegaConf.create(cfg))


def _run(method, tmp_path, tok, ratio=0.1):
    from prunelab.data.sources import load_source_config

    model = make_model("llama", 2, layers=4, vocab=2048, max_pos=256, inter=128)
    arch = arch_info(model.config)
    plan = plan_ratio(arch, ratio, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
    ctx = PruneContext(tok, None, 0, data_cfg=load_source_config("embedded"), out_dir=tmp_path)
    masks = method.prune(model, plan, ctx)
    return model, plan, masks


@pytest.mark.parametrize("importance", ["lora_grad", "taylor", "magnitude"])
def test_loraprune_end_to_end(importance, tmp_path, tok, monkeypatch):
    snapshots = []
    real_grow = lp.grow_masks

    def recording_grow(masks, scores, want):
        real_grow(masks, scores, want)
        snapshots.append({k: v.clone() for k, v in masks.items()})

    monkeypatch.setattr(lp, "grow_masks", recording_grow)
    if importance == "lora_grad":  # never a gradient of a frozen base weight, at any step
        real_scores = lp.unit_scores

        def checked(model, *a):
            assert lora_grad.base_weight_grads_absent(model)
            return real_scores(model, *a)

        monkeypatch.setattr(lp, "unit_scores", checked)
    method = _method(importance=importance)
    model, plan, masks = _run(method, tmp_path, tok)

    # monotone masks, nothing before warm-up, the plan's counts at the end
    for prev, cur in itertools.pairwise(snapshots):
        for k in cur:
            assert bool((prev[k] | ~cur[k]).all()) and bool((cur[k] <= prev[k]).all())
    assert all(int((~v).sum()) == plan.remove[k] for k, v in masks.items())
    steps = method.history["prune_steps"]
    assert steps[0]["fraction"] == 0.0 and steps[-1]["fraction"] == 1.0
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_modules())

    # masked == physically pruned, after the merge
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(1))
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    ref = masked(input_ids=ids).logits
    new_arch = prune_physically(model, masks)
    out = model(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= 1e-5
    achieved = 1 - new_arch.total_params() / plan.params_before
    assert abs(achieved - 0.1) <= 0.05 * 0.1
    h = (tmp_path / "history.json").read_text()
    assert '"best_step": ' in h


def test_best_adapter_chosen_after_final_masks(tmp_path, tok):
    method = _method()
    _run(method, tmp_path, tok)
    import json

    h = json.loads((tmp_path / "history.json").read_text())
    assert h["best_step"] >= method.final_step(h["steps"])


@pytest.mark.parametrize(
    "kw,message",
    [
        (
            {"importance": "fisher"},
            r"method\.importance='fisher' is not allowed.*lora_grad, taylor, magnitude",
        ),
        ({"beta": 1.0}, r"method\.beta=1\.0 must be in \[0, 1\)"),
        ({"warmup": 0.6, "cooldown": 0.5}, r"leave no room to prune"),
        ({"prune_freq": 0}, r"method\.prune_freq=0"),
        ({"targets": ["layer"]}, r"method\.targets=\['layer'\] is not allowed"),
        (
            {"train": {"target_modules": ["q_proj", "v_proj"]}},
            r"method\.train\.target_modules=.*misses \['k_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'\]",
        ),
    ],
)
def test_bad_values_name_their_key(kw, message):
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _method(**kw)


def test_bad_training_key_is_named_under_method_train():
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method\.train\.lr"):
        build_method(
            OmegaConf.create(
                {"_target_": "prunelab.methods.loraprune.LoRAPrune", "name": "loraprune", "train": {"lr": -1}}
            )
        )


def test_prune_schedule_moving_average_and_cubic_growth_as_in_the_paper():
    """``PruneSchedule.update`` on given scores: Ī = β·Ī + (1−β)·I (first update initialises),
    a float16 model's non-finite updates skipped, at prune steps (and the last step) round(cubic · count)
    lowest-Ī structures masked, masks only grow. Expected values are computed here by hand."""
    from types import SimpleNamespace

    from prunelab.methods.loraprune.pruner import PruneSchedule

    todo = [SimpleNamespace(key="1.mlp", n=6, kind="mlp", layer=1)]
    sch = PruneSchedule(
        None, todo, {"1.mlp": 4}, "lora_grad", beta=0.9, prune_freq=2, warmup=0.0, cooldown=0.25
    )
    steps = 9  # the last step is not a multiple of prune_freq: the plan must be met there anyway
    s1 = torch.tensor([6.0, 5, 4, 3, 2, 1])
    s2 = torch.tensor([1.0, 2, 3, 4, 5, 6]) * 2
    sch.update({"1.mlp": s1}, step=1, steps=steps)  # 1 % prune_freq: scores only
    assert torch.equal(sch.ema["1.mlp"], s1) and bool(sch.masks["1.mlp"].all())
    # a float16 model: the step whose gradient overflowed is skipped, as loss scaling skips it
    sch.fp16 = True
    sch.update({"1.mlp": torch.tensor([float("nan")] * 6)}, step=1, steps=steps)
    assert sch.skipped == 1 and torch.equal(sch.ema["1.mlp"], s1)
    sch.fp16 = False
    sch.update({"1.mlp": s2}, step=2, steps=steps)
    expected = torch.tensor([5.6, 4.9, 4.2, 3.5, 2.8, 2.1])  # 0.9·s1 + 0.1·s2
    assert torch.allclose(sch.ema["1.mlp"], expected)
    # cubic: 1 − (1 − 2/6.75)³ ≈ 0.65 of 4 → round(2.61) = 3 masked: the three lowest Ī (5, 4, 3);
    # β and 1−β swapped, or the raw scores, would mask 0, 1, 2 instead; int() would mask 2
    frac = 1 - (1 - 2 / (0.75 * steps)) ** 3
    assert sch.log[-1]["fraction"] == pytest.approx(frac) and round(frac * 4) == 3
    assert sch.masks["1.mlp"].tolist() == [True, True, True, False, False, False]
    sch.update({"1.mlp": torch.tensor([0.0, 0, 0, 100, 100, 100])}, step=9, steps=steps)  # the last step
    assert int((~sch.masks["1.mlp"]).sum()) == 4
    assert not sch.masks["1.mlp"][3:].any()  # masked structures stay masked whatever their scores
