"""The stages that back-propagate, on a model dispatched by accelerate over CPU + disk
(``model.device_map``): LLM-Pruner's Taylor importances and LoRAPrune's taylor importance
(gradients of offloaded weights, ``placement.live_parameters``), LoRA recovery through peft
(adapters resident beside offloaded base weights, merged into the offload store; with
gradient checkpointing too), LoRAPrune, ATP and LoRAShear (its knowledge analysis probing
materialized layers, its LHSPG projections and period-end merges written back into the
offload store, its own recovery stages) give exactly the single-device run's masks, saved
pruned and recovered weights, adapters, training losses and metrics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_dispatch_runs import AUTO, _run, _same_metrics, _same_tensors

# layer 1 split below the block: single linears are offloaded units of their own (their
# weights load in their own forward), beside whole blocks on disk and on the CPU
SPLIT = [
    "model.device_map={model.embed_tokens: cpu, model.layers.0: disk, model.layers.1.self_attn: disk, "
    "model.layers.1.mlp.gate_proj: disk, model.layers.1.mlp.up_proj: cpu, model.layers.1.mlp.down_proj: disk, "
    "model.layers.1.input_layernorm: cpu, model.layers.1.post_attention_layernorm: disk, model.layers.2: cpu, "
    "model.layers.3: disk, model.layers.4: disk, model.layers.5: cpu, model.layers.6: disk, model.layers.7: disk, "
    "model.norm: disk, model.rotary_emb: cpu, lm_head: cpu}"
]
LLM_PRUNER = ["method=llm_pruner", "ratio=0.2"]
LORA = ["recovery=lora_embedded"]
RUNS = {  # the gradient stages: (overrides, placement)
    "element2": ([*LLM_PRUNER, "method.importance=element2"], SPLIT),
    # structured pruning, then LoRA recovery with activation checkpointing (recomputed
    # forwards re-run accelerate's hooks, which reload the offloaded base weights)
    "vector+lora": (
        [*LLM_PRUNER, "method.importance=vector", *LORA, "recovery.gradient_checkpointing=true"],
        AUTO,
    ),
    # sparse: LoRA's merged update re-masked; adapters on linears that are offloaded units
    "magnitude+lora": (["method=magnitude", "ratio=0.5", *LORA], SPLIT),
    # training while pruning: LoRA-gradient scores of offloaded layers, masks as input hooks
    "loraprune": (["method=loraprune", "ratio=0.2", "recovery=none"], SPLIT),
    # true gradients of the frozen base weights (offloaded ones: the tensors the forwards used)
    "loraprune_taylor": (
        ["method=loraprune", "method.importance=taylor", "ratio=0.2", "recovery=none"],
        SPLIT,
    ),
    # the generator's gates as forward hooks, the group-lasso step on the adapters
    "atp": (["method=atp", "ratio=0.2", "recovery=none"], AUTO),
    # knowledge probes on materialized layers, LHSPG projections and period-end merges written
    # back into the offload store (debug=fast: 2-step periods)
    "lorashear": (
        [
            "method=lorashear",
            "ratio=0.2",
            "method.recovery.enabled=false",
            "method.knowledge.ratios=[0.5]",
            "method.lhspg.periods=2",
        ],
        SPLIT,
    ),
    # then its own staged recovery (two stages over three sources: ~45 s, hence slow)
    "lorashear+recovery": pytest.param(["method=lorashear", "ratio=0.2"], SPLIT, marks=pytest.mark.slow),
}


@pytest.mark.parametrize("method,placement", list(RUNS.values()), ids=list(RUNS))
def test_gradient_stages_on_a_dispatched_model_equal_single_device(method, placement, tmp_path):
    single, single_dir = _run(tmp_path, "single", method)
    spread, spread_dir = _run(tmp_path, "dispatched", [*method, *placement])
    assert spread["resumed_stages"] == single["resumed_stages"] == []
    masks = _same_tensors(spread_dir, single_dir, "masks.safetensors")
    assert any(not m.all() for m in masks.values())  # something was pruned
    _same_tensors(spread_dir, single_dir, "pruned/model.safetensors")
    _same_metrics(spread["pruned"], single["pruned"])  # rel 1e-6 (both fp32 on the CPU)
    placed = json.loads((spread_dir / "stages" / "prune.json").read_text())["device_map"]
    assert "disk" in placed.values(), placed
    if (single_dir / "prune_train").is_dir():  # a method that trains while it prunes: its adapter
        got, ref = (
            load_file(str(d / "prune_train/adapter/adapter_model.safetensors"))
            for d in (spread_dir, single_dir)
        )
        assert got.keys() == ref.keys() and got
        for k in got:
            assert torch.equal(got[k], ref[k]), k
        history, history_ref = (
            json.loads((d / "prune_train/history.json").read_text()) for d in (spread_dir, single_dir)
        )
        assert history["train"] == history_ref["train"] and history["val"] == history_ref["val"]
    if "method=lorashear" in method:
        _same_lorashear(spread_dir, single_dir)
        if "method.recovery.enabled=false" not in method:
            _same_metrics(spread["recovered"], single["recovered"])
        return
    if "recovery=lora_embedded" not in method:
        return
    for part in ("recovered/adapter/adapter_model.safetensors", "recovered/model/model.safetensors"):
        got, ref = load_file(str(spread_dir / part)), load_file(str(single_dir / part))
        assert got.keys() == ref.keys() and got, part
        for k in got:
            assert torch.equal(got[k], ref[k]), (part, k)
    history, history_ref = (
        json.loads((d / "recovered" / "history.json").read_text()) for d in (spread_dir, single_dir)
    )
    for k in ("train", "val", "best_step", "best_val_loss", "merge_max_abs_diff"):
        assert history[k] == history_ref[k], k
    _same_metrics(spread["recovered"], single["recovered"])


def _same_lorashear(spread_dir, single_dir) -> None:
    """LoRAShear's own records: the knowledge analysis, the LHSPG events, the dense reference
    losses and every recovery stage's adapter, model, losses and mixture."""
    for part in ("knowledge_distribution.json", "prune_train/reference_losses.json"):
        assert (spread_dir / part).is_file() == (single_dir / part).is_file(), part
        if (single_dir / part).is_file():
            assert (spread_dir / part).read_text() == (single_dir / part).read_text(), part
    events, events_ref = (
        json.loads((d / "stages" / "prune.json").read_text()) for d in (spread_dir, single_dir)
    )
    for k in ("knowledge", "unprunable", "plan", "schedule", "events", "redundant_max_norm_after_merge"):
        assert events["training"][k] == events_ref["training"][k], k
    assert any(e["event"] == "period_end_merge" for e in events["training"]["events"])
    if not (single_dir / "recovered").is_dir():  # method.recovery.enabled=false
        return
    parts = sorted(p.relative_to(single_dir) for p in single_dir.glob("recovered/**/*.safetensors"))
    assert len(parts) >= 3, parts  # the stages' adapters and the recovered model
    for part in parts:
        got, ref = load_file(str(spread_dir / part)), load_file(str(single_dir / part))
        assert got.keys() == ref.keys() and got, part
        for k in got:
            assert torch.equal(got[k], ref[k]), (part, k)
    for stage in json.loads((single_dir / "recovered" / "history.json").read_text())["stages"]:
        history, history_ref = (
            json.loads((d / "recovered" / stage["name"] / "history.json").read_text())
            for d in (spread_dir, single_dir)
        )
        for k in ("train", "val", "best_step", "best_val_loss", "mixture"):
            assert history[k] == history_ref[k], (stage["name"], k)


