"""ATP as the authors ran it (issue 18.3 c, e): the official generator schedule — its share of
the run, its learning-rate periods, its early-stop rule — against values computed by hand and
by torch's own CosineAnnealingLR, and the generator step on held-out batches with dropout off."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.data.sources import load_source_config
from prunelab.errors import ConfigError
from prunelab.methods import PruneContext, build_method
from prunelab.methods.atp import pruner as atp
from prunelab.structure import arch_info, units
from prunelab.structure.plan import plan_ratio
from tests.conftest import make_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _joint(schedule="official", steps=1000, lr=1e-3, mode="eval", patience=None, tolerance=None, by=None):
    defaults = atp.SCHEDULES[schedule]
    method = SimpleNamespace(
        generator=atp.GeneratorConfig(dim=16, heads=2, layers=1, lr=lr),
        seed=3,
        schedule=schedule,
        generator_mode=mode,
        freeze_by=by if by is not None else defaults["freeze_by"],
        freeze_tolerance=tolerance if tolerance is not None else defaults["freeze_tolerance"],
        freeze_patience=patience if patience is not None else defaults["freeze_patience"],
        budget_weight=5.0,
        lasso=0.0,
        trainer=SimpleNamespace(lr_at=lambda step, steps: 1e-3, batch_size=2, micro_batch_size=2),
    )
    arch = arch_info(make_model("llama", 2, layers=2).config)
    todo = units(arch, ("attn", "mlp"))
    weights = {u.key: atp.structure_params(arch, u) for u in todo}
    return atp.JointTraining(method, arch, todo, weights, 0.7, steps, torch.device("cpu"))


# ----------------------------------------------------------------------------- (c) schedule


def test_official_schedule_trains_the_generator_for_the_first_40_percent():
    """main_llm_atp.py: --epochs 10, --control-epochs 4 from --start-epoch-control 0: the
    generator trains in epochs 0–3 of 10 — 400 of 1,000 steps, 28 of 70 (floor)."""
    assert _joint("official", steps=1000).freeze_limit == 400
    assert _joint("official", steps=70).freeze_limit == 28
    assert _joint("fast", steps=70).freeze_limit == 35
    assert atp.SCHEDULES["official"] == {"freeze_tolerance": 0.005, "freeze_patience": 4000, "freeze_by": 0.4}


def test_official_generator_lr_matches_torch_cosine_annealing_per_period_and_the_fifth_cut():
    """The official generator lr: AdamW lr 1e-3 under CosineAnnealingLR(T_max=4, eta_min=1e-4)
    stepped once per epoch, and ×0.2 after iteration int(4/5·len) of the last control epoch.
    Reference: torch's scheduler itself, one step per period of 100 generator steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=1e-4)
    per_epoch = []
    for _ in range(4):
        per_epoch.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    joint = _joint("official", steps=1000, lr=1e-3)  # 400 generator steps: periods of 100
    for step in range(1, 401):
        e = (step - 1) // 100
        expected = per_epoch[e] * (0.2 if e == 3 and step - 300 > 80 else 1.0)
        assert joint.generator_lr(step) == pytest.approx(expected, rel=1e-9), step
    assert joint.generator_lr(380) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(3 * math.pi / 4)) / 2)
    assert joint.generator_lr(381) == pytest.approx(0.2 * joint.generator_lr(380))
    fast = _joint("fast", steps=1000, lr=1e-2)
    assert {fast.generator_lr(s) for s in (1, 200, 499)} == {1e-2}


def test_official_freeze_rule_by_hand():
    """Sampled-decision budget loss ≤ tolerance (≤, as the official `<=`) for `patience`
    consecutive generator steps, the count restarting with every period (the official counter
    is local to an epoch); the deterministic decisions' loss does not matter. Periods of 100
    steps (400 generator steps): quiet from step 99 → 99:1, 100:2, 101 (new period): 1, 102:
    2, 103: 3 → frozen at 103, not at 101."""
    joint = _joint("official", steps=1000, patience=3, tolerance=0.005)
    frozen_at = None
    for step in range(1, 401):
        sampled = 0.005 if step >= 99 else 0.3  # exactly at the tolerance counts
        if joint.count_quiet(step, det_loss=1.0, sampled=sampled):
            frozen_at = step
            break
    assert frozen_at == 103
    # a loud step resets the count: quiet 10, 11, loud 12, quiet 13, 14, 15 → 15
    joint = _joint("official", steps=1000, patience=3, tolerance=0.005)
    seq = {10: 0.001, 11: 0.001, 12: 0.0051, 13: 0.0, 14: 0.002, 15: 0.004}
    hits = [s for s in range(1, 30) if joint.count_quiet(s, det_loss=0.0, sampled=seq.get(s, 1.0))]
    assert hits[0] == 15
    # never quiet: forced at the end of the generator phase, floor(0.4 · 1000) = 400
    joint = _joint("official", steps=1000)
    hits = [s for s in range(1, 401) if joint.count_quiet(s, det_loss=0.0, sampled=0.01)]
    assert hits == [400]
    # fast: the deterministic loss, strictly below 0.02, 10 in a row, no period restarts
    joint = _joint("fast", steps=1000)
    hits = [
        s for s in range(1, 60) if joint.count_quiet(s, det_loss=0.0199 if s >= 20 else 0.02, sampled=9.0)
    ]
    assert hits[0] == 29


