"""LoRAShear parts built so far: the knowledge distribution analysis."""

from __future__ import annotations

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
