"""Checkpoints of per-layer pruned models that other tools load (docs/checkpoints.md).

A structured-pruned model whose layers differ in shape (the first and last layers kept
whole, per-layer head and channel counts) has no plain transformers architecture: no native
config of transformers 5 takes per-layer head, KV-head and MLP sizes for the LLaMA layer.
Two on-disk layouts (``checkpoint_layout``):

``padded`` (default)
    Every layer is zero-padded to one shape — whole KV groups (q/k/v rows and o columns),
    MLP channels (gate/up rows and down columns), and, where the hidden size was pruned and
    no longer divides into the heads, hidden channels (with the RMSNorm weights and eps
    rescaled so the norms see the same mean). A zero group adds exactly nothing: its scores
    are 0, its values 0, its o/down columns 0. The result is a plain LLaMA / Mistral / Qwen2
    checkpoint (``AutoModelForCausalLM``, lm-eval, vLLM load it) with the pruned model's
    logits, but not its size: padded layers are as large as the largest one. The compact
    shapes are recorded (``prunelab_padded``) and ``load_pretrained`` slices the padding off.
``compact``
    The pruned shapes as they are (``prunelab_layer_shapes`` in config.json), with a
    self-contained ``modeling_prunelab.py`` next to the weights (``auto_map``):
    ``load_pretrained`` loads it, and so does transformers with ``trust_remote_code=True``
    (the user's explicit choice) and no prunelab installed.

Uniform-shape checkpoints (layer-pruned models, or a hidden size the heads still divide)
are plain checkpoints in both layouts.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from prunelab.errors import ConfigError, bad_value
from prunelab.structure.arch import LAYER_SHAPES_KEY, LayerShape

LAYOUTS = {
    "padded": "zero-padded to uniform shapes: a plain transformers checkpoint, exact logits, no size saving on disk",
    "compact": "per-layer shapes: prunelab.load_pretrained, or transformers with trust_remote_code=True",
}
PADDED_KEY = "prunelab_padded"
REMOTE_CODE = Path(__file__).with_name("remote_code") / "modeling_prunelab.py"
# the compact config's fields the padded one changes; restored on load
_RESTORED = (
    "hidden_size",
    "rms_norm_eps",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "architectures",
)


def check_layout(layout: object, key: str = "checkpoint_layout") -> str:
    if layout not in LAYOUTS:
        raise bad_value(key, layout, LAYOUTS)
    return str(layout)


_OLMO2_WHY = (
    "its q_norm/k_norm take one RMS over all heads of a layer, and zero-padded heads change that RMS by "
    "an eps a plain config cannot set per layer"
)
_FUSED_WHY = "padding its fused qkv_proj / gate_up_proj part by part is not implemented"
# model types whose compact checkpoints transformers loads with trust_remote_code=True
REMOTE_CODE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma2", "gemma3_text")


def _hidden_why(arch) -> str:
    return (
        "the padded config's head count must divide the hidden size, so padding pruned heads widens the "
        f"hidden size, which this family cannot do exactly: {arch.family.refuse['hidden']}"
    )


def _unpaddable(model_type: str, why: str, what: str = "attention heads") -> ConfigError:
    remote = (
        "transformers with trust_remote_code=True"
        if model_type in REMOTE_CODE_TYPES
        else "not plain transformers"
    )
    return ConfigError(
        f"checkpoint_layout='padded' cannot save model_type={model_type!r} with {what} pruned exactly: "
        f"{why}; allowed for this run: checkpoint_layout=compact (prunelab.load_pretrained loads it; "
        f"{remote})"
    )


def check_padding(arch, kinds, layout: str) -> None:
    """Refuse, before any model loads, a padded layout that would not give the same logits: a
    family with whole-projection head norms (OLMo-2) whose heads a method removes per layer, or
    fused projections (Phi-3) whose heads or channels it removes."""
    kinds = set(kinds)
    if layout != "padded":
        return
    if arch.family.proj_norms and "attn" in kinds:
        raise _unpaddable(arch.model_type, _OLMO2_WHY)
    if (arch.family.fused_qkv or arch.family.fused_gate_up) and kinds & {"attn", "mlp"}:
        raise _unpaddable(arch.model_type, _FUSED_WHY, "attention heads or MLP channels")


def per_layer(config) -> bool:
    """Whether the config needs more than a plain transformers config (per-layer shapes)."""
    return bool(getattr(config, LAYER_SHAPES_KEY, None))


def _causal_lm_class(config) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def padded_config(config):
    """The plain config every layer of ``config`` (per-layer shapes) is padded to."""
    shapes = [LayerShape(**s) for s in getattr(config, LAYER_SHAPES_KEY)]
    groups = {s.num_attention_heads // s.num_key_value_heads for s in shapes}
    if len(groups) != 1:  # pruning removes whole KV groups: the group size never changes
        raise ValueError(f"layers differ in query heads per KV head ({sorted(groups)}); cannot pad")
    g = groups.pop()
    kv = max(s.num_key_value_heads for s in shapes)
    from prunelab.structure.arch import arch_info

    arch = arch_info(config)
    # the runner refuses these before loading (check_padding); a model saved through the API too
    if arch.family.proj_norms and any(s.num_key_value_heads != kv for s in shapes):
        raise _unpaddable(arch.model_type, _OLMO2_WHY)
    if arch.family.fused_qkv or arch.family.fused_gate_up:
        raise _unpaddable(arch.model_type, _FUSED_WHY, "attention heads or MLP channels")
    heads = kv * g
    hidden = config.hidden_size
    padded_hidden = math.ceil(hidden / heads) * heads  # the config validator: heads divide hidden
    if padded_hidden != hidden and "hidden" in arch.family.refuse:
        # every layer lost heads (none kept whole: keep_first/last_layers=0), so the padded head
        # count does not divide hidden and the hidden size would be padded, which this family
        # cannot do exactly; known only now, after pruning (the plan does not say which layers)
        raise _unpaddable(arch.model_type, _hidden_why(arch))
    out = copy.deepcopy(config)
    delattr(out, LAYER_SHAPES_KEY)
    setattr(
        out,
        PADDED_KEY,
        {k: getattr(config, k) for k in _RESTORED} | {LAYER_SHAPES_KEY: [s.to_dict() for s in shapes]},
    )
    out.num_attention_heads = heads
    out.num_key_value_heads = kv
    out.intermediate_size = max(s.intermediate_size for s in shapes)
    out.hidden_size = padded_hidden
    # mean over padded_hidden entries instead of hidden: eps and the norm weights absorb it
    out.rms_norm_eps = config.rms_norm_eps * hidden / padded_hidden
    out.architectures = [_causal_lm_class(config).__name__]
    return out


def _meta_model(cls: type, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def _norm_names(model: nn.Module) -> set[str]:
    """Weights of the RMSNorms over the hidden size (the decoder's and the final one)."""
    return {
        f"{name}.weight"
        for name, mod in model.named_modules()
        if name.endswith(("input_layernorm", "post_attention_layernorm", "model.norm"))
        and hasattr(mod, "variance_epsilon")
    }


def _pad(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if t.shape == shape:
        return t
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t * scale`` rounded once (in float64), so padding and unpadding round-trip closely."""
    return (t.double() * scale).to(t.dtype)


@torch.no_grad()
def padded_model(model: nn.Module) -> nn.Module:
    """A plain model to save (its parameters on ``model``'s device; non-persistent buffers such
    as RoPE's ``inv_freq`` stay on the meta device, so it runs only once saved and loaded) with
    ``model``'s outputs: every tensor zero-padded at its end to the padded config's shape;
    shares unpadded tensors."""
    config = model.config
    pconf = padded_config(config)
    cls = _causal_lm_class(config)
    plain = _meta_model(cls, pconf)
    scale = (config.hidden_size / pconf.hidden_size) ** 0.5
    norms = _norm_names(plain)
    state = model.state_dict()
    new = {}
    for name, target in plain.state_dict().items():
        t = _pad(state[name].detach(), target.shape)
        new[name] = _scaled(t, scale) if name in norms and scale != 1.0 else t
    plain.load_state_dict(new, assign=True, strict=True)
    if getattr(pconf, "tie_word_embeddings", False):
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain


@torch.no_grad()
def unpad(model: nn.Module) -> nn.Module:
    """Slice a loaded padded checkpoint back to its compact shapes, in place (the inverse of
    ``padded_model``: padding sits at the end of every dimension)."""
    from prunelab.models.loading import pruned_class

    config = model.config
    saved = getattr(config, PADDED_KEY)
    compact = copy.deepcopy(config)
    delattr(compact, PADDED_KEY)
    for k in _RESTORED:
        setattr(compact, k, saved[k])
    if saved.get(LAYER_SHAPES_KEY):
        setattr(compact, LAYER_SHAPES_KEY, saved[LAYER_SHAPES_KEY])
    target = _meta_model(pruned_class(_causal_lm_class(config)), compact)
    shapes = {n: p.shape for n, p in target.named_parameters()}
    scale = (config.hidden_size / compact.hidden_size) ** 0.5
    norms = _norm_names(model)
    for name, p in list(model.named_parameters()):
        shape = shapes[name]
        t = p.data[tuple(slice(0, n) for n in shape)].clone()
        if name in norms and scale != 1.0:
            t = _scaled(t, scale)
        path, _, attr = name.rpartition(".")
        mod = model.get_submodule(path)
        setattr(mod, attr, nn.Parameter(t, requires_grad=p.requires_grad))
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.Embedding):
            mod.embedding_dim = mod.weight.shape[1]
    for mod in model.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = compact.rms_norm_eps
    for layer, s in zip(target.model.layers, model.model.layers, strict=True):
        s.mlp.intermediate_size = layer.mlp.intermediate_size
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    # the model's submodules share this config object: change it in place
    delattr(config, PADDED_KEY)
    for k in _RESTORED:
        setattr(config, k, saved[k])
    if saved.get(LAYER_SHAPES_KEY):
        setattr(config, LAYER_SHAPES_KEY, saved[LAYER_SHAPES_KEY])
    return model


def save(model: nn.Module, out: Path, layout: str) -> None:
    """``model.save_pretrained`` in ``layout`` (per-layer shapes only; see the module doc)."""
    check_layout(layout)
    if not per_layer(model.config):
        model.save_pretrained(out, safe_serialization=True)
        return
    if layout == "padded":
        padded_model(model).save_pretrained(out, safe_serialization=True)
        return
    model.save_pretrained(out, safe_serialization=True)
    if model.config.model_type in REMOTE_CODE_TYPES:  # else prunelab.load_pretrained only
        write_remote_code(out, model.config)


def write_remote_code(out: Path, config) -> None:
    """The compact layout's ``modeling_prunelab.py`` and ``auto_map`` entry."""
    shutil.copyfile(REMOTE_CODE, out / REMOTE_CODE.name)
    name = _causal_lm_class(config).__name__
    path = out / "config.json"
    data = json.loads(path.read_text())
    data["auto_map"] = {"AutoModelForCausalLM": f"modeling_prunelab.Pruned{name}"}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def export_adapter(adapter_dir: Path, base_dir: Path) -> bool:
    """Make a peft LoRA adapter (saved by ``PeftModel.save_pretrained`` from the compact
    in-memory model) apply to the checkpoint in ``base_dir``: records ``base_dir`` as its base
    model and, where that checkpoint is padded, pads lora_A with zero input columns and lora_B
    with zero output rows up to the padded base weight's shape (the padded entries' update is
    exactly zero). False when there is no adapter; True when it was padded."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    adapter_dir, file = Path(adapter_dir), Path(adapter_dir) / "adapter_model.safetensors"
    if not file.exists():
        return False
    cfg_file = adapter_dir / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["base_model_name_or_path"] = str(Path(base_dir).resolve())
    cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    config = AutoConfig.from_pretrained(base_dir)
    if not getattr(config, PADDED_KEY, None):
        return False
    shapes = {n: p.shape for n, p in _meta_model(_causal_lm_class(config), config).named_parameters()}
    state = load_file(str(file))
    out = {}
    for key, t in state.items():
        # base_model.model.<module>.lora_A.weight -> <module>.weight
        module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
        rows, cols = shapes[f"{module}.weight"]
        if rest == "A.weight":
            out[key] = _pad(t, torch.Size((t.shape[0], cols))).contiguous()
        elif rest == "B.weight":
            out[key] = _pad(t, torch.Size((rows, t.shape[1]))).contiguous()
        else:
            raise ValueError(f"adapter tensor {key!r} is not a LoRA A/B weight; cannot pad it")
    save_file(out, str(file), metadata={"format": "pt"})
    return True