ATP_TRAIN = {
    "format": "text",
    "cutoff_len": 32,
    "batch_size": 4,
    "micro_batch_size": 2,
    "max_steps": 20,
    "epochs": 4,
    "eval_every": 10,
    "val_size": 4,
    "warmup_steps": 0,
    "lr": 2e-3,
    "max_train_examples": 60,
    "dropout": 0.3,
}


def _atp(**kw):
    cfg = {
        "_target_": "prunelab.methods.atp.ATP",
        "name": "atp",
        "generator": {"dim": 16, "heads": 2, "layers": 1, "lr": 5e-2},
        "train": ATP_TRAIN,
        **kw,
    }
    return build_method(OmegaConf.create(cfg))


def _prune(method, tmp_path, tok, ratio=0.08):
    model = make_model("llama", 2, layers=2, vocab=2048, max_pos=256, inter=64)
    arch = arch_info(model.config)
    plan = plan_ratio(arch, ratio, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
    ctx = PruneContext(
        tok, None, 0, data_cfg=load_source_config("embedded"), out_dir=tmp_path / "t", run_dir=tmp_path
    )
    return method.prune(model, plan, ctx)


def test_official_schedule_end_to_end_freezes_at_its_share_with_its_lr(tmp_path, tok):
    method = _atp(schedule="official")
    assert (method.freeze_tolerance, method.freeze_patience, method.freeze_by) == (0.005, 4000, 0.4)
    _prune(method, tmp_path, tok)
    h = method.history
    assert h["schedule"] == "official" and h["steps"] == 20
    assert h["generator_steps"] == 8 and h["frozen_at"] == 8 and h["freeze_forced"]  # floor(0.4 · 20)
    gen = [e for e in h["decisions"] if "lm_loss" in e]
    assert [e["step"] for e in gen] == list(range(1, 9))  # one generator step per LoRA step, then none
    # 8 steps in periods starting at 1, 3, 5, 7; the last period is 2 long: int(0.8·2) = 1 → step 8 cut
    lr, floor = 5e-2, 5e-3
    expected = [floor + (lr - floor) * (1 + math.cos(math.pi * e / 4)) / 2 for e in (0, 0, 1, 1, 2, 2, 3, 3)]
    expected[-1] *= 0.2
    assert [e["generator_lr"] for e in gen] == pytest.approx(expected)
    # an explicit key overrides the schedule's default
    assert _atp(schedule="official", freeze_patience=7).freeze_patience == 7
    assert _atp().schedule == "official" and _atp(schedule="fast").freeze_by == 0.5


def test_bad_schedule_and_generator_step_keys_name_themselves():
    for kw, msg in (
        ({"schedule": "paper"}, "method.schedule"),
        ({"generator_data": "val"}, "method.generator_data"),
        ({"generator_mode": "test"}, "method.generator_mode"),
        ({"heldout_fraction": 1.0}, "method.heldout_fraction=1.0"),
    ):
        with pytest.raises(ConfigError, match=msg):
            _atp(**kw)


def test_atp_paper_config_uses_the_official_schedule():
    from hydra import compose, initialize_config_dir

    import prunelab.cli  # noqa: F401  (the run_dir_name resolver)
    from prunelab.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        paper = compose(config_name="config", overrides=["method=atp_paper"])
        small = compose(config_name="config", overrides=["method=atp"])
        real = compose(config_name="config", overrides=["method=atp_smollm2"])
        picked = compose(config_name="config", overrides=["method=atp", "method.schedule=fast"])
    assert paper.method.schedule == "official" and small.method.schedule == "official"
    assert real.method.schedule == "fast" and picked.method.schedule == "fast"
    assert paper.method.generator_data == "heldout" and paper.method.generator_mode == "eval"


# ----------------------------------------------------------------------------- (e) held-out, eval


def _rows(batches):
    """Each sequence of the micro-batches as a tuple of its real (unpadded) tokens."""
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            out.append(tuple(ids[mask.bool()].tolist()))
    return out


def test_generator_batches_are_held_out_and_never_reach_the_lora_step(tmp_path, tok, monkeypatch):
    seen = {"generator": [], "lora": []}
    gen_batches, before = atp.JointTraining.generator_batches, atp.JointTraining.before_step

    def spy_gen(self, batches):
        out = gen_batches(self, batches)
        seen["generator"] += _rows(out)
        return out

    def spy_before(self, model, step, steps, batches):
        seen["lora"] += _rows(batches)  # the LoRA step's own micro-batches
        return before(self, model, step, steps, batches)

    monkeypatch.setattr(atp.JointTraining, "generator_batches", spy_gen)
    monkeypatch.setattr(atp.JointTraining, "before_step", spy_before)
    method = _atp(schedule="fast")  # generator steps 1..10 of 20
    # the training windows, read independently of ATP: 60 distinct windows of 32 tokens
    feats, _, _ = method.trainer.features_for(tok, load_source_config("embedded"))
    windows = [tuple(f["input_ids"]) for f in feats]
    assert len(windows) == 60 and len(set(windows)) == 60  # distinct: contents identify windows
    _prune(method, tmp_path, tok)
    gen, lora = set(seen["generator"]), set(seen["lora"])
    assert method.history["heldout_examples"] == 6  # round(0.1 · 60)
    assert len(seen["generator"]) == 10 * 4  # 10 generator steps × batch 4
    assert gen <= set(windows) and lora <= set(windows)
    assert len(gen) <= 6  # drawn from the 6 held-out windows only ...
    assert not gen & lora  # ... which no LoRA step ever saw
    assert len(lora) == 54  # the LoRA step covers the other 54 (80 draws, epoch-wise permutations)


def test_shared_generator_data_uses_the_lora_steps_batch():
    joint = _joint("fast")
    batches = [{"input_ids": torch.zeros(1, 3, dtype=torch.long)}]
    assert joint.generator_batches(batches) is batches  # no held-out pool


def _dropout_peft(p=0.5):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(
        make_model("llama", 2, layers=2),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=TARGETS),
    )
    with torch.no_grad():
        for n, w in pm.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.5)
    return pm.train()


