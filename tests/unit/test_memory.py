"""The memory plan against the hand-computed table of docs/performance.md, the engine's own
activation-store choice, and the refusal of a run that cannot fit, before any weights load."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, LlamaConfig

import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
from prunelab.errors import ConfigError
from prunelab.memory import GiB, MiB, Shapes, check_memory, plan_memory
from prunelab.paths import conf_dir
from prunelab.runner import validate
from prunelab.sparsity.engine import pick_store

LLAMA_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
LLAMA2_70B = LlamaConfig(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _lines(stages, stage_prefix):
    st = next(s for s in stages if s.name.startswith(stage_prefix))
    return st, {what.split(" (")[0]: b for what, b in st.lines}


def test_parameter_counts_are_the_published_ones_and_a_real_models():
    # LLaMA-7B and LLaMA-2-70B as their model cards count them
    assert Shapes.from_config(LLAMA_7B).params == 6_738_415_616
    assert Shapes.from_config(LLAMA2_70B).params == 68_976_648_192
    # and a (tiny, GQA, tied) model transformers builds
    cfg = LlamaConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=97,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert Shapes.from_config(cfg).params == sum(p.numel() for p in model.parameters())


def test_layerwise_lines_equal_the_hand_computed_7b_table():
    """docs/performance.md's column for LLaMA-7B (fp16, 128 × 2048 calibration, batches of 8)."""
    cfg = _cfg("model=llama_7b", "method=sparsegpt", "data=c4")
    stages = plan_memory(cfg, LLAMA_7B, "cuda")
    st, lines = _lines(stages, "prune")
    assert lines["model weights"] / GiB == pytest.approx(12.6, abs=0.05)
    assert lines["calibration activations in memory"] / GiB == pytest.approx(4.0, abs=0.01)
    assert lines["input statistics of one block"] / MiB == pytest.approx(654, abs=1)
    assert lines["solver working set"] / MiB == pytest.approx(634, abs=1)
    assert lines["one batch inside a block"] / GiB == pytest.approx(1.0, abs=0.02)
    assert st.peak / GiB == pytest.approx(19, abs=0.5)  # "≈ 19 GiB"
    # offloaded: one block on the device, the activations streamed from disk, the model in host RAM
    off = plan_memory(
        _cfg(
            "model=llama_7b", "method=sparsegpt", "data=c4", "method.offload=true", "method.activations=disk"
        ),
        LLAMA_7B,
        "cuda",
    )
    st, lines = _lines(off, "prune")
    assert lines["one decoder block"] / MiB == pytest.approx(386, abs=1)
    assert lines["calibration activations on disk: one batch of 8 in + out"] / MiB == pytest.approx(
        256, abs=0.5
    )
    assert st.peak / GiB == pytest.approx(3, abs=0.15)  # "≈ 3 GiB"
    assert st.host[0][1] / GiB == pytest.approx(12.6, abs=0.05)


def test_70b_layerwise_does_not_fit_80gib_unless_offloaded():
    cfg = _cfg("model=llama_7b", "method=sparsegpt", "data=c4", "model.dtype=float16")
    on_device = _lines(plan_memory(cfg, LLAMA2_70B, "cuda"), "prune")[0].peak
    assert on_device > 80 * GiB  # "does not fit 80 GiB"
    cfg = _cfg(
        "model=llama_7b", "method=sparsegpt", "data=c4", "method.offload=true", "method.activations=disk"
    )
    st, lines = _lines(plan_memory(cfg, LLAMA2_70B, "cuda"), "prune")
    assert lines["one decoder block"] / GiB == pytest.approx(1.6, abs=0.05)
    assert lines["input statistics of one block"] / GiB == pytest.approx(3.8, abs=0.05)
    assert lines["solver working set"] / GiB == pytest.approx(3.9, abs=0.05)
    assert st.peak / GiB == pytest.approx(12, abs=0.6)  # "≈ 12 GiB"


