"""LoRA recovery (``recovery=lora``) on tiny seeded models with the embedded tokenizer.

pytest -q tests/unit/test_recovery.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from prunelab.errors import ConfigError
from prunelab.paths import conf_dir
from prunelab.recovery.lora import (
    IGNORE_INDEX,
    LoraRecovery,
    checkpointing,
    collate,
    lora_state,
    mean_loss,
    merge_lora,
    tokenize_example,
)

EXAMPLES = [
    {
        "instruction": "Complete the passage.",
        "input": "The import statement finds a module",
        "output": "and binds it.",
    },
    {
        "instruction": "What does this section describe?",
        "input": "A list is a mutable sequence.",
        "output": "Lists",
    },
    {"instruction": "Complete the passage.", "input": "", "output": "Return the absolute value of a number."},
    {
        "instruction": "Complete the passage.",
        "input": "Strings are immutable",
        "output": "sequences of code points.",
    },
    {
        "instruction": "What does this section describe?",
        "input": "A dict maps keys to values.",
        "output": "Dicts",
    },
    {
        "instruction": "Complete the passage.",
        "input": "The for statement iterates",
        "output": "over a sequence.",
    },
    {
        "instruction": "Complete the passage.",
        "input": "Exceptions are raised",
        "output": "when errors occur.",
    },
    {"instruction": "What does this section describe?", "input": "Tuples are immutable.", "output": "Tuples"},
]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: thread sync costs more than it saves, and badly so on busy cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(pruned: bool = False, seed: int = 0):
    """A 2-layer LLaMA with the embedded tokenizer's vocab; ``pruned``: layer 0's MLP sliced."""
    from prunelab.structure import prune_physically
    from tests.conftest import make_model

    model = make_model(
        "llama", kv=2, heads=4, layers=2, hidden=64, inter=96, seed=seed, vocab=2048, max_pos=256
    )
    if pruned:
        keep = torch.ones(96, dtype=torch.bool)
        keep[::3] = False
        prune_physically(model, {"0.mlp": keep})
        assert model.model.layers[0].mlp.down_proj.in_features == 64
    return model


def quick(**kw) -> LoraRecovery:
    args = dict(batch_size=4, micro_batch_size=2, max_steps=2, eval_every=1, warmup_steps=0, dropout=0.0)
    return LoraRecovery(**{**args, **kw})


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- data


def test_prompt_masked_answer_not(tok):
    from prunelab.data.sources import alpaca_prompt

    ex = EXAMPLES[0]
    f = tokenize_example(tok, ex, cutoff_len=256, train_on_inputs=False)
    n_prompt = len(tok(alpaca_prompt(ex))["input_ids"]) + 1  # + the BOS prepended
    assert f["input_ids"][0] == tok.bos_token_id and f["input_ids"][-1] == tok.eos_token_id
    assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:] and len(f["labels"]) > n_prompt
    assert tok.decode(f["labels"][n_prompt:-1]).strip() == ex["output"]

    everything = tokenize_example(tok, ex, cutoff_len=256, train_on_inputs=True)
    assert everything["labels"] == everything["input_ids"] == f["input_ids"]
    assert len(tokenize_example(tok, ex, cutoff_len=20, train_on_inputs=False)["input_ids"]) == 20


def test_collate_pads_with_mask_and_ignored_labels(tok):
    feats = [tokenize_example(tok, e, 256, False) for e in EXAMPLES[:3]]
    b = collate(feats, tok.pad_token_id)
    lengths = [len(f["input_ids"]) for f in feats]
    assert b["input_ids"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):
        assert b["attention_mask"][i, :n].all() and not b["attention_mask"][i, n:].any()
        assert (b["labels"][i, n:] == IGNORE_INDEX).all()
        assert (b["input_ids"][i, n:] == tok.pad_token_id).all()


def test_examples_without_answer_tokens_are_dropped(tok):
    # cutoff inside the prompt: no answer token left, so the example carries no loss.
    feats, dropped = quick(cutoff_len=8).features(tok, EXAMPLES)
    assert feats == [] and dropped == len(EXAMPLES)


def test_validation_held_out_of_train_without_a_validation_split():
    node = OmegaConf.load(conf_dir() / "data" / "alpaca_cleaned.yaml")
    fixture = Path(__file__).parents[1] / "fixtures" / "data" / "alpaca_data_cleaned.json"
    node.local_files = {"train": str(fixture)}
    rec = quick(data="alpaca_cleaned", val_size=1)
    rec.check(node)
    train, val = rec.examples(node)
    assert len(val) == 1 and len(train) == len(json.loads(fixture.read_text())) - 1
    key = lambda e: (e["instruction"], e["input"], e["output"])  # noqa: E731
    assert not {key(e) for e in val} & {key(e) for e in train}
    assert rec.examples(node) == (train, val)  # seeded
    # Another data node than recovery.data is not used.
    assert rec._data_node(OmegaConf.create({"name": "embedded"})).name == "alpaca_cleaned"


def test_text_format_trains_on_plain_windows(tok, tmp_path):
    node = OmegaConf.load(conf_dir() / "data" / "alpaca_cleaned.yaml")
    node.local_files = {
        "train": str(Path(__file__).parents[1] / "fixtures" / "data" / "alpaca_data_cleaned.json")
    }
    rec = quick(data="alpaca_cleaned", format="text", cutoff_len=32, val_size=2, lr=1e-3)
    train, val = rec.text_windows(tok, node)
    assert len(val) == 2 and len(train) >= 4
    assert all(f["labels"] == f["input_ids"] and len(f["input_ids"]) == 32 for f in train + val)
    out = rec.recover(tiny(), tok, tmp_path, data_cfg=node)
    h = json.loads((tmp_path / "history.json").read_text())
    assert h["num_train_examples"] == len(train) and h["merge_max_abs_diff"] <= 1e-5
    assert torch.isfinite(logits(out, IDS)).all()


# ----------------------------------------------------------------------------- training


def test_merge_matches_unmerged_adapter_on_pruned_model():
    from peft import LoraConfig, get_peft_model

    model = tiny(pruned=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at zero: make the adapter do something
    before = logits(peft_model, IDS)
    merged, diff = merge_lora(peft_model, {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)})
    assert type(merged).__name__ == "LlamaForCausalLM" and not merged.training
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert diff is not None and diff <= 1e-5
    assert (logits(merged, IDS) - before).abs().max() <= 1e-5


def test_recover_trains_lowers_loss_and_merges(tok, tmp_path):
    model = tiny(pruned=True)
    rec = quick(lr=2e-2, epochs=12, max_steps=12, batch_size=8, micro_batch_size=4, eval_every=4)
    feats, _ = rec.features(tok, EXAMPLES)
    batches = [collate(feats[i : i + 4], tok.pad_token_id) for i in range(0, len(feats), 4)]
    loss_before = mean_loss(model, batches)
    out = rec.fit(model, tok, EXAMPLES, EXAMPLES[:4], tmp_path)
    assert out is model and not out.training  # same object, base weights updated in place
    assert not any("lora" in n for n, _ in out.named_modules()) and not hasattr(out, "peft_config")
    assert mean_loss(out, batches) < loss_before - 0.5
    h = json.loads((tmp_path / "history.json").read_text())
    assert h["train"][-1]["loss"] < h["train"][0]["loss"]
    assert h["merge_max_abs_diff"] <= 1e-5
    assert [v["step"] for v in h["val"]] == [0, 4, 8, 12]
    assert h["tokens_per_s"] > 0 and h["num_train_examples"] == len(EXAMPLES)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_recovery_keeps_element_wise_sparsity(tok, tmp_path):
    """After a layer-wise method, LoRA's dense update is merged and the masks re-applied."""
    from prunelab.sparsity.checkpoint import sparsity_summary
    from prunelab.sparsity.patterns import Pattern, keep_mask

    model = tiny()
    masks = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "up_proj.weight", "down_proj.weight")):
                masks[n] = keep_mask(p.abs(), 0.5, Pattern(2, 4))
                p.mul_(masks[n])
    rec = quick(lr=2e-2, max_steps=4, target_modules=["q_proj", "up_proj", "down_proj", "v_proj"])
    out = rec.fit(model, tok, EXAMPLES, EXAMPLES[:4], tmp_path, keep_masks=masks)
    params = dict(out.named_parameters())
    for n, keep in masks.items():
        assert bool((params[n][~keep] == 0).all()), n
        assert bool((params[n][keep] != 0).all()), n
    assert sparsity_summary(out, masks)["achieved"] == 0.5
    h = json.loads((tmp_path / "history.json").read_text())
    assert h["remask"]["weights_zeroed"] > 0 and h["remask"]["max_abs_logit_change"] > 0
    # the unmasked v_proj took LoRA's update densely
    assert bool((params["model.layers.0.self_attn.v_proj.weight"] != 0).all())


