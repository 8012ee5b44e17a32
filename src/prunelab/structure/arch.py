"""Architecture facts read from a model config alone (no weights), so ratio plans and
config errors happen before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prunelab.errors import ConfigError

LAYER_SHAPES_KEY = "prunelab_layer_shapes"

_QK_NORM_EPS = (
    "its q_norm/k_norm read the same config.rms_norm_eps as the residual-stream norms, and the exact "
    "narrowing rescales that eps (sqrt(S/H' + eps·H/H')), which would change the head norms on reload"
)


@dataclass(frozen=True)
class Family:
    """One family's decoder layer, declaratively: the only place that knows its layout.

    Everything else (units, members, masks, physical removal, per-layer shapes on load,
    parameter accounting) is derived from this description. Adding a family = one entry in
    ``FAMILIES`` (docs/models.md, "How to add a model family")."""

    # hidden-sized norms of each decoder layer (attribute names); each holds one entry per
    # hidden channel
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # norms over head_dim applied to every head alike (Qwen3, Gemma 3): shared by all heads, so
    # removing heads keeps them whole
    head_norms: tuple[str, ...] = ()
    # norms over the whole q / k projection (OLMo-2): each head owns a slice of them
    proj_norms: tuple[str, ...] = ()
    # q/k/v (not o) biases always present whatever config.attention_bias says (Qwen2); else
    # config.attention_bias gives q/k/v and o biases
    qkv_bias_always: bool = False
    # one linear holding the q, k and v rows in that order (Phi-3: self_attn.qkv_proj)
    fused_qkv: str | None = None
    # one linear holding the gate rows then the up rows (Phi-3: mlp.gate_up_proj)
    fused_gate_up: str | None = None
    # the attention reads its query-head count from the shared config, not from its own sizes
    # (Phi-3 splits qkv at config.num_attention_heads·head_dim): each layer pruned to another
    # count gets a config of its own
    config_heads: bool = False
    # structure kinds this family cannot prune exactly, and why (named in the error)
    refuse: dict[str, str] = field(default_factory=dict)

    def linear_paths(self) -> dict[str, str]:
        """Role (q, k, v, o, gate, up, down) -> module path relative to the decoder layer."""
        qkv, gu = self.fused_qkv, self.fused_gate_up
        return {
            "q": qkv or "self_attn.q_proj",
            "k": qkv or "self_attn.k_proj",
            "v": qkv or "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": gu or "mlp.gate_proj",
            "up": gu or "mlp.up_proj",
            "down": "mlp.down_proj",
        }


# model_type -> layout. Vicuna checkpoints are model_type "llama"; Gemma 3's text model
# (Gemma3ForCausalLM) is "gemma3_text" (the multimodal "gemma3" nests it under a vision tower).
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias_always=True),
    "qwen3": Family(head_norms=("q_norm", "k_norm"), refuse={"hidden": _QK_NORM_EPS}),
    "olmo2": Family(
        norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        proj_norms=("q_norm", "k_norm"),
        refuse={
            "hidden": _QK_NORM_EPS,
        },
    ),
    "gemma2": Family(
        norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        refuse={
            "hidden": "its embeddings are scaled by sqrt(config.hidden_size) (computed from the config on "
            "load) and tied to lm_head, and its norms are (1 + w)·x/rms: narrowing the hidden size changes "
            "the scale in a way a tied checkpoint cannot absorb"
        },
    ),
}
FAMILIES["phi3"] = Family(
    fused_qkv="self_attn.qkv_proj",
    fused_gate_up="mlp.gate_up_proj",
    config_heads=True,
)
FAMILIES["gemma3_text"] = Family(
    norms=FAMILIES["gemma2"].norms,
    head_norms=("q_norm", "k_norm"),
    refuse=FAMILIES["gemma2"].refuse,
)
# Families the structured methods know (the layer-wise ones need only the linears)
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class LayerShape:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    hidden_size: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (Qwen2: q/k/v only; LLaMA attention_bias: q/k/v/o)
    o_bias: bool
    mlp_bias: bool
    layers: tuple[LayerShape, ...]

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def group_size(self, layer: int) -> int:
        """Query heads per KV head: one attention group = one KV head and its query heads."""
        s = self.layers[layer]
        return s.num_attention_heads // s.num_key_value_heads

    def attn_group_params(self, layer: int) -> int:
        """Parameters removed with one KV group (its query heads, k/v rows, o columns)."""
        g, d, h = self.group_size(layer), self.head_dim, self.hidden_size
        q = g * d * h + (g * d if self.attention_bias else 0)
        kv = 2 * (d * h + (d if self.attention_bias else 0))
        o = g * d * h
        norms = (g * d + d) if self.family.proj_norms else 0  # OLMo-2: the group's q_norm/k_norm slices
        return q + kv + o + norms

    def mlp_channel_params(self) -> int:
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def qk_channel_params(self, layer: int) -> int:
        """Parameters of one head-dimension channel of q/k shared by every head of a layer (ATP's
        search space): its q row in every query head and its k row in every KV head."""
        s = self.layers[layer]
        rows = s.num_attention_heads + s.num_key_value_heads
        return rows * self.hidden_size + (rows if self.attention_bias else 0)

    def vo_channel_params(self, layer: int) -> int:
        """Parameters of one head-dimension channel of v/o shared by every head of a layer: its v
        row in every KV head and its o column in every query head (o's bias is not per channel)."""
        s = self.layers[layer]
        v = s.num_key_value_heads * (self.hidden_size + (1 if self.attention_bias else 0))
        return v + s.num_attention_heads * self.hidden_size

    def hidden_channel_params(self) -> int:
        """Parameters removed with one hidden (residual-stream) channel: its embedding and
        lm_head columns, every RMSNorm entry, q/k/v/gate/up input columns, o/down output rows."""
        embed = self.vocab_size * (1 if self.tie_word_embeddings else 2)
        norms = len(self.family.norms) * self.num_layers + 1
        per_layer = 0
        for s in self.layers:
            q, kv = s.num_attention_heads * self.head_dim, s.num_key_value_heads * self.head_dim
            per_layer += q + 2 * kv + q + (1 if self.o_bias else 0) + 3 * s.intermediate_size
            per_layer += 1 if self.mlp_bias else 0
        return embed + norms + per_layer

    def layer_params(self, layer: int) -> int:
        s = self.layers[layer]
        h, d, fam = self.hidden_size, self.head_dim, self.family
        attn = s.num_key_value_heads * self.attn_group_params(layer) + (h if self.o_bias else 0)
        attn += len(fam.head_norms) * d  # shared by every head, never removed with one
        mlp = s.intermediate_size * self.mlp_channel_params() + (h if self.mlp_bias else 0)
        return attn + mlp + len(fam.norms) * h

    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + sum(self.layer_params(i) for i in range(self.num_layers))

    def norm_params(self, layer: int) -> int:
        """Parameters of a decoder layer's norms (hidden-sized, per-head and per-projection)."""
        s, d, fam = self.layers[layer], self.head_dim, self.family
        proj = (s.num_attention_heads + s.num_key_value_heads) * d if fam.proj_norms else 0
        return len(fam.norms) * self.hidden_size + len(fam.head_norms) * d + proj

    def module_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear of a decoder layer by path relative to the
        layer (``self_attn.q_proj``; Phi-3: ``self_attn.qkv_proj``, ``mlp.gate_up_proj``)."""
        s, d, h = self.layers[layer], self.head_dim, self.hidden_size
        q, kv, i = s.num_attention_heads * d, s.num_key_value_heads * d, s.intermediate_size
        rows = {"q": q, "k": kv, "v": kv, "gate": i, "up": i}
        out: dict[str, tuple[int, int]] = {}
        for role, path in self.family.linear_paths().items():
            if role == "o":
                out[path] = (h, q)
            elif role == "down":
                out[path] = (h, i)
            else:  # fused roles add up their rows
                out[path] = (out.get(path, (0, h))[0] + rows[role], h)
        return out

    def linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer of a decoder layer, by leaf name."""
        return {p.rsplit(".", 1)[-1]: v for p, v in self.module_shapes(layer).items()}

    def uniform(self) -> bool:
        return len(set(self.layers)) == 1


_KIND_WORDS = {
    "attn": "attention head groups (method.targets: attn)",
    "mlp": "MLP channels (method.targets: mlp)",
    "layer": "whole decoder layers (method.targets: [layer])",
    "hidden": "hidden channels (method.targets: [hidden])",
    "qk": "shared q/k head-dimension channels (method.attention_space=head_dim)",
    "vo": "shared v/o head-dimension channels (method.attention_space=head_dim)",
    "train": "structures while training LoRA (method=loraprune, lorashear, atp)",
}


def check_kinds(arch: ArchInfo, kinds, what: str = "method.targets") -> None:
    """Refuse structure kinds the family cannot prune exactly (``Family.refuse``), naming the
    family, the kind, the reason and what it does allow."""
    refuse = arch.family.refuse
    for kind in kinds:
        if kind in refuse:
            ok = [k for k in ("attn", "mlp", "layer", "hidden") if k not in refuse]
            raise ConfigError(
                f"{what} prune {_KIND_WORDS.get(kind, kind)}, which prunelab refuses on "
                f"model_type={arch.model_type!r}: {refuse[kind]}; allowed on this family: {', '.join(ok)}"
            )


def arch_info(config) -> ArchInfo:
    """ArchInfo from a transformers config (works for pruned configs with per-layer shapes)."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type={mt!r} is not supported by the structured methods: prunelab does not know its "
            f"coupled structures (heads, KV groups, MLP channels); allowed: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(LLaMA 1/2/3, Vicuna, Mistral, Qwen2, Qwen3, OLMo-2, Gemma 2, Gemma 3's text model "
            "Gemma3ForCausalLM, Phi-3). The layer-wise methods (magnitude, wanda, sparsegpt, "
            "admm) run on it: they need only its blocks' linear layers"
        )
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_layer = getattr(config, LAYER_SHAPES_KEY, None)
    if per_layer:
        layers = tuple(LayerShape(**s) for s in per_layer)
    else:
        layers = (
            LayerShape(config.num_attention_heads, kv, config.intermediate_size),
        ) * config.num_hidden_layers
    if FAMILIES[mt].qkv_bias_always:
        attn_bias, o_bias = True, False
    else:
        attn_bias = o_bias = bool(getattr(config, "attention_bias", False))
    return ArchInfo(
        model_type=mt,
        hidden_size=h,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=attn_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        layers=layers,
    )
