"""Importance formulas against hand computations (issue 18.6), beside test_importance.py and
test_loraprune.py: l1 magnitude over signed weights, the k lowest groups dropped, LoRAPrune's
unit scores (|Ĝ ⊙ (W0 + s·B·A)| summed per structure, each module's vector L2-normalised,
then summed over the coupled modules) and its magnitude / taylor ablations, the cubic
schedule's values, and the masks LoRAPrune applies in the forward pass. Slices are cut by
hand (q/k/v rows and o columns of a KV group; gate/up rows and the down column of a channel)."""

from __future__ import annotations

import copy

import pytest
import torch

from prunelab.importance import lora_grad, select_masks
from prunelab.importance.magnitude import MagnitudeImportance
from prunelab.methods.loraprune import pruner as lp
from prunelab.structure import arch_info, units
from prunelab.structure.groups import Unit
from tests.conftest import make_model, make_peft, structure_slices

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HD, G = 16, 2  # head_dim, query heads per KV group of make_model("llama", 2)


def _slices(kind: str, j: int):
    return structure_slices(kind, j, HD, G)


def _cut(t, dim, idx):
    return t[idx] if dim == 0 else t[:, idx]


def test_l1_magnitude_sums_absolute_values_of_every_coupled_slice():
    model = make_model("llama", 2, layers=2)
    arch = arch_info(model.config)
    layer = model.model.layers[1]
    for kind, n in (("attn", 2), ("mlp", 96)):
        got = MagnitudeImportance(p=1).scores(model, arch, [Unit(1, kind, n)])[f"1.{kind}"]
        for j in range(n):
            expected = sum(
                _cut(layer.get_submodule(p).weight.detach(), d, idx).abs().sum()
                for p, d, idx in _slices(kind, j)
            )
            assert torch.isclose(got[j], expected, rtol=1e-5), (kind, j)


def test_select_masks_drops_the_lowest_scoring_groups_ties_by_index():
    scores = {"0.mlp": torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0]), "1.attn": torch.tensor([0.5, 0.1])}
    masks = select_masks(scores, {"0.mlp": 3, "1.attn": 0})
    assert masks["0.mlp"].tolist() == [True, False, False, False, True]
    assert masks["1.attn"].tolist() == [True, True]
    masks = select_masks(scores, {"0.mlp": 1})
    assert masks["0.mlp"].tolist() == [True, False, True, True, True]  # the first of the tie


def test_taylor_salience_formulas_on_scalars():
    """w = 2, g = 1, F = 3: |wg| = 2, |wFw| = 12, |wg − ½wFw| = 4, vector keeps the sign (2)."""
    from prunelab.importance.taylor import TaylorImportance

    w, g, f = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 3.0]), torch.tensor([3.0, 0.5])
    expected = {
        "element1": [2.0, 3.0],
        "second": [12.0, 0.5],
        "element2": [4.0, 3.25],  # |2 − 6|, |−3 − 0.25|
        "vector": [2.0, -3.0],
    }
    for kind, values in expected.items():
        assert TaylorImportance(kind).salience(w, g, f).tolist() == values, kind