def test_best_checkpoint_restored_when_validation_gets_worse(tok, tmp_path, monkeypatch):
    model = tiny()
    w0 = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    scripted = iter([5.0, 3.0, 1.0, 2.0, 4.0])  # evals at steps 0..4: best at step 2
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def fake_val_losses(self, peft_model, groups):
        snapshots[len(snapshots)] = lora_state(peft_model)
        v = next(scripted)
        return v, {"all": v}

    monkeypatch.setattr(LoraRecovery, "_val_losses", fake_val_losses)
    rec = quick(lr=1e-2, max_steps=4, r=4, alpha=8)
    out = rec.fit(model, tok, EXAMPLES, EXAMPLES[:2], tmp_path)
    h = json.loads((tmp_path / "history.json").read_text())
    assert h["best_step"] == 2 and h["best_val_loss"] == 1.0
    best, last = snapshots[2], snapshots[4]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all(
        torch.equal(v, best[k.replace(".weight", ".default.weight")]) for k, v in saved.items()
    )
    # The merged weight is W0 + (alpha/r)·B·A of the best state, not of the last.
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.default.weight"
    delta = (8 / 4) * best[name.format("B")] @ best[name.format("A")]
    assert torch.allclose(out.model.layers[1].self_attn.q_proj.weight, w0 + delta, atol=1e-6)
    assert not torch.equal(best[name.format("A")], last[name.format("A")])


