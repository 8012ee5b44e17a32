"""Pruned checkpoints outside prunelab (docs/checkpoints.md).

Every structured method × family: the saved checkpoint loads with plain
``AutoModelForCausalLM.from_pretrained`` in a fresh interpreter that never imports prunelab
(``checkpoint_layout=padded``, and ``compact`` with ``trust_remote_code=True``), and gives the
in-memory pruned model's logits (≤ 1e-5) and greedy generation through the KV cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunelab.models.export import PADDED_KEY, export_adapter
from prunelab.models.loading import load_pretrained, save_model
from prunelab.structure import prune_physically
from prunelab.structure.arch import LAYER_SHAPES_KEY, arch_info
from tests.conftest import FAMILIES
from tests.unit.test_methods import METHODS, _pruned

ROWS = {m[0]: m for m in METHODS}
FAST = [
    "structured-random",  # the random structured baseline
    "llm_pruner-element1",  # block mode: heads + channels, per-layer ranking
    "llm_pruner-global",  # global ranking: per-layer head counts differ
    "llm_pruner-channel",  # hidden channels
    "llm_pruner-layers",  # whole layers
]
TRAINED = ["loraprune-lora_grad", "lorashear", "atp"]
X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
NEW_TOKENS = 6

# A fresh interpreter: transformers alone, as a user elsewhere has it.
CHILD = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

cases = json.load(open(sys.argv[1]))
x = load_file(sys.argv[2])["x"]
out = {}
for name, (path, remote) in cases.items():
    kw = {"trust_remote_code": True} if remote else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        out[name + "/logits"] = model(input_ids=x).logits
        out[name + "/generated"] = model.generate(x, max_new_tokens=int(sys.argv[4]), do_sample=False, pad_token_id=0)
    out[name + "/class"] = torch.tensor([ord(c) for c in type(model).__name__])
assert not any(m.startswith("prunelab") for m in sys.modules), "the child imported prunelab"
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
"""


