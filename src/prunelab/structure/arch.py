"""Architecture facts read from a model config alone (no weights), so ratio plans and
config errors happen before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prunelab.errors import ConfigError

# Families whose decoder layers share the LLaMA layout (q/k/v/o + gate/up/down, RMSNorm).
# Vicuna checkpoints are model_type "llama".
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LAYER_SHAPES_KEY = "prunelab_layer_shapes"


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
        return q + kv + o

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
        norms = 2 * self.num_layers + 1
        per_layer = 0
        for s in self.layers:
            q, kv = s.num_attention_heads * self.head_dim, s.num_key_value_heads * self.head_dim
            per_layer += q + 2 * kv + q + (1 if self.o_bias else 0) + 3 * s.intermediate_size
            per_layer += 1 if self.mlp_bias else 0
        return embed + norms + per_layer

    def layer_params(self, layer: int) -> int:
        s = self.layers[layer]
        h = self.hidden_size
        attn = s.num_key_value_heads * self.attn_group_params(layer) + (h if self.o_bias else 0)
        mlp = s.intermediate_size * self.mlp_channel_params() + (h if self.mlp_bias else 0)
        return attn + mlp + 2 * h  # two RMSNorms

    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + sum(self.layer_params(i) for i in range(self.num_layers))

    def linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer of a decoder layer."""
        s, d, h = self.layers[layer], self.head_dim, self.hidden_size
        q, kv, i = s.num_attention_heads * d, s.num_key_value_heads * d, s.intermediate_size
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def uniform(self) -> bool:
        return len(set(self.layers)) == 1


def arch_info(config) -> ArchInfo:
    """ArchInfo from a transformers config (works for pruned configs with per-layer shapes)."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type={mt!r} is not supported by the structured methods: prunelab does not know its "
            f"coupled structures (heads, KV groups, MLP channels); allowed: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(LLaMA 1/2/3, Vicuna, Mistral, Qwen2). The layer-wise methods (magnitude, wanda, sparsegpt, "
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
    if mt == "qwen2":
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