def test_taylor_and_lora_lines_equal_the_hand_computed_7b_table():
    taylor = plan_memory(_cfg("model=llama_7b", "method=llm_pruner"), LLAMA_7B, "cuda")
    _, lines = _lines(taylor, "prune")
    assert lines["fp32 mean gradient of the prunable weights"] / GiB == pytest.approx(19.6, abs=0.05)
    assert lines["autograd gradients of one micro-batch"] / GiB == pytest.approx(9.8, abs=0.05)
    assert "fp32 Fisher diagonal" not in lines  # first order: no Fisher
    second = _lines(
        plan_memory(
            _cfg("model=llama_7b", "method=llm_pruner", "method.importance=element2"), LLAMA_7B, "cuda"
        ),
        "prune",
    )[1]
    assert second["fp32 Fisher diagonal"] / GiB == pytest.approx(19.6, abs=0.05)
    l1 = _lines(
        plan_memory(_cfg("model=llama_7b", "method=llm_pruner", "method.importance=l1"), LLAMA_7B, "cuda"),
        "prune",
    )[1]
    assert set(l1) == {"model weights"}  # no gradients for a magnitude score
    lora = plan_memory(
        _cfg(
            "model=llama_7b",
            "method=loraprune",
            "method.train.micro_batch_size=1",
            "method.train.cutoff_len=2048",
        ),
        LLAMA_7B,
        "cuda",
    )
    st, lines = _lines(lora, "prune")
    assert lines["LoRA r 8: weights + gradients + Adam moments, fp32"] / MiB == pytest.approx(305, abs=1)
    assert lines["activations saved for backward"] / GiB == pytest.approx(8.5, abs=0.1)  # "≈ 9 GiB"
    assert st.peak / GiB == pytest.approx(22, abs=0.6)  # "≈ 22 GiB"
    ckpt = plan_memory(
        _cfg(
            "model=llama_7b",
            "method=loraprune",
            "method.train.micro_batch_size=1",
            "method.train.cutoff_len=2048",
            "method.train.gradient_checkpointing=true",
        ),
        LLAMA_7B,
        "cuda",
    )
    _, lines = _lines(ckpt, "prune")
    assert lines["layer inputs kept for recomputation"] / GiB == pytest.approx(
        0.5 + 0.27, abs=0.02
    )  # "≈ 0.5 + ~0.3"


@pytest.mark.parametrize("n", [4, 64, 200])
def test_activation_store_choice_is_the_engines(n):
    """plan says memory/disk exactly where pick_store (the engine) will choose it."""
    cfg = _cfg(
        "method=wanda",
        "method.activation_budget_mb=1",
        f"method.calibration_samples={n}",
        "method.calibration_seq_len=128",
    )
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    )
    _, lines = _lines(plan_memory(cfg, config, "cpu"), "prune")
    engine = pick_store("auto", torch.zeros(n, 128, dtype=torch.long), 256, torch.float32, 1)
    assert any(
        k.startswith(f"calibration activations {'in memory' if engine == 'memory' else 'on disk'}")
        for k in lines
    )


def test_recovery_stage_follows_the_runners_choice():
    names = lambda stages: [s.name for s in stages]  # noqa: E731
    built = validate(_cfg("method=loraprune"), with_plan=False)[0]
    assert "LoRA recovery" not in names(plan_memory(_cfg("method=loraprune"), LLAMA_7B, "cpu", built))
    built = validate(_cfg("method=llm_pruner"), with_plan=False)[0]
    assert "LoRA recovery" in names(plan_memory(_cfg("method=llm_pruner"), LLAMA_7B, "cpu", built))
    assert "LoRA recovery" not in names(
        plan_memory(_cfg("method=llm_pruner", "recovery=none"), LLAMA_7B, "cpu", built)
    )
    # LoRAShear's own recovery replaces the recovery group's stage (and can be switched off)
    on = _cfg("method=lorashear", "recovery=none")
    assert "LoRA recovery" in names(plan_memory(on, LLAMA_7B, "cpu", validate(on, with_plan=False)[0]))
    off = _cfg("method=lorashear", "method.recovery.enabled=false")
    assert "LoRA recovery" not in names(plan_memory(off, LLAMA_7B, "cpu", validate(off, with_plan=False)[0]))