def _batch():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_generator_step_with_dropout_off_gives_identical_losses_twice(mode):
    """A model with LoRA dropout 0.5, in training mode as the trainer leaves it: two identical
    generators (same seed, same noise) take a generator step on the same batch. With the
    official eval mode, dropout is off and the LM losses are identical; in train mode
    dropout makes them differ. The model comes back in training mode either way."""
    pm = _dropout_peft()
    losses = []
    joints = [_joint("fast", steps=10, mode=mode) for _ in range(2)]  # (make_model reseeds torch)
    for joint in joints:
        joint.gates.install(pm)
        joint.before_step(pm, 1, 10, [_batch()])
        joint.gates.remove()
        losses.append(joint.log[-1]["lm_loss"])
        assert pm.training
    if mode == "eval":
        assert losses[0] == losses[1]
    else:
        assert losses[0] != losses[1]


def test_eval_mode_keeps_activation_checkpointing_and_turns_dropout_off():
    pm = _dropout_peft()
    base = pm.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    joint = _joint("fast", steps=10, mode="eval")
    dropouts = [m for m in pm.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    with joint.model_mode(pm):
        assert all(not m.training for m in dropouts)
        assert all(layer.training for layer in base.model.layers)  # checkpointing still gated on
        assert not pm.training
    assert pm.training and all(m.training for m in dropouts)


def test_heldout_split_is_disjoint_seeded_and_sized():
    lora, held = atp.heldout_split(50, 0.1, seed=0)
    assert len(held) == 5 and len(lora) == 45 and sorted(lora + held) == list(range(50))
    assert held == atp.heldout_split(50, 0.1, seed=0)[1]
    assert held != atp.heldout_split(50, 0.1, seed=1)[1]
    assert len(atp.heldout_split(3, 0.01, seed=0)[1]) == 1  # at least one
    with pytest.raises(ConfigError, match="at least 2"):
        atp.heldout_split(1, 0.5, seed=0)


def test_lora_sampler_draws_epochs_of_the_remaining_indices():
    joint = _joint("fast")
    joint.lora_indices = [0, 2, 3, 5, 8]
    draws = [joint.sample(s, 3) for s in range(1, 6)]  # 15 draws = 3 epochs of 5
    flat = [i for d in draws for i in d]
    assert all(sorted(flat[e * 5 : e * 5 + 5]) == [0, 2, 3, 5, 8] for e in range(3))
    assert joint.hooks(0).sample is not None and _joint("fast").hooks(0).sample is None