def test_base_weights_never_trainable(tok, tmp_path):
    model = tiny(pruned=True)
    base = {n for n, _ in model.named_parameters()}

    class Tracker:
        def __init__(self) -> None:
            self.logs: list[tuple[int, dict]] = []

        def log(self, data, step):
            self.logs.append((step, data))
            for n, p in model.named_parameters():  # peft wrapped the modules in place
                if "lora_" not in n:
                    assert not p.requires_grad and p.grad is None, n

    tracker = Tracker()
    out = quick(lr=1e-3).fit(model, tok, EXAMPLES, EXAMPLES[:2], tmp_path, tracker)
    assert {n for n, _ in out.named_parameters()} == base
    assert not any(p.requires_grad for p in out.parameters())
    steps = [(s, sorted(d)) for s, d in tracker.logs]
    assert (1, ["recovery/lr", "recovery/train_loss"]) in steps and (2, ["recovery/val_loss"]) in steps


def test_same_seed_same_result(tok, tmp_path):
    outs = [
        quick(lr=1e-2, dropout=0.1).fit(tiny(), tok, EXAMPLES, EXAMPLES[:2], tmp_path / str(i))
        for i in range(2)
    ]
    assert torch.equal(logits(outs[0], IDS), logits(outs[1], IDS))


@pytest.fixture
def mlp_calls(monkeypatch):
    """A counter of LLaMA MLP forwards: checkpointing shows as MLPs run again in the backward.
    (Counting the decoder layer's own forward would not do: transformers wraps that forward for
    checkpointing when the class is created, and patching it would bypass the wrapper.)"""
    import transformers.models.llama.modeling_llama as ml

    calls = [0]
    forward = ml.LlamaMLP.forward

    def counted(self, x):
        calls[0] += 1
        return forward(self, x)

    monkeypatch.setattr(ml.LlamaMLP, "forward", counted)
    return calls


