"""LoRAShear: the four parts as library code, then the method end to end."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.errors import ConfigError
from prunelab.methods import PruneContext, build_method
from prunelab.methods.lorashear.knowledge import knowledge_distribution, plot_knowledge
from prunelab.structure import apply_masks, arch_info, prune_physically
from prunelab.structure.plan import plan_ratio
from tests.conftest import Recorder, make_model


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


def test_knowledge_prefix_cache_equals_whole_model_perplexity_under_a_probe():
    """Probes run from their own layer on cached dense inputs: the same NLL as the whole
    model's window_nll with that layer changed (here: a zeroed head in layer 2)."""
    from prunelab.evaluation.perplexity import window_nll
    from prunelab.methods.lorashear.knowledge import PrefixCache

    model = make_model("llama", 2, layers=4)
    ids = torch.randint(0, 128, (5 * 32 + 7,), generator=torch.Generator().manual_seed(0))
    cache = PrefixCache(model, ids, 32, batch_size=2)  # 5 windows: batches of 2, 2, 1
    assert abs(cache.nll(0) - window_nll(model, ids, 32, batch_size=2)) < 1e-5
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[:, :16] = 0
    assert abs(cache.nll(2) - window_nll(model, ids, 32, batch_size=2)) < 1e-5


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
    from prunelab.evaluation.perplexity import window_nll
    from prunelab.methods.lorashear.mixer import DataMixer
    from prunelab.models.embedded import asset_dir
    from prunelab.models.loading import load_pretrained

    d = asset_dir("tiny_llama")
    model, tok = load_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    windows = {
        s: EmbeddedText(sources=[s]).calibration_windows(tok, 8, 64, seed=0, split="validation")
        for s in ("reference", "docstrings")
    }

    def source_losses(ws):  # each source's mean next-token loss over its windows
        return {s: window_nll(model, w.reshape(-1), w.shape[1]) for s, w in ws.items()}

    reference = source_losses(windows)
    g = torch.Generator().manual_seed(0)
    worse = dict(windows)
    worse["docstrings"] = windows["docstrings"][:, torch.randperm(64, generator=g)]  # word salad
    losses = source_losses(worse)
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


# ----------------------------------------------------------------------------- the method

LS_TRAIN = {
    "format": "text",
    "cutoff_len": 32,
    "batch_size": 4,
    "micro_batch_size": 4,
    "eval_every": 5,
    "val_size": 4,
    "warmup_steps": 0,
    "max_train_examples": 64,
}
LS_RECOVERY = {
    "stages": [
        {
            "name": "text",
            "format": "text",
            "sources": ["embedded:reference", "embedded:comments"],
            "max_steps": 4,
        },
        {"name": "instruction", "format": "instruction", "sources": ["embedded:docstrings"], "max_steps": 2},
    ],
    "lora": {
        "cutoff_len": 128,
        "batch_size": 4,
        "micro_batch_size": 4,
        "eval_every": 2,
        "val_size": 8,
        "max_train_examples": 64,
    },
}


def _lorashear(**kw):
    cfg = {
        "_target_": "prunelab.methods.lorashear.LoRAShear",
        "name": "lorashear",
        "train": LS_TRAIN,
        "knowledge": {"tokens": 256, "seq_len": 32},
        "lhspg": {"warmup_steps": 2, "periods": 3, "period_steps": 3},
        "recovery": LS_RECOVERY,
        **kw,
    }
    return build_method(OmegaConf.create(cfg))