@pytest.mark.slow
def test_lorashear_resumed_on_a_dispatched_model_equals_single_device(tmp_path, monkeypatch):
    """LHSPG killed after a checkpoint that holds base weights (step 5: after the merge of step
    4), rerun: the checkpoint's base weights are written back into the offload store, and the
    run ends as the uninterrupted single-device one."""
    from prunelab.methods.lorashear.pruner import LHSPGSchedule

    method = [
        "method=lorashear",
        "ratio=0.2",
        "method.recovery.enabled=false",
        "method.train.checkpoint_every=5",
    ]
    after_step, ran = LHSPGSchedule.after_step, []

    def killed_at_7(self, model, step, steps):
        if step == 7:
            raise KeyboardInterrupt("killed at step 7")
        return after_step(self, model, step, steps)

    def counted(self, model, step, steps):
        ran.append(step)
        return after_step(self, model, step, steps)

    monkeypatch.setattr(LHSPGSchedule, "after_step", killed_at_7)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "dispatched", [*method, *SPLIT])
    monkeypatch.setattr(LHSPGSchedule, "after_step", counted)
    spread, spread_dir = _run(tmp_path, "dispatched", [*method, *SPLIT])
    assert ran == [6, 7, 8, 9, 10]  # resumed from the checkpoint of step 5
    single, single_dir = _run(tmp_path, "single", method)
    for part in (
        "masks.safetensors",
        "pruned/model.safetensors",
        "prune_train/adapter/adapter_model.safetensors",
    ):
        got, ref = load_file(str(spread_dir / part)), load_file(str(single_dir / part))
        assert got.keys() == ref.keys() and got, part
        for k in got:
            assert torch.equal(got[k], ref[k]), (part, k)
    _same_metrics(spread["pruned"], single["pruned"])