def test_a_run_that_cannot_fit_is_refused_before_loading_with_options(tmp_path):
    """A local folder holding only LLaMA-7B's config.json: no weights exist, so refusing it
    proves the check runs before anything loads."""
    folder = tmp_path / "llama7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_7B.to_dict()))
    base = [f"model.path={folder}", "model.dtype=float16", "method=wanda", "data=c4", "device=cpu"]
    with pytest.raises(ConfigError, match=r"does not fit") as e:
        validate(_cfg(*base, "memory_limit_gib=16"))
    msg = str(e.value)
    assert "prune (wanda) needs ≈" in msg and "has 16.00 GiB" in msg
    assert "method.offload=true" not in msg  # on CPU offloading to the CPU saves nothing
    assert "method.activations=disk" in msg
    # the same run within a larger limit passes the memory check (the plan is returned)
    assert validate(_cfg(*base, "memory_limit_gib=64"))[2] is not None
    with pytest.raises(ConfigError, match=r"memory_limit_gib='lots' \(str\) is not allowed"):
        validate(_cfg(*base, "memory_limit_gib=lots"), with_plan=False)


def test_check_memory_uses_the_limit_or_the_device():
    cfg = _cfg("memory_limit_gib=2")
    _, total, _ = check_memory(cfg, LLAMA_7B)
    assert total == 2 * GiB
    _, total, problems = check_memory(_cfg(), LLAMA_7B)
    assert total is None or total > 0
    assert all("needs ≈" in p for p in problems)


def test_a_device_map_splits_the_plan_per_device():
    """model.device_map: each device holds the weights accelerate's map puts there (disk none),
    the main device the working set and one materialized offloaded block; structured removal
    and saving materialize the rest of the model on the CPU. Refusals name the device."""
    placed = (
        "model.device_map={model.embed_tokens: cpu, model.layers: disk, model.norm: cpu, "
        "model.rotary_emb: cpu, lm_head: cpu}"
    )
    base = ["model=llama_7b", "model.dtype=float16", "recovery=none", placed]
    stages, total, problems = check_memory(_cfg(*base, "method=wanda"), LLAMA_7B)
    assert total is None and problems == []
    (prune,) = [s for s in stages if s.name.startswith("prune (")]
    assert prune.device == "cpu" and prune.capacity and prune.capacity > 0
    lines = dict(prune.lines)
    embed_head_norm = (2 * 32000 * 4096 + 4096) * 2
    assert (
        0 <= lines["model weights placed on cpu (model.device_map)"] - embed_head_norm < 1024
    )  # + RoPE buffer
    block = (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2  # 386 MiB, the table's block
    assert lines["one offloaded module materialized at a time (accelerate's hooks)"] == block
    assert prune.peak < 6 * GiB  # on one device the weights alone are 12.6 GiB
    structured, _, _ = check_memory(_cfg(*base, "method=llm_pruner", "method.importance=l2"), LLAMA_7B)
    (prune,) = [s for s in structured if s.name.startswith("prune (")]
    rest = dict(prune.lines)["structured removal and saving: the rest of the model materialized on the CPU"]
    assert abs(rest - (Shapes.from_config(LLAMA_7B).params * 2 - embed_head_norm)) < 1024
    _, _, problems = check_memory(_cfg(*base, "method=wanda", "memory_limit_gib=1"), LLAMA_7B)
    assert problems and all(" on cpu, which has 1.00 GiB" in p for p in problems)
    assert any("model.max_memory" in p for p in problems)