def _plain_load(cases: dict[str, tuple[str, bool]], tmp: Path) -> dict[str, torch.Tensor]:
    """Load each checkpoint in a subprocess without prunelab on the path."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    save_file({"x": X}, str(tmp / "x.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp / "hf_modules")  # remote code is copied there
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp / "cases.json"),
            str(tmp / "x.safetensors"),
            str(tmp / "out.st"),
            str(NEW_TOKENS),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(tmp / "out.st"))


def _expected(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "logits": model(input_ids=X).logits,
            "generated": model.generate(X, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0),
        }


def _check_matrix(
    names: list[str], tmp: Path, compact: tuple[str, ...] = (), families=FAMILIES, padded: bool = True
) -> dict:
    expected, cases, shapes = {}, {}, {}
    for name in names:
        _, cfg, ratio, tol = ROWS[name]
        for fam in families:
            family, kv = fam.values[0]
            case = f"{name}/{fam.id}"
            model, _, masks = _pruned(cfg, ratio, tol, family=(family, kv), out_dir=tmp / "train" / case)
            arch = prune_physically(model, masks)
            shapes[case] = arch
            expected[case] = _expected(model.eval())
            layouts = (["padded"] if padded else []) + (["compact"] if name in compact else [])
            for layout in layouts:
                d = tmp / layout / case
                save_model(model, None, d, layout=layout)
                cases[f"{case}/{layout}"] = (str(d), (d / "modeling_prunelab.py").exists())
                # prunelab itself reads both layouts back to the compact model
                back = load_pretrained(d).eval()
                assert arch_info(back.config) == arch, case
                assert (back(input_ids=X).logits - expected[case]["logits"]).abs().max() <= 1e-6
    got = _plain_load(cases, tmp)
    for key in cases:
        case = key.rsplit("/", 1)[0]
        diff = (got[key + "/logits"] - expected[case]["logits"]).abs().max().item()
        assert diff <= 1e-5, f"{key}: logits differ by {diff}"
        assert torch.equal(got[key + "/generated"], expected[case]["generated"]), key
        cls = "".join(map(chr, got[key + "/class"].tolist()))
        assert cls.removeprefix("Pruned").split("For")[0].lower() in key, (key, cls)
    return shapes


@pytest.mark.slow
def test_structured_checkpoints_load_with_plain_transformers(tmp_path):
    shapes = _check_matrix(FAST, tmp_path, compact=("llm_pruner-global", "llm_pruner-channel"))
    # the table covers what it claims: per-layer shapes, per-layer KV-head counts, hidden pruning,
    # dropped layers, and uniform checkpoints that are plain without any padding
    assert any(len({s.num_key_value_heads for s in a.layers[1:-1]}) > 1 for a in shapes.values())
    assert any(not a.uniform() for a in shapes.values())
    assert any(a.hidden_size < 64 for a in shapes.values())
    assert any(a.num_layers < 6 for a in shapes.values())
    cfg = json.loads((tmp_path / "padded/llm_pruner-element1/llama-gqa/config.json").read_text())
    assert PADDED_KEY in cfg and LAYER_SHAPES_KEY not in cfg and "auto_map" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    layers = cfg[PADDED_KEY][LAYER_SHAPES_KEY]
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"]) == (
        max(s["num_key_value_heads"] for s in layers),
        max(s["intermediate_size"] for s in layers),
    )
    # a layer-pruned model (uniform shapes) is a plain checkpoint: nothing padded, nothing recorded
    cfg = json.loads((tmp_path / "padded/llm_pruner-layers/qwen2-gqa-bias/config.json").read_text())
    assert PADDED_KEY not in cfg and LAYER_SHAPES_KEY not in cfg and cfg["num_hidden_layers"] < 6


@pytest.mark.slow
def test_trained_structured_methods_load_with_plain_transformers(tmp_path):
    _check_matrix(TRAINED, tmp_path, compact=("atp",))


@pytest.mark.slow
def test_newer_families_in_a_fresh_interpreter(tmp_path):
    """Qwen3, Gemma 2 and Gemma 3 in both layouts, OLMo-2 compact (padded is refused), loaded
    without prunelab: logits and greedy generation through the KV cache."""
    fams = [pytest.param((f, 2), id=f) for f in ("qwen3", "gemma2", "gemma3")]
    _check_matrix(["llm_pruner-global"], tmp_path / "a", compact=("llm_pruner-global",), families=fams)
    olmo = [pytest.param(("olmo2", 2), id="olmo2")]
    _check_matrix(
        ["llm_pruner-global"], tmp_path / "b", compact=("llm_pruner-global",), families=olmo, padded=False
    )


def test_padding_adds_nothing_but_zeros(tmp_path):
    """The padded checkpoint holds the compact tensors at their start and zeros elsewhere."""
    _, cfg, ratio, tol = ROWS["llm_pruner-global"]
    model, _, masks = _pruned(cfg, ratio, tol, family=("qwen2", 2))
    prune_physically(model, masks)
    save_model(model, None, tmp_path)
    padded = load_file(str(tmp_path / "model.safetensors"))
    n_padded = 0
    for name, t in model.state_dict().items():
        if name not in padded:
            continue  # the tied lm_head
        p = padded[name]
        corner = tuple(slice(0, n) for n in t.shape)
        assert torch.equal(p[corner], t), name
        rest = p.clone()
        rest[corner] = 0
        assert not rest.any(), name
        n_padded += p.numel() - t.numel()
    assert n_padded > 0


@pytest.mark.parametrize("layout", ["padded", "compact"])
def test_hidden_pruned_checkpoint_keeps_its_logits(layout, tmp_path):
    """Hidden channels pruned (LLM-Pruner ``mode=channel``, LLaMA with biases): the padded
    checkpoint pads the hidden size too and rescales the RMSNorms; plain transformers in this
    process and ``load_pretrained`` both give the pruned model's logits, and the loaded model
    takes a LoRA adapter. (A fresh interpreter without prunelab, every family: the slow tables
    above.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, cfg, ratio, tol = ROWS["llm_pruner-channel"]
    model, _, masks = _pruned(cfg, ratio, tol, family=("llama_bias", 2))
    arch = prune_physically(model, masks)
    # an eps as large as the mean square: a wrongly rescaled eps moves the logits visibly
    model.config.rms_norm_eps = 0.5
    for mod in model.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 0.5
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=X).logits
    save_model(model, None, tmp_path, layout=layout)
    saved = json.loads((tmp_path / "config.json").read_text())
    if layout == "padded":
        # the heads no longer divide the pruned hidden size: padded up to the next multiple
        heads = saved["num_attention_heads"]
        assert arch.hidden_size % heads != 0
        assert saved["hidden_size"] == -(-arch.hidden_size // heads) * heads
        assert saved[PADDED_KEY]["hidden_size"] == arch.hidden_size
    else:
        assert saved["hidden_size"] == arch.hidden_size and "auto_map" in saved
    kw = {"trust_remote_code": True} if layout == "compact" else {}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, **kw).eval()
    back = load_pretrained(tmp_path).eval()
    assert arch_info(back.config) == arch
    with torch.no_grad():
        assert (plain(input_ids=X).logits - expected).abs().max() <= 1e-5
        assert (back(input_ids=X).logits - expected).abs().max() <= 1e-6
        # the loaded compact model takes a LoRA adapter (recovery after a resume): peft sizes
        # lora_A/B from each Linear's in/out features; lora_B starts at zero, so the same logits
        lora = get_peft_model(back, LoraConfig(r=2, target_modules=["q_proj", "o_proj", "down_proj"]))
        assert (lora(input_ids=X).logits - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma2", "gemma3"])
def test_newer_families_load_with_plain_transformers(family, tmp_path):
    """Qwen3 / Gemma 3 (q/k norms over head_dim), Gemma 2 (soft-capping), OLMo-2 (q/k norms over
    the whole projection), in this process: padded loads plain, compact with remote code, both
    give the pruned model's logits; OLMo-2 with per-layer head counts cannot be padded exactly
    and is refused before anything is written."""
    from transformers import AutoModelForCausalLM

    from prunelab.errors import ConfigError

    _, cfg, ratio, tol = ROWS["llm_pruner-global"]
    model, _, masks = _pruned(cfg, ratio, tol, family=(family, 2))
    arch = prune_physically(model, masks)
    assert len({s.num_key_value_heads for s in arch.layers}) > 1  # per-layer head counts
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=X).logits
    for layout in ("padded", "compact"):
        d = tmp_path / layout
        if layout == "padded" and family == "olmo2":
            with pytest.raises(
                ConfigError, match=r"checkpoint_layout='padded' cannot save model_type='olmo2'"
            ):
                save_model(model, None, d, layout=layout)
            assert not (d / "model.safetensors").exists()
            continue
        save_model(model, None, d, layout=layout)
        kw = {"trust_remote_code": True} if layout == "compact" else {}
        plain = AutoModelForCausalLM.from_pretrained(d, **kw).eval()
        back = load_pretrained(d).eval()
        assert arch_info(back.config) == arch
        with torch.no_grad():
            assert (plain(input_ids=X).logits - expected).abs().max() <= 1e-5, layout
            assert (back(input_ids=X).logits - expected).abs().max() <= 1e-6, layout


