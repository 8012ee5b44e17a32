"""LoRAShear parts built so far: the knowledge distribution analysis."""

from __future__ import annotations

import itertools

import torch

from prunelab.methods.lorashear.knowledge import knowledge_distribution, plot_knowledge
from prunelab.structure import arch_info
from tests.conftest import make_model


def test_knowledge_analysis_restores_the_model_exactly_and_marks_the_top_gamma(tmp_path):
    model = make_model("llama", 2, layers=4)
    # make layer 2's MLP matter: scale its output weights up
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (4 * 32,), generator=torch.Generator().manual_seed(0))
    arch = arch_info(model.config)
    report = knowledge_distribution(model, arch, ids, seq_len=32, ratios=(0.25, 0.5), gamma=0.25)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored"
    assert set(report.score) == {f"{i}.{k}" for i in range(4) for k in ("attn", "mlp")}
    assert all(set(v) == {"0.25", "0.5"} for v in report.deviations.values())
    assert len(report.unprunable) == 2  # ceil(0.25 · 8)
    ranked = sorted(report.score, key=lambda k: -report.score[k])
    assert report.unprunable == ranked[:2]
    assert "2.mlp" in report.unprunable
    png = plot_knowledge(report, tmp_path / "knowledge.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_knowledge_analysis_respects_the_layer_subset():
    model = make_model("llama", 2, layers=4)
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    report = knowledge_distribution(model, arch_info(model.config), ids, seq_len=32, layers=[1, 2], gamma=0.5)
    assert set(report.score) == {"1.attn", "1.mlp", "2.attn", "2.mlp"} and len(report.unprunable) == 2


def _peft_model(seed=0):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(
        make_model("llama", 2, layers=3, seed=seed),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets),
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pm.eval()


def test_lhspg_drives_redundant_groups_to_exact_zero_then_removal_changes_nothing():
    from prunelab.methods.lorashear.lhspg import group_norms, lhspg_step, merge_lora_into_base
    from prunelab.structure import prune_physically
    from prunelab.structure.groups import Unit

    pm = _peft_model()
    arch = arch_info(pm.base_model.model.config)
    redundant = {
        "1.mlp": torch.arange(96) % 3 == 0,
        "2.attn": torch.tensor([True, False]),
    }
    g = torch.Generator().manual_seed(0)
    period = 6
    norms = []
    for t in range(period):
        with torch.no_grad():  # stand-in for an optimizer step: LoRA moves everywhere
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        lhspg_step(pm, arch, redundant, steps_left=period - t)
        norms.append(group_norms(pm, arch, Unit(1, "mlp", 96))[redundant["1.mlp"]].max().item())
    assert norms[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(norms))
    assert group_norms(pm, arch, Unit(2, "attn", 2))[0].item() == 0.0
    assert float(group_norms(pm, arch, Unit(1, "mlp", 96))[~redundant["1.mlp"]].min()) > 0
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        merge_lora_into_base(pm)  # period end: B·A folded into the base weights
        merged = pm(input_ids=ids).logits
        prune_physically(pm, {k: ~v for k, v in redundant.items()})
        after = pm(input_ids=ids).logits
    assert (merged - before).abs().max().item() <= 1e-5
    assert (after - before).abs().max().item() <= 1e-5


def test_half_space_projection_zeroes_a_group_that_crosses_the_half_space():
    from prunelab.methods.lorashear.lhspg import group_norms, lhspg_step
    from prunelab.structure.groups import Unit

    pm = _peft_model()
    arch = arch_info(pm.base_model.model.config)
    sel = torch.zeros(96, dtype=torch.bool)
    sel[5] = True
    # ε = 0.9: after one step of a 5-step period x̃ = 0.8·W, so ⟨x̃, W⟩ < 0.9‖W‖² fires at once
    out = lhspg_step(pm, arch, {"0.mlp": sel}, steps_left=5, epsilon=0.9)
    assert out == {"0.mlp": 1} and group_norms(pm, arch, Unit(0, "mlp", 96))[5].item() == 0.0


def test_saliency_is_finite_nonnegative_per_group():
    from prunelab.methods.lorashear.lhspg import saliency
    from prunelab.structure.groups import Unit

    pm = _peft_model()
    s = saliency(pm, arch_info(pm.base_model.model.config), Unit(1, "mlp", 96))
    assert (
        s.shape == (96,) and torch.isfinite(s).all() and bool((s >= 0).all()) and float(s.max()) <= 3 + 1e-6
    )


def test_mixer_shifts_weight_to_the_source_made_worse_on_purpose():
    """Two real sources of the embedded corpus; one is corrupted (shuffled tokens) for the
    'pruned' model's measurement: the mixer moves weight to it and keeps the floor."""
    from transformers import AutoTokenizer

    from prunelab.data.sources import EmbeddedText
    from prunelab.methods.lorashear.mixer import DataMixer, source_losses
    from prunelab.models.embedded import asset_dir
    from prunelab.models.loading import load_pretrained

    d = asset_dir("tiny_llama")
    model, tok = load_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    windows = {
        s: EmbeddedText(sources=[s]).calibration_windows(tok, 8, 64, seed=0, split="validation")
        for s in ("reference", "docstrings")
    }
    reference = source_losses(model, windows)
    g = torch.Generator().manual_seed(0)
    worse = dict(windows)
    worse["docstrings"] = windows["docstrings"][:, torch.randperm(64, generator=g)]  # word salad
    losses = source_losses(model, worse)
    assert losses["docstrings"] > reference["docstrings"] + 0.5
    mixer = DataMixer(["reference", "docstrings"], eta=1.0, floor=0.1)
    w = mixer.update(losses, reference, step=10)
    assert w["docstrings"] > 0.5 > w["reference"] >= 0.1 and abs(sum(w.values()) - 1) < 1e-6
    assert mixer.history[-1]["step"] == 10
    picks = mixer.sample(200, torch.Generator().manual_seed(1))
    assert picks.count("docstrings") > picks.count("reference")


def test_mixer_refuses_a_floor_that_leaves_nothing_to_move():
    import pytest

    from prunelab.errors import ConfigError
    from prunelab.methods.lorashear.mixer import DataMixer

    with pytest.raises(ConfigError, match=r"method\.mixer\.floor=0\.5"):
        DataMixer(["a", "b"], floor=0.5)