def _prune(method, tmp_path, tok, ratio=0.2):
    from prunelab.data.sources import load_source_config

    model = make_model("llama", 2, layers=4, vocab=2048, max_pos=256, inter=128)
    arch = arch_info(model.config)
    plan = plan_ratio(arch, ratio, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
    tracker = Recorder()
    ctx = PruneContext(
        tok,
        None,
        0,
        data_cfg=load_source_config("embedded"),
        out_dir=tmp_path / "prune_train",
        tracker=tracker,
        run_dir=tmp_path,
        ratio_tolerance=0.05,
    )
    masks = method.prune(model, plan, ctx)
    return model, arch, masks, tracker


def test_lorashear_end_to_end_zero_groups_unprunable_set_and_exact_removal(tmp_path, tok):
    method = _lorashear()
    model, _, masks, tracker = _prune(method, tmp_path, tok)
    h = method.history
    plan = method.final_plan
    # the knowledge analysis: saved, plotted, sent to the tracker; its unprunable groups never pruned
    saved = json.loads((tmp_path / "knowledge_distribution.json").read_text())
    assert saved["unprunable"] == h["unprunable"] and len(h["unprunable"]) == 2  # ceil(0.25 · 8 groups)
    assert (tmp_path / "knowledge_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert tracker.images == [
        ("lorashear/knowledge_distribution", str(tmp_path / "knowledge_distribution.png"))
    ]
    for key in h["unprunable"]:
        assert plan.remove.get(key, 0) == 0 and (key not in masks or bool(masks[key].all()))
    # the budget is reached by the last period, in P steps, each period's groups exactly zero
    selects = [e for e in h["events"] if e["event"] == "select"]
    merges = [e for e in h["events"] if e["event"] == "period_end_merge"]
    assert [e["step"] for e in selects] == [2, 5, 8] and [e["step"] for e in merges] == [5, 8, 11]
    assert selects[-1]["redundant"] == {k: plan.remove[k] for k in selects[-1]["redundant"]}
    assert all(e["redundant_max_norm"] == 0.0 for e in merges)
    assert h["redundant_max_norm_after_merge"] == 0.0
    assert all(int((~m).sum()) == plan.remove[k] for k, m in masks.items())
    assert not any("lora" in n for n, _ in model.named_modules())
    # the zero groups go with no change in outputs (not even by the masking)
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    assert torch.equal(masked(input_ids=ids).logits, before)
    prune_physically(model, masks)
    assert (model(input_ids=ids).logits - before).abs().max().item() <= 1e-5
    # the dense reference losses the recovery's mixer needs were saved with the prune stage
    ref = json.loads((tmp_path / "prune_train" / "reference_losses.json").read_text())
    assert set(ref) == {"text", "instruction"} and set(ref["text"]) == {
        "embedded:reference",
        "embedded:comments",
    }


def test_without_lora_aware_groups_the_merge_refills_the_redundant_groups(tmp_path, tok):
    method = _lorashear(lora_aware=False, knowledge={"enabled": False}, recovery={"enabled": False})
    _, _, masks, _ = _prune(method, tmp_path, tok)
    assert method.history["redundant_max_norm_after_merge"] > 0
    assert method.history["unprunable"] == [] and not (tmp_path / "knowledge_distribution.json").exists()
    assert all(int((~m).sum()) == method.final_plan.remove[k] for k, m in masks.items())


def test_lhspg_off_zeroes_everything_at_once_after_warmup(tmp_path, tok):
    method = _lorashear(
        lhspg={"enabled": False, "warmup_steps": 2, "periods": 3, "period_steps": 3},
        knowledge={"enabled": False},
        recovery={"enabled": False},
    )
    _prune(method, tmp_path, tok)
    events = method.history["events"]
    selects = [e for e in events if e["event"] == "select"]
    assert [e["step"] for e in selects] == [2]
    assert selects[0]["redundant"] == {k: method.final_plan.remove[k] for k in selects[0]["redundant"]}
    assert [e["step"] for e in events if e["event"] == "period_end_merge"] == [3]
    assert method.history["steps"] == 11  # the same training steps as with LHSPG


@pytest.mark.parametrize("dynamic", [True, False])
def test_dynamic_recovery_runs_stages_and_logs_the_mixture(tmp_path, tok, dynamic):
    method = _lorashear(recovery={**LS_RECOVERY, "dynamic": dynamic})
    model = make_model("llama", 2, layers=2, vocab=2048, max_pos=256, inter=64)
    from prunelab.data.sources import load_source_config

    data = load_source_config("embedded")
    ref = method.recovery.reference_losses(model, tok, data)
    ref["text"]["embedded:comments"] -= 1.0  # as if pruning had cost this source a whole nat
    (tmp_path / "prune_train").mkdir()
    (tmp_path / "prune_train" / "reference_losses.json").write_text(json.dumps(ref))
    tracker = Recorder()
    out = method.recover(
        model, tok, tmp_path / "recovered", tracker, data, prune_dir=tmp_path / "prune_train"
    )
    assert not any("lora" in n for n, _ in out.named_modules())
    h = json.loads((tmp_path / "recovered" / "history.json").read_text())
    assert [s["name"] for s in h["stages"]] == ["text", "instruction"]
    assert h["train_tokens"] == sum(s["train_tokens"] for s in h["stages"]) > 0
    text = json.loads((tmp_path / "recovered" / "text" / "history.json").read_text())
    weights = [m["weights"] for m in text["mixture"]]
    assert len(weights) == len(text["val"])  # one mixture per validation (steps 0, 2, 4)
    for w in weights:
        assert abs(sum(w.values()) - 1) < 1e-6 and min(w.values()) >= 0.05 - 1e-9
    if dynamic:  # the degraded source gains share at every update
        shares = [w["embedded:comments"] for w in weights]
        assert all(b > a for a, b in itertools.pairwise(shares))
    else:
        assert all(w == weights[0] for w in weights)
    keys = {k for _, d in tracker.logged for k in d}
    assert (
        "recovery/text/mixture/embedded:reference" in keys
        and "recovery/text/val_loss/embedded:comments" in keys
    )


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"knowledge": {"gama": 0.2}}, "method.knowledge.gama is not a key"),
        ({"knowledge": {"gamma": 1.5}}, "method.knowledge.gamma=1.5"),
        ({"lhspg": {"periods": 0}}, "method.lhspg.periods=0"),
        ({"lhspg": {"saliency": "taylor"}}, "method.lhspg.saliency"),
        ({"train": {"max_steps": 10}}, "method.train.max_steps cannot be set"),
        ({"train": {"lr": -1}}, "method.train.lr=-1"),
        ({"recovery": {"floor": 0.5}}, "method.mixer.floor=0.5"),
        ({"recovery": {"lora": {"max_steps": 3}}}, "method.recovery.lora.max_steps is set per stage"),
        (
            {
                "recovery": {
                    "stages": [{"name": "t", "format": "text", "sources": ["embedded:wiki"], "max_steps": 1}]
                }
            },
            "embedded:wiki",
        ),
        (
            {"recovery": {"stages": [{"name": "t", "format": "prose", "sources": ["c4"], "max_steps": 1}]}},
            "format",
        ),
        ({"targets": ["layer"]}, "method.targets"),
    ],
)
def test_bad_lorashear_values_name_their_key(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        m = _lorashear(**kw)
        m.check()  # sources are resolved by check(), before any model loads


def test_dynamic_recovery_resumes_after_the_last_finished_stage(tmp_path, tok):
    from prunelab.data.sources import load_source_config

    method = _lorashear(recovery={**LS_RECOVERY, "dynamic": False})
    data = load_source_config("embedded")
    make = lambda: make_model("llama", 2, layers=2, vocab=2048, max_pos=256, inter=64)  # noqa: E731
    out = tmp_path / "recovered"
    method.recover(make(), tok, out, None, data)
    assert (out / "instruction" / "model").exists() and not (out / "text" / "model").exists()  # latest only
    text_hist = out / "text" / "history.json"
    mtime = text_hist.stat().st_mtime_ns
    # as if killed during the instruction stage: the text stage's model is there, its marker too
    (out / "instruction" / "done.json").unlink()
    import shutil

    shutil.copytree(out / "instruction" / "model", out / "text" / "model")
    method.recover(make(), tok, out, None, data)
    h = json.loads((out / "history.json").read_text())
    assert h["resumed_stages"] == ["text"] and [s["name"] for s in h["stages"]] == ["text", "instruction"]
    assert text_hist.stat().st_mtime_ns == mtime  # the text stage was not trained again


def _terms_by_hand(model, arch, unit):
    """[3, n] ‖W_g‖, |⟨W_g, (sBA)_g⟩|, cos(W_g, (sBA)_g) + 1 from peft's A, B and scaling, and ‖sBA‖."""
    from prunelab.structure.groups import decoder_layers, grouped, weight_members

    layer = decoder_layers(model)[unit.layer]
    ws, ds = [], []
    for m in weight_members(arch, unit):
        mod = layer.get_submodule(m.path)
        w = mod.base_layer.weight.detach().float()
        d = sum(
            mod.scaling[k] * (mod.lora_B[k].weight.float() @ mod.lora_A[k].weight.float()) for k in mod.lora_A
        )
        ws.append(grouped(w, m))
        ds.append(grouped(d.detach(), m))
    w, d = torch.cat(ws, 1), torch.cat(ds, 1)
    cos = (w * d).sum(1) / (w.norm(dim=1) * d.norm(dim=1)).clamp_min(1e-8) + 1
    return torch.stack([w.norm(dim=1), (w * d).sum(1).abs(), cos]), float(d.norm())


def test_every_selection_sees_the_lora_update_it_ranks_by(tmp_path, tok, monkeypatch):
    """Per-unit scope. LoRA-aware saliency = ‖W_g‖/max + |⟨W_g, (sBA)_g⟩|/max + (cos(W_g, (sBA)_g)
    + 1)/max within the unit, written here from the paper. Every period's selection — not only
    the first — must see a non-zero B·A (a period's end is the next one's start, and the merge
    there resets B: selecting after it ranks by magnitude alone) and rank by that formula."""
    from prunelab.methods.lorashear import lhspg

    real = lhspg.saliency
    calls = []

    def spy(model, arch, unit):
        out = real(model, arch, unit)
        terms, delta = _terms_by_hand(model, arch, unit)
        expected = (terms / terms.max(dim=1, keepdim=True).values).sum(0)
        calls.append((unit.key, delta, out.clone(), expected))
        return out

    monkeypatch.setattr(lhspg, "saliency", spy)
    method = _lorashear(
        knowledge={"enabled": False},
        recovery={"enabled": False},
        lhspg={"warmup_steps": 2, "periods": 3, "period_steps": 3, "scope": "unit"},
    )
    _prune(method, tmp_path, tok)
    selects = [e for e in method.history["events"] if e["event"] == "select"]
    assert len(selects) == 3 and len(calls) >= 3 * 2  # every period ranks at least two units
    for key, delta, out, expected in calls:
        assert delta > 0, f"a selection of {key} saw B·A = 0 (ranked by magnitude alone)"
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


def test_global_selection_takes_the_least_salient_groups_across_layers(tmp_path, tok, monkeypatch):
    """Global scope (the default): at every period start, each kind's groups of all layers are
    ranked on one scale (each saliency term divided by its max over all groups of that kind),
    and the least salient not-yet-redundant groups are taken until the kind's cumulative count
    p/P · total is reached, never leaving a unit fewer than ceil(min_keep · n) groups. Checked
    against that rule written out here; the counts end unequal across layers (the allocation
    is learned, not LLM-Pruner's uniform one) and still sum to the plan's total per kind."""
    import math

    from prunelab.methods.lorashear.pruner import LoRAShear

    real = LoRAShear._select_global
    checked = []

    def spy(self, model, arch, todo, redundant, want):
        before = {k: v.clone() for k, v in redundant.items()}
        scores = {}
        for kind in want:
            mine = [u for u in todo if u.kind == kind]
            terms = {u.key: _terms_by_hand(model, arch, u)[0] for u in mine}
            scale = torch.stack([t.max(dim=1).values for t in terms.values()]).max(dim=0).values
            scores.update({k: (t / scale[:, None]).sum(0) for k, t in terms.items()})
        real(self, model, arch, todo, redundant, want)
        for kind, target in want.items():
            mine = [u for u in todo if u.kind == kind]
            assert sum(int(redundant[u.key].sum()) for u in mine) == target
            picked, passed = [], []
            for u in mine:
                floor = max(1, math.ceil(self.lhspg.min_keep * u.n))
                assert int((~redundant[u.key]).sum()) >= floor  # min_keep holds
                new = redundant[u.key] & ~before[u.key]
                picked += scores[u.key][new].tolist()
                if int((~redundant[u.key]).sum()) > floor:  # room left: its groups were passed over
                    passed += scores[u.key][~redundant[u.key]].tolist()
            # greedy on one global scale: nothing passed over is less salient than a pick
            # (up to float ties: the terms agree with the hand ones to ~1e-7)
            assert not picked or not passed or max(picked) <= min(passed) + 1e-5
        checked.append(want)

    monkeypatch.setattr(LoRAShear, "_select_global", spy)
    method = _lorashear(knowledge={"enabled": False}, recovery={"enabled": False})
    assert method.lhspg.scope == "global"
    _, _, masks, _ = _prune(method, tmp_path, tok, ratio=0.2)
    assert len(checked) == 3
    plan = method.final_plan
    removed = {k: int((~m).sum()) for k, m in masks.items()}
    assert removed == {k: plan.remove.get(k, 0) for k in removed}
    mlp = [n for k, n in removed.items() if k.endswith(".mlp")]
    assert len(set(mlp)) > 1  # not a uniform per-layer count
    assert sum(mlp) == checked[-1]["mlp"]
    assert abs(plan.achieved - 0.2) <= 0.05 * 0.2
