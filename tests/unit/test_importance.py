"""Importance estimators against hand-computed values on tiny seeded models."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.importance import aggregate, select_global
from prunelab.importance.taylor import TaylorImportance, gradient_stats
from prunelab.methods import PruneContext, build_method
from prunelab.structure import arch_info, prune_physically
from prunelab.structure.groups import Unit
from prunelab.structure.plan import plan_ratio
from tests.conftest import make_model

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(7))


def manual_grads(model, calib):
    """g = mean over samples of per-sample loss gradients; F = mean of their squares."""
    gs = []
    for x in calib:
        model.zero_grad()
        model(input_ids=x[None], labels=x[None]).loss.backward()
        gs.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    g = {n: torch.stack([d[n] for d in gs]).mean(0) for n in gs[0]}
    f = {n: torch.stack([d[n] ** 2 for d in gs]).mean(0) for n in gs[0]}
    return g, f


@pytest.fixture
def gqa_model():
    return make_model("llama", kv=2, heads=4, layers=2, hidden=32, inter=24)


def test_element1_mlp_channel_by_hand(gqa_model):
    g, _ = manual_grads(gqa_model, CALIB)
    arch = arch_info(gqa_model.config)
    got = TaylorImportance("element1").scores(gqa_model, arch, [Unit(1, "mlp", 24)], CALIB)["1.mlp"]
    p = "model.layers.1.mlp."
    w = {
        n: dict(gqa_model.named_parameters())[p + n + ".weight"].detach()
        for n in ("gate_proj", "up_proj", "down_proj")
    }
    gg = {n: g[p + n + ".weight"] for n in w}
    for j in (0, 5, 23):
        expected = (
            (w["gate_proj"][j] * gg["gate_proj"][j]).abs().sum()
            + (w["up_proj"][j] * gg["up_proj"][j]).abs().sum()
            + (w["down_proj"][:, j] * gg["down_proj"][:, j]).abs().sum()
        )
        assert torch.isclose(got[j], expected, rtol=1e-4), (j, got[j], expected)


def test_element2_gqa_group_by_hand(gqa_model):
    # KV head 1 is read by query heads 2 and 3: q rows 16..31, k/v rows 8..15, o columns 16..31.
    g, f = manual_grads(gqa_model, CALIB)
    arch = arch_info(gqa_model.config)
    got = TaylorImportance("element2").scores(gqa_model, arch, [Unit(0, "attn", 2)], CALIB)["0.attn"]
    params = dict(gqa_model.named_parameters())

    def s(name, idx):
        w = params[f"model.layers.0.self_attn.{name}.weight"].detach()
        gr, fi = g[f"model.layers.0.self_attn.{name}.weight"], f[f"model.layers.0.self_attn.{name}.weight"]
        return (w * gr - 0.5 * w * fi * w).abs()[idx].sum()

    expected = (
        s("q_proj", slice(16, 32))
        + s("k_proj", slice(8, 16))
        + s("v_proj", slice(8, 16))
        + s("o_proj", (slice(None), slice(16, 32)))
    )
    assert torch.isclose(got[1], expected, rtol=1e-4)


def test_vector_takes_abs_after_the_sum_element_before(gqa_model):
    g, _ = manual_grads(gqa_model, CALIB)
    arch = arch_info(gqa_model.config)
    unit = [Unit(1, "mlp", 24)]
    vec = TaylorImportance("vector").scores(gqa_model, arch, unit, CALIB)["1.mlp"]
    el = TaylorImportance("element1").scores(gqa_model, arch, unit, CALIB)["1.mlp"]
    p = "model.layers.1.mlp."
    params = dict(gqa_model.named_parameters())
    wg = {
        n: params[p + n + ".weight"].detach() * g[p + n + ".weight"]
        for n in ("gate_proj", "up_proj", "down_proj")
    }
    j = 3
    expected = (
        wg["gate_proj"][j].sum().abs() + wg["up_proj"][j].sum().abs() + wg["down_proj"][:, j].sum().abs()
    )
    assert torch.isclose(vec[j], expected, rtol=1e-4)
    assert (vec <= el + 1e-6).all() and not torch.allclose(vec, el)  # |Σx| ≤ Σ|x|, strictly somewhere


def test_vector_head_score_is_per_channel_as_the_official_code(gqa_model):
    """A KV group's `vector` score, as LLM-Pruner's code computes it: |Σ_in w·g| for every output
    row of q/k/v, |Σ_out w·g| for every input column of o, summed over the group's channels;
    `method.vector=slice` (prunelab's earlier reading) is one |Σ| over each member's whole slice."""
    g, _ = manual_grads(gqa_model, CALIB)
    arch = arch_info(gqa_model.config)
    unit = [Unit(0, "attn", 2)]
    got = TaylorImportance("vector").scores(gqa_model, arch, unit, CALIB)["0.attn"]
    old = TaylorImportance("vector", vector="slice").scores(gqa_model, arch, unit, CALIB)["0.attn"]
    params = dict(gqa_model.named_parameters())

    def wg(name):
        key = f"model.layers.0.self_attn.{name}.weight"
        return params[key].detach() * g[key]

    # KV head 1: q rows 16..31, k/v rows 8..15, o columns 16..31
    rows = [wg("q_proj")[16:32], wg("k_proj")[8:16], wg("v_proj")[8:16]]
    cols = wg("o_proj")[:, 16:32]
    official = sum(r.sum(1).abs().sum() for r in rows) + cols.sum(0).abs().sum()
    sliced = sum(r.sum().abs() for r in rows) + cols.sum().abs()
    assert torch.isclose(got[1], official, rtol=1e-4) and torch.isclose(old[1], sliced, rtol=1e-4)
    assert not torch.isclose(official, sliced, rtol=1e-3)  # the two readings differ here


def test_fisher_is_nonzero_and_matches_per_sample_gradients(gqa_model):
    _, f_ref = manual_grads(gqa_model, CALIB)
    w = gqa_model.model.layers[0].mlp.up_proj.weight
    _g, f = gradient_stats(gqa_model, {id(w): w}, CALIB, fisher=True)
    assert f[id(w)].abs().sum() > 0  # a known reference bug made this ~0
    assert torch.allclose(f[id(w)], f_ref["model.layers.0.mlp.up_proj.weight"], rtol=1e-4, atol=1e-10)
    second = TaylorImportance("second").scores(
        gqa_model, arch_info(gqa_model.config), [Unit(0, "mlp", 24)], CALIB
    )
    assert (second["0.mlp"] > 0).all()
    assert all(p.requires_grad for p in gqa_model.parameters())  # requires_grad restored afterwards


def test_first_order_batched_equals_per_sample_mean(gqa_model):
    w = gqa_model.model.layers[1].self_attn.q_proj.weight
    g_batched, _ = gradient_stats(gqa_model, {id(w): w}, CALIB, fisher=False, micro_batch=4)
    g_single, _ = gradient_stats(gqa_model, {id(w): w}, CALIB, fisher=True)
    assert torch.allclose(g_batched[id(w)], g_single[id(w)], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("fisher", [False, True])
def test_gradient_statistics_stream_micro_batches(fisher):
    """Issue 9: Taylor scoring holds one micro-batch's activations, whatever the number of
    calibration sequences (the live hidden-state tensors are counted at every torch op)."""
    from tests.conftest import LiveTensors

    model = make_model("llama", 2, layers=2)
    w = model.model.layers[1].mlp.up_proj.weight
    peaks = {}
    for n in (4, 16):
        calib = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(n))
        with LiveTensors((16, model.config.hidden_size)) as live:
            gradient_stats(model, {id(w): w}, calib, fisher=fisher, micro_batch=2)
        peaks[n] = live.peak
    assert peaks[4] == peaks[16] > 0


def test_aggregations():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])
    assert aggregate([a, b], "sum").tolist() == [4.0, 6.0]
    assert aggregate([a, b], "mean").tolist() == [2.0, 3.0]
    assert aggregate([a, b], "max").tolist() == [3.0, 4.0]
    assert aggregate([a, b], "prod").tolist() == [3.0, 8.0]
    assert aggregate([a, b], "last").tolist() == [3.0, 2.0]
    assert aggregate([a, b], "first").tolist() == [1.0, 4.0]


def test_first_aggregation_is_the_official_root_q_proj(gqa_model):
    """LLM-Pruner's code roots attention groups at q_proj and MLP groups at gate_proj; its
    `first` reduction is the root's score: a KV group's element1 score over its q rows alone."""
    g, _ = manual_grads(gqa_model, CALIB)
    arch = arch_info(gqa_model.config)
    got = TaylorImportance("element1", "first").scores(gqa_model, arch, [Unit(0, "attn", 2)], CALIB)["0.attn"]
    key = "model.layers.0.self_attn.q_proj.weight"
    wg = (dict(gqa_model.named_parameters())[key].detach() * g[key]).abs()
    assert torch.allclose(got, torch.stack([wg[:16].sum(), wg[16:].sum()]), rtol=1e-4)


def test_global_ranking_keeps_totals_and_one_group_per_unit():
    scores = {"0.mlp": torch.tensor([0.1, 0.2, 0.3, 9.0]), "1.mlp": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    masks = select_global(scores, {"0.mlp": 2, "1.mlp": 2})
    assert masks["0.mlp"].tolist() == [False, False, False, True]  # three lowest are all in layer 0 ...
    assert masks["1.mlp"].tolist() == [False, True, True, True]  # ... and the total of four is kept
    masks = select_global(
        {"0.mlp": torch.tensor([0.1, 0.2]), "1.mlp": torch.tensor([5.0, 6.0])}, {"0.mlp": 1, "1.mlp": 1}
    )
    assert masks["0.mlp"].tolist() == [False, True]  # layer 0 keeps one group


def llm_pruner(**kw):
    return build_method(
        OmegaConf.create(
            {
                "_target_": "prunelab.methods.llm_pruner.LLMPruner",
                "name": "llm_pruner",
                "keep_first_layers": 0,
                "keep_last_layers": 0,
                **kw,
            }
        )
    )


@pytest.mark.parametrize("steps", [2, 3])
def test_iterative_reaches_the_one_shot_ratio(steps):
    results = {}
    for k in (1, steps):
        model = make_model("llama", kv=4, layers=3, inter=128)
        method = llm_pruner(iterative_steps=k)
        arch = arch_info(model.config)
        plan = plan_ratio(arch, 0.3, method.targets, method.layers(arch.num_layers))
        masks = method.prune(model, plan, PruneContext(None, CALIB, 0))
        prune_physically(model, masks)
        results[k] = sum(p.numel() for p in model.parameters())
    assert abs(results[steps] - results[1]) / plan.params_before <= 0.01 * 0.3


def test_llm_pruner_config_errors():
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method\.importance='element3'.*did you mean 'element"):
        llm_pruner(importance="element3")
    with pytest.raises(ConfigError, match=r"method\.mode='width'.*allowed: block, channel, layer"):
        llm_pruner(mode="width")
    with pytest.raises(ConfigError, match=r"iterative_steps>1 is supported for method\.mode=block\|channel"):
        llm_pruner(mode="layer", iterative_steps=2)


def test_second_order_and_l2_by_hand(gqa_model):
    from prunelab.importance.magnitude import MagnitudeImportance

    _, f = manual_grads(gqa_model, CALIB)
    arch = arch_info(gqa_model.config)
    unit = [Unit(0, "mlp", 24)]
    second = TaylorImportance("second").scores(gqa_model, arch, unit, CALIB)["0.mlp"]
    l2 = MagnitudeImportance(p=2).scores(gqa_model, arch, unit)["0.mlp"]
    params = dict(gqa_model.named_parameters())
    p = "model.layers.0.mlp."
    w = {n: params[p + n + ".weight"].detach() for n in ("gate_proj", "up_proj", "down_proj")}
    ff = {n: f[p + n + ".weight"] for n in w}
    j = 11
    exp_second = (
        sum((w[n][j] * ff[n][j] * w[n][j]).abs().sum() for n in ("gate_proj", "up_proj"))
        + (w["down_proj"][:, j] * ff["down_proj"][:, j] * w["down_proj"][:, j]).abs().sum()
    )
    exp_l2 = w["gate_proj"][j].pow(2).sum() + w["up_proj"][j].pow(2).sum() + w["down_proj"][:, j].pow(2).sum()
    assert torch.isclose(second[j], exp_second, rtol=1e-4)
    assert torch.isclose(l2[j], exp_l2, rtol=1e-5)