@pytest.mark.parametrize("vector", [None, "slice"])
def test_vector_scores_every_channel_with_the_abs_of_each_members_sum(vector):
    """|Σ_slice w·g| per member, summed over gate/up/down — for every channel, with members
    whose sums are negative (so an absolute value left out or moved inside shows). An MLP
    channel is one row / column per member, so the per-channel (official) and the whole-slice
    reading agree here."""
    from prunelab.importance.taylor import TaylorImportance, gradient_stats

    model = make_model("llama", 2, layers=2)
    arch = arch_info(model.config)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(7))
    layer = model.model.layers[1].mlp
    mods = [layer.gate_proj, layer.up_proj, layer.down_proj]
    g, _ = gradient_stats(model, {id(m.weight): m.weight for m in mods}, calib, fisher=False)
    sums = torch.stack(
        [
            (m.weight.detach() * g[id(m.weight)]).sum(1 if i < 2 else 0)  # rows of gate/up, columns of down
            for i, m in enumerate(mods)
        ]
    )
    assert bool((sums < 0).any()) and bool((sums > 0).any())
    got = TaylorImportance("vector", vector=vector).scores(model, arch, [Unit(1, "mlp", 96)], calib)["1.mlp"]
    torch.testing.assert_close(got, sums.abs().sum(0), rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------ LoRAPrune's scores
def _peft(seed=0):
    return make_peft(2, seed, 0.1, eval_mode=False)


def _backward(pm, base_grads=False):
    if base_grads:
        for n, p in pm.named_parameters():
            if "base_layer.weight" in n:
                p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    pm(input_ids=ids, labels=ids).loss.backward()


def _element(mod, estimator):
    """Element importance by hand from peft's A, B, their gradients and the scaling."""
    a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    s = mod.scaling["default"]
    w0 = mod.base_layer.weight
    merged = w0.detach().double() + s * b.detach().double() @ a.detach().double()
    if estimator == "magnitude":
        return merged.abs()
    if estimator == "taylor":
        return (w0.grad.double() * w0.detach().double()).abs()
    ga, gb = a.grad.double(), b.grad.double()
    a_, b_ = a.detach().double(), b.detach().double()
    g_hat = gb @ a_ + b_ @ ga - gb @ ga  # Ĝ = ∇B·A + B·∇A − ∇B·∇A
    return (g_hat * merged).abs()


@pytest.mark.parametrize("estimator", ["lora_grad", "magnitude", "taylor"])
def test_loraprune_unit_scores_normalise_each_module_then_sum(estimator):
    pm = _peft()
    _backward(pm, base_grads=estimator == "taylor")
    arch = arch_info(pm.base_model.model.config)
    layer = pm.base_model.model.model.layers[1]
    got = lora_grad.unit_scores(pm, arch, [Unit(1, "attn", 2), Unit(1, "mlp", 96)], estimator)
    for kind, n in (("attn", 2), ("mlp", 96)):
        total = torch.zeros(n, dtype=torch.float64)
        for i, (path, dim, _) in enumerate(_slices(kind, 0)):
            imp = _element(layer.get_submodule(path), estimator)
            per = torch.stack([_cut(imp, dim, _slices(kind, j)[i][2]).sum() for j in range(n)])
            total += per / per.norm()  # each module's vector L2-normalised
        torch.testing.assert_close(got[f"1.{kind}"].double(), total, rtol=1e-4, atol=1e-7)


def test_cubic_fraction_values():
    """0 until warm-up·T, 1 − (1 − (t − t0)/(t1 − t0))³ between, 1 from (1 − cool-down)·T."""
    t0, t1 = 0.2 * 50, (1 - 0.3) * 50
    for step in range(51):
        x = min(1.0, max(0.0, (step - t0) / (t1 - t0)))
        assert lp.cubic_fraction(step, 50, 0.2, 0.3) == pytest.approx(1 - (1 - x) ** 3, abs=1e-12), step


def test_loraprune_masks_zero_a_structures_inputs_to_o_and_down_on_both_paths():
    """With the forward hooks in place, the model equals one whose masked structures have
    their o_proj / down_proj input columns zeroed — base and lora_A alike — by hand."""
    pm = _peft().eval()
    arch = arch_info(pm.base_model.model.config)
    todo = units(arch, ("attn", "mlp"))
    sch = lp.PruneSchedule(arch, todo, {}, "lora_grad", 0.9, 1, 0.0, 0.0)
    ref = copy.deepcopy(pm)
    sch.masks["1.attn"][0] = False
    sch.masks["0.mlp"][[3, 17, 60]] = False
    sch.setup(pm)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        layers = ref.base_model.model.model.layers
        for mod, cols in (
            (layers[1].self_attn.o_proj, list(range(G * HD))),
            (layers[0].mlp.down_proj, [3, 17, 60]),
        ):
            mod.base_layer.weight[:, cols] = 0
            mod.lora_A["default"].weight[:, cols] = 0
        expected = ref(input_ids=ids).logits
        got = pm(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    sch.remove()
    with torch.no_grad():
        assert (pm(input_ids=ids).logits - expected).abs().max().item() > 1e-3  # hooks gone