def test_gradient_checkpointing_trains_the_same_adapter(tok, tmp_path, mlp_calls):
    """Checkpointing trades memory for recomputation only: with dropout on (its masks are
    replayed in the recompute), the recovered model matches the one trained without it;
    the model leaves with checkpointing switched off."""
    outs, counts = [], []
    for gc in (False, True):
        model = tiny(pruned=True)
        rec = quick(lr=1e-2, dropout=0.1, max_steps=3, gradient_checkpointing=gc)
        mlp_calls[0] = 0
        outs.append(rec.fit(model, tok, EXAMPLES, EXAMPLES[:2], tmp_path / str(gc)))
        counts.append(mlp_calls[0])
        assert not checkpointing(outs[-1])
        frozen = outs[-1].requires_grad_(False)
        assert not frozen(input_ids=IDS).logits.requires_grad  # no input-grad hook left behind
    assert counts[1] > counts[0]  # the layers were recomputed in the backward
    assert torch.allclose(logits(outs[0], IDS), logits(outs[1], IDS), atol=1e-5)
    base = logits(tiny(pruned=True), IDS)
    assert (logits(outs[1], IDS) - base).abs().max() > 1e-3  # it did train


@pytest.mark.parametrize("name", ["loraprune", "atp", "lorashear"])
def test_methods_train_the_same_with_gradient_checkpointing(name, tok, tmp_path, mlp_calls):
    """The methods' forward hooks (LoRAPrune's masks, ATP's gates) are pure functions of
    state fixed within a step, so the recomputed layers see what the first forward saw: the
    same masks and bit-for-bit the same weights, with the MLPs visibly run again."""
    from prunelab.data.sources import load_source_config
    from prunelab.methods import PruneContext
    from prunelab.structure import arch_info
    from prunelab.structure.plan import plan_ratio
    from tests.conftest import make_model
    from tests.unit.test_atp import _atp
    from tests.unit.test_loraprune import _method as _loraprune
    from tests.unit.test_lorashear import _lorashear

    build, ratio = {"loraprune": (_loraprune, 0.1), "atp": (_atp, 0.2), "lorashear": (_lorashear, 0.2)}[name]
    runs = {}
    for gc in (False, True):
        torch.manual_seed(0)
        method = build()
        method.trainer.gradient_checkpointing = gc
        model = make_model("llama", 2, layers=4, vocab=2048, max_pos=256, inter=128)
        arch = arch_info(model.config)
        plan = plan_ratio(arch, ratio, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
        d = tmp_path / str(gc)
        ctx = PruneContext(tok, None, 0, data_cfg=load_source_config("embedded"), out_dir=d / "t", run_dir=d)
        mlp_calls[0] = 0
        masks = method.prune(model, plan, ctx)
        runs[gc] = (masks, [p.detach().clone() for p in model.parameters()], mlp_calls[0])
    (m0, w0, c0), (m1, w1, c1) = runs[False], runs[True]
    assert c1 > c0  # layers recomputed in the backward
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w0, w1, strict=True))


def test_recovered_per_layer_model_saves_and_reloads(tok, tmp_path):
    from prunelab.models.loading import load_pretrained, save_model

    out = quick(lr=1e-2).fit(tiny(pruned=True), tok, EXAMPLES, EXAMPLES[:2], tmp_path / "rec")
    save_model(out, tok, tmp_path / "model")
    back = load_pretrained(tmp_path / "model").eval()
    assert back.model.layers[0].mlp.down_proj.in_features == 64
    assert torch.equal(logits(back, IDS), logits(out, IDS))


def test_recover_on_embedded_instruction_data(tok, tmp_path):
    rec = quick(data="embedded", max_train_examples=8, val_size=4, lr=1e-3, cutoff_len=192)
    rec.check()
    out = rec.recover(tiny(), tok, tmp_path)
    h = json.loads((tmp_path / "history.json").read_text())
    assert h["num_val_examples"] + h["dropped_no_answer"]["validation"] == 4
    assert h["num_train_examples"] + h["dropped_no_answer"]["train"] == 8
    assert h["data_time_s"] > 0 and h["time_s"] >= h["data_time_s"]
    assert torch.isfinite(logits(out, IDS)).all()


# ----------------------------------------------------------------------------- config


