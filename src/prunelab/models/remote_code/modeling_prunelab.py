"""prunelab's compact pruned checkpoints for transformers' ``trust_remote_code=True``.

A structured-pruned LLaMA / Mistral / Qwen2 / Qwen3 / OLMo-2 / Gemma 2 / Gemma 3 model whose decoder layers differ in their
number of attention heads, KV heads and MLP channels. ``config.prunelab_layer_shapes`` lists
each layer's ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``; the
layers are the family's own, only their linear layers are built at those sizes. The math is
the family's unchanged. Self-contained (torch and transformers only): prunelab writes this
file next to the weights (``checkpoint_layout=compact``) and needs no import of itself to
load it.
"""

from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Olmo2ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)


def _linear(old: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)


def build_layer_shapes(model: nn.Module, config) -> None:
    """Rebuild each decoder layer's linears at its recorded size (before the weights load)."""
    shapes = getattr(config, "prunelab_layer_shapes", None) or []
    if not shapes:
        return
    if len(shapes) != len(model.model.layers):
        raise ValueError(
            f"prunelab_layer_shapes has {len(shapes)} entries for {len(model.model.layers)} layers"
        )
    h = config.hidden_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    for layer, s in zip(model.model.layers, shapes, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        q, kv, inter = s["num_attention_heads"] * d, s["num_key_value_heads"] * d, s["intermediate_size"]
        attn.q_proj = _linear(attn.q_proj, h, q)
        attn.k_proj = _linear(attn.k_proj, h, kv)
        attn.v_proj = _linear(attn.v_proj, h, kv)
        attn.o_proj = _linear(attn.o_proj, q, h)
        attn.num_key_value_groups = s["num_attention_heads"] // s["num_key_value_heads"]
        # OLMo-2's q_norm / k_norm span the whole projection (Qwen3's and Gemma 3's: head_dim)
        for name, n in (("q_norm", q), ("k_norm", kv)):
            norm = getattr(attn, name, None)
            if norm is not None and norm.weight.numel() != d:
                norm.weight = nn.Parameter(norm.weight.data.new_ones(n))
        mlp.gate_proj = _linear(mlp.gate_proj, h, inter)
        mlp.up_proj = _linear(mlp.up_proj, h, inter)
        mlp.down_proj = _linear(mlp.down_proj, inter, h)
        mlp.intermediate_size = inter


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        build_layer_shapes(self, config)


class PrunedMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        build_layer_shapes(self, config)


class PrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        build_layer_shapes(self, config)


class PrunedQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        build_layer_shapes(self, config)


class PrunedOlmo2ForCausalLM(Olmo2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        build_layer_shapes(self, config)


class PrunedGemma2ForCausalLM(Gemma2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        build_layer_shapes(self, config)


class PrunedGemma3ForCausalLM(Gemma3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        build_layer_shapes(self, config)
