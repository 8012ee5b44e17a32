"""LoRAShear's formulas against hand computations (issue 18.6): the LHSPG step
x̃_g = x_g − λ_g·W_g/‖W_g‖ with λ_g = ‖x_g‖/k and the half-space projection, its step-size
schedule over a period, the merge, the LoRA-aware saliency and both selection scopes
(least salient first), the knowledge probe (the smallest-magnitude structures removed, the
deviation and its mean), and the data mixer's update. The group slices are cut by hand here
(q/k/v rows, o columns of a KV group; gate/up rows, down column of a channel), not with the
library's ``grouped``."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.methods import build_method
from prunelab.methods.lorashear import lhspg
from prunelab.structure import arch_info
from prunelab.structure.groups import Unit
from tests.conftest import make_model, make_peft, structure_slices

HD, G = 16, 2  # head_dim, query heads per KV group of make_model("llama", 2) (hidden 64, 4 heads)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(seed=0):
    return make_peft(3, seed, 0.05)


def _layer(pm, i):
    return pm.base_model.model.model.layers[i]


def _slices(kind: str, j: int):
    return structure_slices(kind, j, HD, G)


def _delta(mod) -> torch.Tensor:
    a, b = mod.lora_A["default"].weight.detach().double(), mod.lora_B["default"].weight.detach().double()
    return mod.scaling["default"] * (b @ a)


def _vec(layer, kind, j, what="effective") -> torch.Tensor:
    """Structure j's slices of W + s·B·A ("effective"), W ("base") or s·B·A ("delta"), flattened."""
    parts = []
    for path, dim, idx in _slices(kind, j):
        mod = layer.get_submodule(path)
        w = mod.base_layer.weight.detach().double()
        t = {"effective": w + _delta(mod), "base": w, "delta": _delta(mod)}[what]
        parts.append((t[idx] if dim == 0 else t[:, idx]).reshape(-1))
    return torch.cat(parts)


def _lora_slices(layer, kind, j) -> torch.Tensor:
    """The adapter slices a structure owns: lora_B rows of q/k/v/gate/up, lora_A columns of o/down."""
    parts = []
    for path, dim, idx in _slices(kind, j):
        mod = layer.get_submodule(path)
        t = mod.lora_B["default"].weight if dim == 0 else mod.lora_A["default"].weight
        parts.append((t[idx] if dim == 0 else t[:, idx]).detach().reshape(-1))
    return torch.cat(parts)


N = {"mlp": 96, "attn": 2}


def _cut(layer, path, dim, idx) -> torch.Tensor:
    w = layer.get_submodule(path).weight
    return w[idx] if dim == 0 else w[:, idx]


# ------------------------------------------------------------------ the LHSPG step
@pytest.mark.parametrize("steps_left", [4, 2])
def test_lhspg_step_is_the_papers_update_with_lambda_norm_over_steps_left(steps_left):
    pm = _peft()
    arch = arch_info(pm.base_model.model.config)
    layer = _layer(pm, 1)
    chosen = {"mlp": [2, 5, 7, 40], "attn": [1]}
    redundant = {f"1.{k}": torch.isin(torch.arange(N[k]), torch.tensor(v)) for k, v in chosen.items()}
    before = {(k, j): (_vec(layer, k, j), _vec(layer, k, j, "base")) for k in N for j in range(N[k])}
    out = lhspg.lhspg_step(pm, arch, redundant, steps_left=steps_left, epsilon=0.0)
    zeroed = {k: 0 for k in redundant}
    for kind in N:
        for j in range(N[kind]):
            x, w = before[(kind, j)]
            got = _vec(layer, kind, j)
            if j not in chosen[kind]:
                assert torch.allclose(got, x, atol=1e-6), (kind, j)  # other groups untouched
                continue
            expected = x - (x.norm() / steps_left) * w / w.norm()  # λ = ‖x‖/k along W/‖W‖
            if float(expected @ w) < 0:  # the half-space projection (ε = 0)
                expected = torch.zeros_like(expected)
                zeroed[f"1.{kind}"] += 1
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            assert float(_lora_slices(layer, kind, j).abs().max()) == 0.0  # its LoRA slices zeroed
    assert out == zeroed


