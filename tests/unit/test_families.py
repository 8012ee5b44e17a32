"""The layer-wise engine on families prunelab has no structure for (issue 21, part 1).

The engine finds the decoder blocks, their linears and which linears share an input from
the model itself; each block gets the attention mask and position inputs of its own layer
type. Checked against a plain forward of the model (propagation), an independent Wanda
computation from hooked inputs (masks) and a count of the module tree (plans).
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from prunelab.errors import ConfigError
from prunelab.methods import PruneContext, build_method
from prunelab.runner import make_plan, plan_arch
from prunelab.sparsity.blocks import block_linears, decoder_layers, linear_arch, meta_model, resolve_modules
from prunelab.sparsity.engine import SharedInputs, propagate, run_block
from tests.conftest import make_model

V, H, MLP, L = 128, 64, 96, 3  # vocab, hidden, MLP width, layers
TOKENS = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(3))


def make_family(name: str) -> nn.Module:
    """A tiny random causal LM of ``name`` (fp32, eval mode); sliding windows of 4 tokens,
    shorter than the 12-token test windows, on some layers of the mixed families."""
    import transformers as tf

    common = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=MLP,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    mixed = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    if name == "qwen2-sliding":
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)
        model = tf.Qwen2ForCausalLM(cfg)
    elif name == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=24))
    elif name == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=24, sliding_window=4, layer_types=mixed)
        model = tf.Gemma2ForCausalLM(cfg)
    elif name == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=24, sliding_window=4, layer_types=mixed)
        model = tf.Gemma3ForCausalLM(cfg)
    elif name == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common))
    elif name == "olmo2":
        model = tf.Olmo2ForCausalLM(tf.Olmo2Config(**common))
    elif name == "gpt_neox":  # other linear names (query_key_value, dense, dense_h_to_4h, …), no GQA
        c = {k: v for k, v in common.items() if k != "num_key_value_heads"}
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**c))
    else:
        raise ValueError(name)
    return model.eval()


MIXED = ["qwen2-sliding", "gemma2", "gemma3"]
NEW = ["qwen3", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox", "qwen2-sliding"]


def _last_block_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    _, blocks = decoder_layers(model)
    seen = []
    h = blocks[-1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("name", MIXED)
def test_propagation_matches_a_full_forward_on_mixed_layer_types(name):
    model = make_family(name)
    assert len(set(model.config.layer_types)) == 2  # the test means something only with both types
    ref = _last_block_output(model, TOKENS)
    out = torch.cat(propagate(model, TOKENS, torch.device("cpu"), batch_size=2))
    assert (out - ref).abs().max().item() < 1e-5


def test_block0_arguments_are_wrong_for_sliding_layers():
    """Why each block needs its own arguments: reusing block 0's (a sliding layer) for a full
    layer changes its output on windows longer than the slide."""
    from prunelab.sparsity.engine import capture_inputs

    model = make_family("gemma2")
    captured = capture_inputs(model, TOKENS, torch.device("cpu"), batch_size=4)
    x = next(iter(captured.store))
    block = decoder_layers(model)[1][1]  # a full-attention layer
    outs = []
    for kw in (captured.kwargs(1), captured.kwargs(0)):
        from prunelab.sparsity.engine import ActivationStore

        store = ActivationStore("memory", torch.device("cpu"))
        store.append(x)
        o = ActivationStore("memory", torch.device("cpu"))
        run_block(block, store, kw, o)
        outs.append(next(iter(o)))
    assert (outs[0] - outs[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "llama",
            [
                {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
                {"self_attn.o_proj"},
                {"mlp.gate_proj", "mlp.up_proj"},
                {"mlp.down_proj"},
            ],
        ),
        ("phi3", [{"self_attn.qkv_proj"}, {"self_attn.o_proj"}, {"mlp.gate_up_proj"}, {"mlp.down_proj"}]),
    ],
)
def test_shared_inputs_are_read_from_the_forward(name, expected):
    model = make_model("llama", 2) if name == "llama" else make_family(name)
    block = decoder_layers(model)[1][0]
    linears = block_linears(block)
    # the block's own inputs, by a plain forward, and Σx² of each linear's input by hand
    seen: dict[str, torch.Tensor] = {}

    def keep(path):
        def fn(m, a, o):
            seen.setdefault(path, a[0])

        return fn

    hooks = [m.register_forward_hook(keep(p)) for p, m in linears.items()]
    x_in = []
    hooks.append(block.register_forward_pre_hook(lambda m, a, kw: x_in.append((a, kw)), with_kwargs=True))
    with torch.no_grad():
        model(input_ids=TOKENS, use_cache=False)
    for h in hooks:
        h.remove()
    shared = SharedInputs(linears, list(linears), gram=False, device=torch.device("cpu"))
    with shared.hooked(block), torch.no_grad():
        args, kw = x_in[0]
        block(*args, **kw)
    groups: dict[int, set[str]] = {}
    for p, s in shared.site.items():
        groups.setdefault(s, set()).add(p)
    assert sorted(groups.values(), key=sorted) == sorted(expected, key=sorted)
    for p in linears:
        x = seen[p].reshape(-1, seen[p].shape[-1]).double()
        torch.testing.assert_close(shared.stats_of(p).col_sq.double(), (x * x).sum(0), rtol=1e-5, atol=1e-6)


def _wanda_reference(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block 0's Wanda masks computed plainly: |W_ij|·‖X_j‖ from the dense forward's inputs
    to each linear, the lower half of each row dropped (Sun et al. 2023, eq. 1)."""
    prefix, blocks = decoder_layers(model)
    linears = block_linears(blocks[0])
    norms: dict[str, torch.Tensor] = {}

    def hook(path):
        def fn(m, a, o):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            norms[path] = norms.get(path, 0) + (x * x).sum(0)

        return fn

    hooks = [m.register_forward_hook(hook(p)) for p, m in linears.items()]
    with torch.no_grad():
        for b in ids.split(2):
            model(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for p, m in linears.items():
        score = m.weight.detach().double().abs() * norms[p].sqrt()
        k = m.weight.shape[1] // 2
        drop = torch.sort(score, dim=1, stable=True).indices[:, :k]
        keep = torch.ones_like(m.weight, dtype=torch.bool)
        keep.scatter_(1, drop, False)
        out[f"{prefix}.0.{p}.weight"] = keep
    return out


@pytest.mark.parametrize("name", NEW)
def test_wanda_on_a_family_without_prunelab_structure(name, tmp_path):
    model = make_family(name)
    method = build_method(OmegaConf.create({"_target_": "prunelab.methods.layerwise.Wanda"}))
    plan = make_plan(method, plan_arch(method, model.config), 0.5)
    # the plan, from a meta-device model, counts every block linear and every parameter once
    linears = [m for b in decoder_layers(model)[1] for m in block_linears(b).values()]
    assert plan.params_targeted == sum(m.weight.numel() for m in linears)
    assert plan.params_before == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    ref = _wanda_reference(model, TOKENS)
    masks = method.prune(
        model, plan, PruneContext(None, TOKENS, 0, device=torch.device("cpu"), out_dir=tmp_path)
    )
    assert len(masks) == len(linears)  # the default modules: every linear of a family with other names
    params = dict(model.named_parameters())
    for key, keep in masks.items():
        assert bool((keep.sum(1) == keep.shape[1] // 2).all())  # half of every row
        assert bool((params[key][~keep] == 0).all())
    for key, keep in ref.items():  # block 0 sees the dense model's inputs: exactly the reference
        assert torch.equal(masks[key], keep), key
    assert torch.isfinite(model(input_ids=TOKENS).logits).all()


def test_meta_plan_equals_the_real_model_count():
    model = make_family("gemma3")
    arch = linear_arch(model)
    assert linear_arch(meta_model(model.config)) == arch
    assert arch.num_layers == L and arch.linear_shapes(0)["self_attn.q_proj"] == (4 * 24, H)


def test_structured_methods_refuse_an_unknown_family_by_name():
    config = make_family("gpt_neox").config
    method = build_method(OmegaConf.create({"_target_": "prunelab.methods.llm_pruner.LLMPruner"}))
    with pytest.raises(ConfigError, match=r"model_type='gpt_neox'.*layer-wise"):
        plan_arch(method, config)


def test_module_names_resolve_against_the_block():
    phi = list(block_linears(decoder_layers(make_family("phi3"))[1][0]))
    assert resolve_modules(["all"], phi) == phi
    assert resolve_modules(["q_proj", "k_proj", "v_proj", "down_proj"], phi) == [
        "self_attn.qkv_proj",
        "mlp.down_proj",
    ]
    with pytest.raises(ConfigError, match=r"part of the fused qkv_proj.*k_proj, v_proj missing"):
        resolve_modules(["q_proj"], phi)
    with pytest.raises(ConfigError, match=r"'w1' is not a linear layer.*allowed: all"):
        resolve_modules(["w1"], phi)
    neox = list(block_linears(decoder_layers(make_family("gpt_neox"))[1][0]))
    assert resolve_modules(["dense"], neox) == ["attention.dense"]


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory):
    """A tiny random Gemma 3 saved like a hub checkpoint, with the embedded tokenizer."""
    from transformers import AutoTokenizer

    from prunelab.models.embedded import asset_dir

    tok = AutoTokenizer.from_pretrained(asset_dir("tiny_llama"))
    model = make_family("gemma3")
    model.resize_token_embeddings(len(tok))
    out = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(folder, tmp_path, *extra):
    from hydra import compose, initialize_config_dir

    import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
    from prunelab.paths import conf_dir

    overrides = [
        f"model.path={folder}",
        "model.name=gemma3_tiny",
        "eval=quick",
        "eval.zeroshot.tasks=[]",
        "eval.cost.enabled=false",
        "logger=none",
        f"output_root={tmp_path}",
        "recovery=none",
        # within the tiny models' 64 positions (longer windows are refused before loading)
        "eval.perplexity.seq_len=64",
        "data.calibration.seq_len=64",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_runner_prunes_an_unknown_family_with_a_layerwise_method(gemma3_folder, tmp_path):
    from prunelab.runner import run

    cfg = _cfg(gemma3_folder, tmp_path, "method=wanda", "ratio=0.5", "method.calibration_samples=4")
    r = run(cfg, tmp_path / "run")
    assert r["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert math.isfinite(r["pruned"]["perplexity"]["embedded"])


def test_runner_refuses_channel_mode_on_it_before_loading(gemma3_folder, tmp_path, monkeypatch):
    """Gemma 3 has prunelab structure now (issue 21.2), but not hidden channels: refused before
    the model loads, with the reason."""
    import prunelab.models.loading as loading
    from prunelab.runner import validate

    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"hidden channels.*gemma3_text.*sqrt\(config.hidden_size\)"):
        validate(_cfg(gemma3_folder, tmp_path, "method=llm_pruner", "method.mode=channel"))


@pytest.mark.slow
def test_runner_prunes_it_with_a_structured_method(gemma3_folder, tmp_path):
    """The whole CLI path for a structured method on Gemma 3: planned, pruned physically,
    saved, reloaded and evaluated, the requested ratio met."""
    from prunelab.runner import run

    cfg = _cfg(
        gemma3_folder,
        tmp_path,
        "method=structured",
        "ratio=0.2",
        "method.keep_first_layers=0",
        "method.keep_last_layers=0",
    )
    r = run(cfg, tmp_path / "run")
    assert math.isfinite(r["pruned"]["perplexity"]["embedded"])
    assert abs(r["ratio"]["achieved"] - 0.2) <= 0.01 * 0.2
