"""Ratio semantics: fraction of ALL parameters removed, per-layer amounts derived."""

from __future__ import annotations

import pytest

from prunelab.errors import ConfigError
from prunelab.structure import arch_info
from prunelab.structure.plan import plan_ratio, prunable_layers
from tests.conftest import make_model


@pytest.mark.parametrize("kv", [4, 2])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35, 0.5])
def test_plan_meets_ratio_within_one_percent(kv, ratio):
    arch = arch_info(make_model("llama", kv, layers=4, inter=128).config)
    plan = plan_ratio(arch, ratio, ("attn", "mlp"), [0, 1, 2, 3])
    assert abs(plan.achieved - ratio) <= 0.01 * ratio
    assert plan.params_after == round(plan.params_before * (1 - plan.achieved))
    # whole groups only, at least one left per unit
    for key, k in plan.remove.items():
        layer, kind = key.split(".")
        n = (
            arch.layers[int(layer)].num_key_value_heads
            if kind == "attn"
            else arch.layers[int(layer)].intermediate_size
        )
        assert 0 <= k < n


def test_prunable_layers_scale_llm_pruner_default():
    assert prunable_layers(32, 0.125, 0.0625) == list(range(4, 30))  # LLaMA-7B: layers 4..29
    assert prunable_layers(8, 0.125, 0.0625) == list(range(1, 7))
    assert prunable_layers(8, 2, 0) == list(range(2, 8))


def test_ratio_outside_unit_interval():
    arch = arch_info(make_model().config)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"ratio=.*\(0, 1\)"):
            plan_ratio(arch, bad)


def test_ratio_beyond_prunable_parameters():
    arch = arch_info(make_model(layers=4).config)
    with pytest.raises(ConfigError, match=r"ratio=0.9 cannot be met.*allowed: \(0, 0\.\d+\]"):
        plan_ratio(arch, 0.9, ("attn", "mlp"), [1, 2])


def test_ratio_that_whole_heads_cannot_meet():
    # Attention only, 4 heads per layer: achievable amounts are coarse.
    arch = arch_info(make_model("llama", 4, layers=2).config)
    with pytest.raises(ConfigError, match=r"whole head groups.*nearest achievable ratios are \["):
        plan_ratio(arch, 0.07, ("attn",), [0, 1], tolerance=0.01)
    plan = plan_ratio(arch, 0.07, ("attn",), [0, 1], tolerance=0.5)  # loosened: nearest amount, reported
    assert plan.achieved != 0.07 and sum(plan.remove.values()) >= 1


def test_hidden_channel_plan():
    arch = arch_info(make_model("llama", 4, layers=4, hidden=64).config)
    plan = plan_ratio(arch, 0.2, ("hidden",), [0, 1, 2, 3], tolerance=0.05)
    assert plan.params_before - plan.params_after == plan.remove["hidden"] * arch.hidden_channel_params()
    assert abs(plan.achieved - 0.2) <= 0.05 * 0.2


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_excluded_units_are_never_planned_and_the_ratio_still_holds(ratio):
    """LoRAShear's unprunable groups: the target moves to the remaining units."""
    arch = arch_info(make_model("llama", 4, layers=4, inter=128).config)
    exclude = {"0.mlp", "3.attn", "3.mlp"}
    plan = plan_ratio(arch, ratio, ("attn", "mlp"), [0, 1, 2, 3], exclude=exclude)
    assert not exclude & set(plan.remove)
    assert abs(plan.achieved - ratio) <= 0.01 * ratio
    assert all(plan.remove[f"{i}.mlp"] > 0 for i in (1, 2))  # the excluded share went elsewhere


def test_excluding_everything_leaves_nothing_to_prune():
    arch = arch_info(make_model("llama", 4, layers=2, inter=128).config)
    everything = {f"{i}.{k}" for i in range(2) for k in ("attn", "mlp")}
    with pytest.raises(ConfigError, match="cannot be met"):
        plan_ratio(arch, 0.1, ("attn", "mlp"), [0, 1], exclude=everything)