def test_lhspg_step_with_one_step_left_is_exactly_zero_and_epsilon_projects():
    pm = _peft()
    arch = arch_info(pm.base_model.model.config)
    layer = _layer(pm, 0)
    sel = torch.zeros(96, dtype=torch.bool)
    sel[:12] = True
    # ratios ⟨x̃_g, W_g⟩/‖W_g‖² after a step of a 3-step period, by hand; ε between two of them
    ratio = {}
    for j in range(12):
        x, w = _vec(layer, "mlp", j), _vec(layer, "mlp", j, "base")
        ratio[j] = float((x - x.norm() / 3 * w / w.norm()) @ w / (w @ w))
    r = sorted(ratio.values())
    eps = (r[5] + r[6]) / 2  # exactly six groups fall under it
    before = {j: _vec(layer, "mlp", j) for j in range(12)}
    w0 = {j: _vec(layer, "mlp", j, "base") for j in range(12)}
    out = lhspg.lhspg_step(pm, arch, {"0.mlp": sel}, steps_left=3, epsilon=eps)
    assert out == {"0.mlp": 6}
    for j in range(12):
        got = _vec(layer, "mlp", j)
        if ratio[j] < eps:
            assert float(got.abs().max()) == 0.0
        else:
            x, w = before[j], _vec(layer, "mlp", j, "base")
            expected = x - x.norm() / 3 * w0[j] / w0[j].norm()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            assert torch.allclose(got, w)  # held in the base weights: the LoRA slices are zero
    lhspg.lhspg_step(pm, arch, {"0.mlp": sel}, steps_left=1)
    assert all(float(_vec(layer, "mlp", j).abs().max()) == 0.0 for j in range(12))


def test_lhspg_step_without_lora_aware_groups_sees_and_writes_the_base_only():
    pm = _peft()
    arch = arch_info(pm.base_model.model.config)
    layer = _layer(pm, 2)
    sel = torch.tensor([True, False])
    w0, lora0 = _vec(layer, "attn", 0, "base"), _lora_slices(layer, "attn", 0).clone()
    lhspg.lhspg_step(pm, arch, {"2.attn": sel}, steps_left=4, lora_aware=False)
    torch.testing.assert_close(_vec(layer, "attn", 0, "base"), w0 * (1 - 1 / 4), rtol=1e-5, atol=1e-7)
    assert torch.equal(_lora_slices(layer, "attn", 0), lora0)


def test_merge_folds_s_b_a_into_the_base_and_restarts_b_at_zero():
    pm = _peft()
    layer = _layer(pm, 1)
    mod = layer.mlp.up_proj
    expected = mod.base_layer.weight.detach().double() + _delta(mod)
    lhspg.merge_lora_into_base(pm)
    torch.testing.assert_close(mod.base_layer.weight.detach().double(), expected, rtol=1e-6, atol=1e-6)
    assert float(mod.lora_B["default"].weight.abs().max()) == 0.0


@pytest.mark.parametrize("scope", ["unit", "global"])
def test_lhspg_schedule_steps_left_count_down_each_period_and_select_before_the_merge(monkeypatch, scope):
    """λ_g = ‖x_g‖/k with k = period_steps, …, 2, 1 over each period (zero at its last step);
    period p selects up to round(p/P · count) groups (per unit, or per kind over all units),
    and the selection at a period's start comes before the merge that ends the previous one."""
    from prunelab.methods.lorashear.pruner import LHSPGSchedule

    calls = []
    monkeypatch.setattr(
        lhspg, "lhspg_step", lambda m, a, r, left, *x, **k: calls.append(("step", left)) or {}
    )
    monkeypatch.setattr(lhspg, "merge_lora_into_base", lambda m: calls.append(("merge",)))
    method = _method(lhspg={"warmup_steps": 2, "periods": 3, "period_steps": 3, "scope": scope})
    record = lambda model, arch, todo, red, want: calls.append(("select", dict(want)))  # noqa: E731
    method._select, method._select_global = record, record
    method._residual = lambda *a, **k: 0.0
    todo = [Unit(1, "mlp", 96), Unit(2, "mlp", 96)]
    sch = LHSPGSchedule(method, None, todo, SimpleNamespace(remove={"1.mlp": 4, "2.mlp": 5}))
    for step in range(1, 12):
        calls.append(("at", step))
        sch.after_step(None, step, 11)
    assert [c[1] for c in calls if c[0] == "step"] == [3, 2, 1] * 3
    wants = [c[1] for c in calls if c[0] == "select"]
    if scope == "unit":
        assert wants == [{"1.mlp": 1, "2.mlp": 2}, {"1.mlp": 3, "2.mlp": 3}, {"1.mlp": 4, "2.mlp": 5}]
    else:
        assert wants == [{"mlp": 3}, {"mlp": 6}, {"mlp": 9}]
    assert [c[0] for c in calls if c[0] != "at"][:2] == ["select", "step"]  # step 3 starts period 1
    at5 = calls[calls.index(("at", 5)) + 1 : calls.index(("at", 6))]
    assert [c[0] for c in at5] == ["step", "select", "merge"] and at5[0] == ("step", 1)