def test_yaml_holds_the_paper_defaults():
    cfg = OmegaConf.load(conf_dir() / "recovery" / "lora.yaml")
    cfg.seed = 0
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
    assert cfg._target_ == "prunelab.recovery.lora.LoraRecovery"
    assert LoraRecovery(**kwargs) == LoraRecovery()


@pytest.mark.parametrize(
    "key,value",
    [
        ("r", 0),
        ("lr", 0.0),
        ("lr", -1e-4),
        ("target_modules", ["q_proj", "q_prj"]),
        ("data", "alpaca_cleand"),
        ("micro_batch_size", 5),
        ("dropout", 1.0),
        ("eval_every", 0),
        ("max_steps", 0),
        ("format", "alpaca"),
        ("gradient_checkpointing", "yes"),
    ],
)
def test_bad_values_name_their_key(key, value):
    with pytest.raises(ConfigError, match=rf"recovery\.{key}="):
        LoraRecovery(**{key: value})


def test_all_bad_values_reported_together():
    with pytest.raises(ConfigError) as e:
        LoraRecovery(r=0, lr=-1.0)
    assert "recovery.r=" in str(e.value) and "recovery.lr=" in str(e.value)


def test_patience_stops_when_validation_stops_improving(tok, tmp_path, monkeypatch):
    scripted = iter([5.0, 3.0, 1.0, 2.0, 4.0, 0.5, 0.1])  # evals at steps 0..6
    monkeypatch.setattr(LoraRecovery, "_val_losses", lambda self, m, g: (v := next(scripted), {"all": v}))
    rec = quick(lr=1e-2, epochs=20, max_steps=6, r=4, alpha=8, patience=2)
    rec.fit(tiny(), tok, EXAMPLES, EXAMPLES[:2], tmp_path)
    h = json.loads((tmp_path / "history.json").read_text())
    # best at step 2; steps 3 and 4 do not improve: stop after step 4, never see 0.5
    assert h["stopped_early_at"] == 4 and h["steps_run"] == 4 and h["best_step"] == 2


def test_validation_groups_are_reported_per_group(tok, tmp_path):
    seen = []
    from prunelab.recovery.lora import TrainHooks

    rec = quick(lr=1e-2, max_steps=2, r=4, alpha=8)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    groups = {"a": train[:2], "b": train[2:5]}
    rec.fit_features(
        tiny(),
        tok,
        train,
        groups,
        tmp_path,
        hooks=TrainHooks(on_validation=lambda s, per: seen.append((s, per))),
    )
    h = json.loads((tmp_path / "history.json").read_text())
    assert [s for s, _ in seen] == [0, 1, 2] and all(set(per) == {"a", "b"} for _, per in seen)
    # the overall loss is the token-weighted mean of the groups: between them
    point = h["val"][-1]
    lo, hi = sorted(point["per_group"].values())
    assert lo <= point["loss"] <= hi


def test_val_only_features_skip_the_training_split_and_keep_the_same_validation(tok):
    rec = quick(format="text", cutoff_len=32, val_size=5)
    train, val, _ = rec.features_for(tok)
    none, same, _ = rec.features_for(tok, val_only=True)
    assert train and none == [] and same == val


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_max_grad_norm_clips_the_lora_gradients_after_the_scoring_hook(tok, tmp_path, clip):
    """The optimizer sees gradients of global norm ≤ max_grad_norm; hooks that score from
    gradients (LoRAPrune's after_backward) see them unclipped."""
    from prunelab.recovery.lora import TrainHooks

    seen = {"raw": [], "stepped": []}

    def norm(model):
        return torch.norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
        ).item()

    rec = quick(lr=1e-2, max_steps=2, r=4, alpha=8, max_grad_norm=clip)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    hooks = TrainHooks(
        after_backward=lambda m, s, n: seen["raw"].append(norm(m)),
        after_step=lambda m, s, n: seen["stepped"].append(norm(m)),
    )
    rec.fit_features(tiny(), tok, train, train[:2], tmp_path, hooks=hooks)
    assert all(r > 1e-2 for r in seen["raw"])  # far above the clip
    if clip is None:
        assert seen["stepped"] == pytest.approx(seen["raw"])
    else:
        assert all(s == pytest.approx(clip, rel=1e-3) for s in seen["stepped"])
