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


# ---------------------------------------------------------------- the papers' ratio conventions
def _llama_7b():
    from transformers import LlamaConfig

    return arch_info(
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        )
    )


def test_per_layer_convention_gives_llm_pruners_published_parameter_count():
    """LLM-Pruner's official `--pruning_ratio 0.25 --block_wise` on layers 4..29 of LLaMA-7B logs
    '#Param before: 6738415616, #Param after: 5422977024' (its README/issue #34): the per-layer
    convention must land on exactly that count — 8 of 32 heads and 2752 of 11008 channels per layer."""
    from prunelab.structure.plan import plan_convention

    plan = plan_convention(_llama_7b(), 0.25, "per_layer", ("attn", "mlp"), list(range(4, 30)))
    assert plan.params_before == 6_738_415_616 and plan.params_after == 5_422_977_024
    assert all(plan.remove[f"{i}.attn"] == 8 and plan.remove[f"{i}.mlp"] == 2752 for i in range(4, 30))
    assert plan.convention["requested"] == 0.25 and plan.convention["achieved"] == pytest.approx(0.25)
    assert plan.achieved == pytest.approx(1 - 5_422_977_024 / 6_738_415_616)  # the "20%" of its Table 1


def test_linear_convention_counts_only_the_linear_layers():
    """ATP's budget: the ratio of the decoder's linear-layer parameters (embeddings, lm_head and
    norms not counted), written out for LLaMA-7B."""
    from prunelab.structure.plan import plan_convention

    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    plan = plan_convention(_llama_7b(), 0.4, "linear", ("attn", "mlp"), list(range(32)))
    removed = plan.params_before - plan.params_after
    assert removed / linear == pytest.approx(0.4, rel=0.01)
    assert plan.convention["achieved"] == pytest.approx(removed / linear)
    assert plan.achieved == pytest.approx(removed / 6_738_415_616) and plan.achieved < 0.4


def test_per_layer_convention_on_gqa_counts_each_unit_as_the_official_scripts():
    from prunelab.structure.plan import plan_convention

    arch = arch_info(make_model("llama", 2, heads=4, layers=3, inter=10).config)
    plan = plan_convention(arch, 0.35, "per_layer", ("attn", "mlp"), [1, 2])
    # int(n · ratio) as the official scripts: int(0.7) = 0 KV groups, int(3.5) = 3 channels
    assert plan.remove == {"1.attn": 0, "1.mlp": 3, "2.attn": 0, "2.mlp": 3}
    assert plan.convention["achieved"] == pytest.approx(1 - (2 + 7 + 2 + 7) / 24)
    plan = plan_convention(arch, 0.3, "per_layer", ("attn", "mlp"), [1])
    assert plan.remove["1.mlp"] == 3  # 0.3 · 10 is 3 exactly, not 2.9999… rounded down


def test_bad_conventions_are_refused_with_the_allowed_values():
    from prunelab.structure.plan import check_convention, plan_convention

    assert check_convention(None) == "params"
    with pytest.raises(
        ConfigError, match=r"ratio_convention='per-layer' is not allowed; allowed: null or params"
    ):
        check_convention("per-layer")
    arch = arch_info(make_model().config)
    with pytest.raises(ConfigError, match=r"ratio_convention='linear' needs head/channel pruning"):
        plan_convention(arch, 0.2, "linear", ("layer",))