# ------------------------------------------------------------------ saliency and selection
def _terms(layer, kind, n):
    """[3, n]: ‖W_g‖, |⟨W_g, (s·BA)_g⟩|, cos(W_g, (s·BA)_g) + 1, by hand."""
    rows = []
    for j in range(n):
        w, d = _vec(layer, kind, j, "base"), _vec(layer, kind, j, "delta")
        rows.append([w.norm(), (w @ d).abs(), (w @ d) / (w.norm() * d.norm()) + 1])
    return torch.tensor(rows, dtype=torch.float64).T


def test_saliency_is_the_max_normalised_sum_of_the_three_terms():
    pm = _peft()
    arch = arch_info(pm.base_model.model.config)
    for kind in N:
        terms = _terms(_layer(pm, 1), kind, N[kind])
        got = lhspg.saliency(pm, arch, Unit(1, kind, N[kind])).double()
        expected = (terms / terms.max(dim=1, keepdim=True).values).sum(0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lhspg.saliency_terms(pm, arch, Unit(1, kind, N[kind])).double(), terms)


def _method(**kw):
    cfg = {
        "_target_": "prunelab.methods.lorashear.LoRAShear",
        "name": "lorashear",
        "knowledge": {"enabled": False},
        "recovery": {"enabled": False},
        **kw,
    }
    return build_method(OmegaConf.create(cfg))


@pytest.mark.parametrize("saliency", ["lora_aware", "magnitude"])
def test_unit_scope_selects_the_least_salient_groups_not_yet_redundant(saliency):
    pm = _peft()
    arch = arch_info(pm.base_model.model.config)
    layer = _layer(pm, 1)
    if saliency == "lora_aware":
        terms = _terms(layer, "mlp", 96)
        score = (terms / terms.max(dim=1, keepdim=True).values).sum(0)
    else:  # ‖W_g + (s·BA)_g‖
        score = torch.stack([_vec(layer, "mlp", j).norm() for j in range(96)])
    method = _method(lhspg={"scope": "unit", "saliency": saliency})
    lowest = torch.argsort(score).tolist()
    redundant = {"1.mlp": torch.zeros(96, dtype=torch.bool)}
    redundant["1.mlp"][lowest[-1]] = True  # already redundant (the most salient, as a marker)
    method._select(pm, arch, [Unit(1, "mlp", 96)], redundant, {"1.mlp": 6})
    assert sorted(torch.nonzero(redundant["1.mlp"]).flatten().tolist()) == sorted([lowest[-1], *lowest[:5]])


def test_global_scope_ranks_all_layers_on_one_scale_and_keeps_min_keep():
    """Each term divided by its max over all MLP channels of all layers; layer 0's channels
    made the least salient (base weights × 0.01), so min_keep (10% of 96 → 10 kept) binds
    there and the rest of the count comes from the other layers' least salient channels."""
    pm = _peft()
    with torch.no_grad():
        for p in ("gate_proj", "up_proj", "down_proj"):
            getattr(_layer(pm, 0).mlp, p).base_layer.weight.mul_(0.01)
    arch = arch_info(pm.base_model.model.config)
    todo = [Unit(i, "mlp", 96) for i in range(3)]
    terms = [_terms(_layer(pm, i), "mlp", 96) for i in range(3)]
    scale = torch.stack([t.max(dim=1).values for t in terms]).max(dim=0).values
    score = torch.cat([(t / scale[:, None]).sum(0) for t in terms])
    method = _method(lhspg={"scope": "global", "min_keep": 0.1})
    redundant = {u.key: torch.zeros(96, dtype=torch.bool) for u in todo}
    method._select_global(pm, arch, todo, redundant, {"mlp": 100})
    assert int(redundant["0.mlp"].sum()) == 86  # 96 − ceil(0.1 · 96)
    assert sum(int(v.sum()) for v in redundant.values()) == 100
    kept0 = torch.nonzero(~redundant["0.mlp"]).flatten()
    assert float(score[:96][redundant["0.mlp"]].max()) <= float(score[kept0].min())  # layer 0's lowest
    rest = torch.cat([redundant["1.mlp"], redundant["2.mlp"]])
    others = score[96:]
    assert float(others[rest].max()) <= float(others[~rest].min())  # then the lowest of the others
    assert int(rest.sum()) == 14


