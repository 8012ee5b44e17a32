"""ATP's formulas against hand computations (issue 18.6): the Gumbel-sigmoid decisions
s = sigmoid((z + g + b)/T) with logistic noise, the generator step's gradient (LM loss
under soft gates on the merged path + budget_weight · |log r − log p| of the hard decisions)
recomputed here with hooks and a loss written from the paper, the two gate placements
(y = (W·x + B·A·x)⊙s in the generator step, y = (W·x)⊙d + B·A·x in the LoRA step), and the
group-lasso proximal step with its lr_t·λ threshold."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prunelab.methods.atp import pruner as atp
from prunelab.methods.atp.generator import DecisionGenerator
from prunelab.structure import arch_info, units
from prunelab.structure.groups import Unit
from tests.conftest import make_model, make_peft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HD, G = 16, 2  # head_dim, query heads per KV group of make_model("llama", 2)


def _peft(layers=2, seed=0):
    return make_peft(layers, seed, 0.1)


def _noise(shape, gen):
    """Logistic noise g = log u − log(1 − u), u ~ U(0, 1) (the difference of two Gumbels)."""
    u = torch.rand(shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log(1 - u)


def test_decisions_are_the_gumbel_sigmoid_of_logits_offset_and_temperature():
    arch = arch_info(make_model("llama", 2, layers=3).config)
    us = units(arch, ("attn", "mlp"))
    gen = DecisionGenerator(us, 3, dim=16, heads=2, layers=1, temperature=0.7, offset=2.0, seed=5)
    with torch.no_grad():
        for p in gen.heads.parameters():  # logits of order one, so noise and offset both matter
            p.mul_(20)
        z = gen.logits()
    rng = torch.Generator().manual_seed(5)  # the generator's own noise stream, drawn by hand
    soft, hard = gen(noise=True)
    flipped = 0
    for u in us:
        expected = torch.sigmoid((z[u.key] + _noise((u.n,), rng) + 2.0) / 0.7)
        torch.testing.assert_close(soft[u.key], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(hard[u.key], (expected >= 0.5).float())
        flipped += int(((z[u.key] + 2.0 >= 0) != (expected >= 0.5)).sum())
    assert flipped > 0  # the noise changed some decisions
    soft0, _ = gen(noise=False)
    for u in us:
        torch.testing.assert_close(soft0[u.key], torch.sigmoid((z[u.key] + 2.0) / 0.7))
        assert torch.equal(gen.decisions()[u.key], z[u.key] + 2.0 >= 0)
        torch.testing.assert_close(gen.margins()[u.key], z[u.key] + 2.0)


def test_generator_inputs_are_fixed_orthogonal_tokens_and_features_layer_normed():
    arch = arch_info(make_model("llama", 2, layers=3).config)
    us = units(arch, ("attn", "mlp"))
    for encoder in ("gru", "transformer"):  # the GRU's projection is not normalised by itself
        gen = DecisionGenerator(us, 3, dim=16, heads=2, layers=1, encoder=encoder)
        torch.testing.assert_close(gen.tokens @ gen.tokens.T, torch.eye(3), atol=1e-5, rtol=0)
        assert "tokens" not in dict(gen.named_parameters())
        seen = []
        for head in gen.heads.values():
            head.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].detach()))
        gen.logits()
        for h in seen:
            assert h.shape == (16,)
            assert abs(float(h.mean())) < 1e-5 and float(h.var(unbiased=False)) == pytest.approx(1, rel=1e-3)


def _joint(pm, target=0.7, temperature=0.7, offset=2.0, budget_weight=5.0):
    arch = arch_info(pm.get_base_model().config)
    todo = units(arch, ("attn", "mlp"))
    weights = {u.key: atp.structure_params(arch, u) for u in todo}
    cfg = atp.GeneratorConfig(dim=16, heads=2, layers=1, lr=0.05, temperature=temperature, offset=offset)
    method = SimpleNamespace(
        generator=cfg,
        seed=3,
        freeze_by=1.0,
        budget_weight=budget_weight,
        freeze_tolerance=1e-9,
        freeze_patience=100,
        lasso=2.0,
        trainer=SimpleNamespace(lr_at=lambda step, steps: 0.01 * step),
    )
    return (
        atp.JointTraining(method, arch, todo, weights, target, 10, torch.device("cpu")),
        arch,
        todo,
        weights,
    )


def _gate_rows(arch, todo):
    """(layer, module path, unit key, rows per structure) of every gated output linear."""
    out = []
    for u in todo:
        if u.kind == "attn":
            out += [(u.layer, "self_attn.q_proj", u.key, G * HD)]
            out += [(u.layer, p, u.key, HD) for p in ("self_attn.k_proj", "self_attn.v_proj")]
        else:
            out += [(u.layer, p, u.key, 1) for p in ("mlp.gate_proj", "mlp.up_proj")]
    return out


def test_generator_step_gradient_is_lm_loss_under_soft_gates_plus_weighted_budget_loss():
    """The gradient the generator's optimizer receives equals the gradient of
    CE(next token | gates s on the merged outputs)/tokens + 5·|log r(d) − log p| with
    s = sigmoid((z + g + b)/T), d = 1[s ≥ 0.5] straight-through, r = Σ d·params / Σ params —
    all recomputed here on an identical generator."""
    pm = _peft()
    joint, arch, todo, weights = _joint(pm)
    ref, *_ = _joint(pm)  # same seed: an identical generator, its noise drawn by hand below
    joint.gates.install(pm)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    seen = {}
    step = joint.gen_opt.step

    def record(*a, **k):
        seen.update(
            {n: p.grad.detach().clone() for n, p in joint.gen.named_parameters() if p.grad is not None}
        )
        return step(*a, **k)

    joint.gen_opt.step = record
    lora = [p for p in pm.parameters() if p.requires_grad]
    joint.before_step(pm, 1, 10, [batch])
    assert seen and all(p.requires_grad for p in lora)  # LoRA frozen for the step, then back
    # the LoRA step that follows: hard, noise-free decisions of the updated generator
    assert joint.gates.mode == "hard"
    assert all(torch.equal(joint.gates.values[k], v.float()) for k, v in joint.gen.decisions().items())

    # the reference, by hand
    joint.gates.mode = None
    for p in lora:
        p.requires_grad_(False)
    z = ref.gen.logits()
    rng = torch.Generator().manual_seed(3)
    soft = {u.key: torch.sigmoid((z[u.key] + _noise((u.n,), rng) + 2.0) / 0.7) for u in todo}
    hard = {k: (s >= 0.5).float() + s - s.detach() for k, s in soft.items()}
    total = sum(u.n * weights[u.key] for u in todo)
    r = sum(hard[k].sum() * w for k, w in weights.items()) / total
    layers = pm.get_base_model().model.layers
    handles = [
        layers[i]
        .get_submodule(path)
        .register_forward_hook(lambda m, a, out, k=key, w=width: out * soft[k].repeat_interleave(w))
        for i, path, key, width in _gate_rows(arch, todo)
    ]
    logits = pm(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    for h in handles:
        h.remove()
    lm = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    loss = lm + 5.0 * (torch.log(r.double()) - math.log(0.7)).abs()
    loss.backward()
    expected = {n: p.grad for n, p in ref.gen.named_parameters() if p.grad is not None}
    assert set(expected) == set(seen)
    for n, g in expected.items():
        torch.testing.assert_close(seen[n], g, rtol=1e-4, atol=1e-7, msg=n)
    assert joint.log[-1]["lm_loss"] == pytest.approx(float(lm), rel=1e-5)


def test_gates_soft_on_the_merged_path_hard_on_the_frozen_path():
    pm = _peft()
    arch = arch_info(pm.get_base_model().config)
    todo = units(arch, ("attn", "mlp"))
    gates = atp._Gates(arch, todo)
    gates.install(pm)
    mod = pm.get_base_model().model.layers[1].mlp.up_proj
    w = mod.base_layer.weight.detach()
    ba = (
        mod.scaling["default"] * mod.lora_B["default"].weight.detach() @ mod.lora_A["default"].weight.detach()
    )
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    s = torch.rand(96, generator=torch.Generator().manual_seed(1))
    d = (s > 0.5).float()
    with torch.no_grad():
        gates.mode, gates.values = "soft", {"1.mlp": s}
        torch.testing.assert_close(mod(x), (x @ w.T + x @ ba.T) * s, rtol=1e-5, atol=1e-6)
        gates.mode, gates.values = "hard", {"1.mlp": d}
        torch.testing.assert_close(mod(x), (x @ w.T) * d + x @ ba.T, rtol=1e-5, atol=1e-6)
        gates.mode = None
        torch.testing.assert_close(mod(x), x @ w.T + x @ ba.T, rtol=1e-5, atol=1e-6)
        q = pm.get_base_model().model.layers[0].self_attn.q_proj  # a KV group gates its G·HD rows
        gates.mode, gates.values = "hard", {"0.attn": torch.tensor([0.0, 1.0])}
        qba = q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
        row = torch.cat([torch.zeros(G * HD), torch.ones(G * HD)])
        torch.testing.assert_close(q(x), (x @ q.base_layer.weight.T) * row + x @ qba.T, rtol=1e-5, atol=1e-6)
    gates.remove()


def test_group_lasso_prox_soft_thresholds_each_pruned_slice_by_sqrt_size():
    """w_g ← w_g · max(0, 1 − t·√p_g/‖w_g‖) for each pruned structure and adapter matrix (its
    lora_B rows of q/k/v/gate/up, its lora_A columns of o/down); kept structures untouched."""
    pm = _peft()
    arch = arch_info(pm.get_base_model().config)
    layer = pm.get_base_model().model.layers[1]
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.mul_(0.2)
    pruned = torch.zeros(96, dtype=torch.bool)
    pruned[[0, 3, 4, 50]] = True
    slices = {
        "gate": (layer.mlp.gate_proj.lora_B["default"].weight, 0),
        "up": (layer.mlp.up_proj.lora_B["default"].weight, 0),
        "down": (layer.mlp.down_proj.lora_A["default"].weight, 1),
    }
    before = {k: t.detach().clone() for k, (t, _) in slices.items()}
    t = 0.05
    atp.group_lasso_prox(pm, arch, Unit(1, "mlp", 96), pruned, t)
    zeroed = shrunk = 0
    for k, (tensor, dim) in slices.items():
        for j in range(96):
            old = before[k][j] if dim == 0 else before[k][:, j]
            new = tensor[j] if dim == 0 else tensor[:, j]
            factor = max(0.0, 1 - t * math.sqrt(old.numel()) / float(old.norm())) if pruned[j] else 1.0
            torch.testing.assert_close(new.detach(), old * factor, rtol=1e-5, atol=1e-8)
            zeroed += int(pruned[j] and factor == 0)
            shrunk += int(pruned[j] and 0 < factor < 1)
    assert zeroed > 0 and shrunk > 0  # the threshold both zeroed and shrank some slices
    # a KV group: q/k/v lora_B rows (G·HD, HD, HD rows × r) and o lora_A columns, one group each
    attn = layer.self_attn
    qb = attn.q_proj.lora_B["default"].weight.detach().clone()
    ob = attn.o_proj.lora_A["default"].weight.detach().clone()
    atp.group_lasso_prox(pm, arch, Unit(1, "attn", 2), torch.tensor([False, True]), 0.01)
    for old, new, p in (
        (qb[G * HD :], attn.q_proj.lora_B["default"].weight[G * HD :], G * HD * 4),
        (ob[:, G * HD :], attn.o_proj.lora_A["default"].weight[:, G * HD :], G * HD * 4),
    ):
        factor = max(0.0, 1 - 0.01 * math.sqrt(p) / float(old.norm()))
        torch.testing.assert_close(new.detach(), old * factor, rtol=1e-5, atol=1e-8)
    assert torch.equal(attn.q_proj.lora_B["default"].weight[: G * HD].detach(), qb[: G * HD])


def test_after_step_thresholds_the_pruned_structures_at_lr_t_times_lambda(monkeypatch):
    pm = _peft()
    joint, _, todo, _ = _joint(pm)
    calls = []
    monkeypatch.setattr(atp, "group_lasso_prox", lambda m, a, u, pruned, t: calls.append((u.key, pruned, t)))
    joint.gates.values = {u.key: torch.ones(u.n) for u in todo}
    joint.gates.values["1.mlp"][[2, 7]] = 0
    joint.after_step(pm, 4, 10)
    assert [(k, p.nonzero().flatten().tolist()) for k, p, _ in calls] == [("1.mlp", [2, 7])]
    assert calls[0][2] == pytest.approx(0.01 * 4 * 2.0)  # lr_t · λ