def test_padding_refused_before_loading_where_inexact():
    """The runner's check (validate, before any weights load): OLMo-2 + pruned heads + padded."""
    from prunelab.errors import ConfigError
    from prunelab.models.export import check_padding
    from tests.conftest import make_model

    olmo = arch_info(make_model("olmo2", 2).config)
    with pytest.raises(ConfigError, match=r"allowed for this run: checkpoint_layout=compact"):
        check_padding(olmo, ("attn", "mlp"), "padded")
    check_padding(olmo, ("attn", "mlp"), "compact")
    check_padding(olmo, ("mlp",), "padded")  # MLP channels only: every layer keeps its heads
    check_padding(arch_info(make_model("qwen3", 2).config), ("attn", "mlp"), "padded")
    phi3 = arch_info(make_model("phi3", 2).config)
    for kinds in (("attn",), ("mlp",)):
        with pytest.raises(ConfigError, match=r"model_type='phi3' .*fused qkv_proj / gate_up_proj"):
            check_padding(phi3, kinds, "padded")
    check_padding(phi3, ("layer",), "padded")  # whole layers: uniform shapes, a plain checkpoint


def test_phi3_compact_only(tmp_path):
    """Phi-3's fused projections: padded refused (nothing written), compact loads with prunelab
    (no remote code for it, so no auto_map that would point at a missing class)."""
    from prunelab.errors import ConfigError

    _, cfg, ratio, tol = ROWS["llm_pruner-global"]
    model, _, masks = _pruned(cfg, ratio, tol, family=("phi3", 2))
    arch = prune_physically(model, masks)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=X).logits
    with pytest.raises(ConfigError, match=r"checkpoint_layout='padded' cannot save model_type='phi3'"):
        save_model(model, None, tmp_path / "padded")
    assert not (tmp_path / "padded/model.safetensors").exists()
    save_model(model, None, tmp_path / "compact", layout="compact")
    assert "auto_map" not in json.loads((tmp_path / "compact/config.json").read_text())
    back = load_pretrained(tmp_path / "compact").eval()
    assert arch_info(back.config) == arch
    with torch.no_grad():
        assert (back(input_ids=X).logits - expected).abs().max() <= 1e-6


def test_bad_layout_is_refused(tmp_path):
    from prunelab.errors import ConfigError

    _, cfg, ratio, tol = ROWS["structured-random"]
    model, _, masks = _pruned(cfg, ratio, tol)
    prune_physically(model, masks)
    with pytest.raises(ConfigError, match=r"checkpoint_layout='packed' is not allowed.*padded, compact"):
        save_model(model, None, tmp_path, layout="packed")
    assert not (tmp_path / "model.safetensors").exists()


# ------------------------------------------------------------------ peft adapters (issue 20.5)
@pytest.mark.parametrize("layout", ["padded", "compact"])
@pytest.mark.parametrize("fam", [FAMILIES[1], FAMILIES[4]])
def test_recovery_adapter_loads_with_peft_onto_the_saved_base(layout, fam, tmp_path):
    """Both layouts load with plain transformers in this process (a fresh interpreter without
    prunelab: the slow tables above), and an adapter trained on the compact in-memory model,
    exported next to the saved pruned checkpoint, loads with ``PeftModel.from_pretrained`` onto
    it and gives the adapted logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    _, cfg, ratio, tol = ROWS["llm_pruner-global"]
    model, _, masks = _pruned(cfg, ratio, tol, family=fam)
    prune_physically(model, masks)
    save_model(model, None, tmp_path / "pruned", layout=layout)
    base_logits = model(input_ids=X).logits
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    adapted = peft_model(input_ids=X).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter matters
    peft_model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    assert export_adapter(tmp_path / "adapter", tmp_path / "pruned") == (layout == "padded")

    kw = {"trust_remote_code": True} if layout == "compact" else {}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", **kw).eval()
    assert (base(input_ids=X).logits - base_logits).abs().max() <= 1e-5
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (loaded(input_ids=X).logits - adapted).abs().max() <= 1e-5
    meta = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str((tmp_path / "pruned").resolve())