# ------------------------------------------------------------------ knowledge analysis
def test_knowledge_probe_removes_the_smallest_structures_and_scores_the_mean_deviation():
    from prunelab.evaluation.perplexity import window_nll
    from prunelab.methods.lorashear.knowledge import knowledge_distribution

    model = make_model("llama", 2, layers=3)
    arch = arch_info(model.config)
    ids = torch.randint(0, 128, (4 * 32,), generator=torch.Generator().manual_seed(0))
    report = knowledge_distribution(model, arch, ids, seq_len=32, ratios=(0.25, 0.5), gamma=0.34)
    base = math.exp(window_nll(model, ids, 32))
    assert report.base_ppl == pytest.approx(base, rel=1e-5)
    with torch.no_grad():
        for key in ("1.mlp", "2.attn"):
            i, kind = int(key[0]), key[2:]
            layer = model.model.layers[i]
            n = N[kind]
            # l1 magnitude of each structure's slices, by hand
            l1 = torch.stack(
                [sum(_cut(layer, p, d, idx).abs().sum() for p, d, idx in _slices(kind, j)) for j in range(n)]
            )
            for r in (0.25, 0.5):
                k = min(n - 1, max(1, round(r * n)))
                saved = {p: layer.get_submodule(p).weight.clone() for p, _, _ in _slices(kind, 0)}
                for j in torch.argsort(l1)[:k].tolist():  # the k smallest structures go
                    for p, d, idx in _slices(kind, j):
                        w = layer.get_submodule(p).weight
                        if d == 0:
                            w[idx] = 0
                        else:
                            w[:, idx] = 0
                dev = math.exp(window_nll(model, ids, 32)) - base
                for p, w in saved.items():
                    layer.get_submodule(p).weight.copy_(w)
                assert report.deviations[key][str(r)] == pytest.approx(dev, rel=1e-4, abs=1e-4), (key, r)
    for key, devs in report.deviations.items():
        assert report.score[key] == pytest.approx(sum(devs.values()) / 2)
    assert report.unprunable == sorted(report.score, key=lambda k: -report.score[k])[:3]  # ceil(0.34·6)


# ------------------------------------------------------------------ the data mixer
def test_mixer_update_is_the_damped_softmax_with_a_floor():
    """w ← softmax(log w + η·max(0, loss − ref)), then floor + (1 − k·floor)·w; twice, from
    non-uniform weights, with one source that improved (its degradation counts as 0)."""
    from prunelab.methods.lorashear.mixer import DataMixer

    sources = ["a", "b", "c"]
    w = {"a": 0.5, "b": 0.3, "c": 0.2}
    mixer = DataMixer(sources, eta=2.0, floor=0.1, weights=dict(w))
    ref = {"a": 3.0, "b": 2.0, "c": 4.0}
    for losses in ({"a": 3.5, "b": 1.0, "c": 4.1}, {"a": 3.2, "b": 2.5, "c": 3.0}):
        logits = torch.tensor([math.log(w[s]) + 2.0 * max(0.0, losses[s] - ref[s]) for s in sources])
        soft = torch.exp(logits) / torch.exp(logits).sum()
        w = {s: 0.1 + (1 - 3 * 0.1) * float(v) for s, v in zip(sources, soft, strict=True)}
        got = mixer.update(losses, ref)
        assert got == pytest.approx(w, rel=1e-6)
    picks = mixer.sample(4000, torch.Generator().manual_seed(0))
    for s in sources:
        assert picks.count(s) / 4000 == pytest.approx(w[s], abs=0.03)
