"""Units, their coupled members, keep-masks, and physical removal.

A *unit* is one pool of interchangeable groups: the attention groups of one layer
(``kind="attn"``; one group = one KV head and the query heads that read it, so under MHA a
group is one head), the MLP channels of one layer (``kind="mlp"``), or the decoder layers
themselves (``kind="layer"``, ``layer=None``). A *mask* maps a unit's key to a bool vector
over its groups (True = keep). Masking zeroes every member of a pruned group; physical
pruning slices them out. The two give the same outputs (tested to 1e-5).

ATP's attention space (``kind="qk"`` / ``"vo"``): one head-dimension channel shared by every
head of a layer — channel j is row h·head_dim + j of q and k (every head h), or of v with
column h·head_dim + j of o. These are *masked only* (``MASKED_ONLY``): zeroed in place, never
sliced, because transformers' LLaMA attention cannot run them removed — q/k channels are
masked before RoPE, which pairs channel c with c + head_dim/2 (a masked channel whose partner
is kept still contributes), and q, k, v share one head_dim (RoPE's and the view's); removing v
rows and o columns would be exact but leaves a value head_dim the attention cannot express.

Norms over the whole q / k projection (OLMo-2: one RMS over all heads at once) couple the
heads: a zeroed head still counts in the mean square of the kept ones (S / (N·d) instead of
S / (N'·d) for N' of N heads kept). Physical removal slices those norms with their heads,
scales the kept weights by sqrt(N / N') and keeps ``config.rms_norm_eps`` (a plain, loadable
checkpoint); masking sets the masked norms' eps to eps·N'/N, the one value that makes the two
equal exactly: w / sqrt(S/(N·d) + eps·N'/N) = w·sqrt(N/N') / sqrt(S/(N'·d) + eps). So a
masked OLMo-2 differs from "the dense model with zeros" by that eps only. Norms over head_dim
(Qwen3, Gemma 3) are shared by every head and stay whole.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from prunelab.structure.arch import LAYER_SHAPES_KEY, ArchInfo, LayerShape, arch_info, check_kinds

KINDS = ("attn", "mlp", "layer", "hidden", "qk", "vo")
MASKED_ONLY = ("qk", "vo")  # kinds zeroed in place by prune_physically, never sliced (see above)
Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Unit:
    layer: int | None
    kind: str
    n: int  # number of groups

    @property
    def key(self) -> str:
        if self.layer is None:
            return {"layer": "layers", "hidden": "hidden"}[self.kind]
        return f"{self.layer}.{self.kind}"


@dataclass(frozen=True)
class Member:
    """A parameter slice that belongs to a group: ``param`` of module ``path`` (relative to
    the decoder layer) split along ``dim`` into consecutive blocks of ``width`` — or, with
    ``period`` > 0, strided: group j holds indices j, j + period, j + 2·period, … (one
    head-dimension channel of every head; ``width`` is then 1). ``linear`` is False for a
    norm's slice (OLMo-2's whole-projection q_norm/k_norm): a vector with no LoRA factor.
    ``size`` > 0: the member holds only indices ``offset … offset + size`` of ``dim`` — one
    part of a fused linear (Phi-3: q, k and v rows of qkv_proj; gate and up rows of
    gate_up_proj); 0: the whole dimension."""

    path: str
    param: str
    dim: int
    width: int
    period: int = 0
    linear: bool = True
    offset: int = 0
    size: int = 0


def member_part(t: torch.Tensor, m: Member) -> torch.Tensor:
    """The part of ``t`` (a member's weight or bias, or a same-shaped statistic) that holds
    member ``m``'s groups: all of it, or its slice of a fused linear."""
    if not m.size:
        return t
    return t.narrow(m.dim if t.dim() > 1 else 0, m.offset, m.size)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return base_model(model).model.layers


def units(arch: ArchInfo, kinds: tuple[str, ...] = ("attn", "mlp")) -> list[Unit]:
    out = []
    for i, s in enumerate(arch.layers):
        if "attn" in kinds:
            out.append(Unit(i, "attn", s.num_key_value_heads))
        if "qk" in kinds:
            out.append(Unit(i, "qk", arch.head_dim))
        if "vo" in kinds:
            out.append(Unit(i, "vo", arch.head_dim))
        if "mlp" in kinds:
            out.append(Unit(i, "mlp", s.intermediate_size))
    if "layer" in kinds:
        out.append(Unit(None, "layer", arch.num_layers))
    if "hidden" in kinds:
        out.append(Unit(None, "hidden", arch.hidden_size))
    return out


def members(arch: ArchInfo, unit: Unit) -> list[Member]:
    """The parameter slices of one group of ``unit``, read from the family's description
    (``arch.family``): the first member is the pruning root (q / gate), as in LLM-Pruner."""
    fam = arch.family
    lin = fam.linear_paths()
    if unit.kind == "attn":
        qd = arch.group_size(unit.layer) * arch.head_dim  # q rows / o columns per group
        d = arch.head_dim
        # fused qkv (Phi-3): the q, k and v rows sit one after the other in one weight
        kv = arch.layers[unit.layer].num_key_value_heads
        q_rows, kv_rows = kv * qd, kv * d
        part = (
            {"q": (0, q_rows), "k": (q_rows, kv_rows), "v": (q_rows + kv_rows, kv_rows)}
            if fam.fused_qkv
            else {"q": (0, 0), "k": (0, 0), "v": (0, 0)}
        )
        width = {"q": qd, "k": d, "v": d}
        out = [Member(lin[r], "weight", 0, width[r], 0, True, *part[r]) for r in ("q", "k", "v")]
        out.append(Member(lin["o"], "weight", 1, qd))
        if arch.attention_bias:
            out += [Member(lin[r], "bias", 0, width[r], 0, True, *part[r]) for r in ("q", "k", "v")]
        # norms over the whole q / k projection (OLMo-2): each group owns its heads' slice;
        # head_dim norms (Qwen3, Gemma 3) are shared by every head and stay whole
        for name, width in zip(fam.proj_norms, (qd, d), strict=False):
            out.append(Member(f"self_attn.{name}", "weight", 0, width, linear=False))
        return out
    if unit.kind in MASKED_ONLY:  # one channel of every head: strided by head_dim
        d = arch.head_dim
        s = arch.layers[unit.layer]
        q_rows, kv_rows = s.num_attention_heads * d, s.num_key_value_heads * d
        part = (
            {"q": (0, q_rows), "k": (q_rows, kv_rows), "v": (q_rows + kv_rows, kv_rows)}
            if fam.fused_qkv
            else {"q": (0, 0), "k": (0, 0), "v": (0, 0)}
        )
        roles = ("q", "k") if unit.kind == "qk" else ("v",)
        out = [Member(lin[r], "weight", 0, 1, d, True, *part[r]) for r in roles]
        if unit.kind == "vo":
            out.append(Member(lin["o"], "weight", 1, 1, d))
        if arch.attention_bias:
            out += [Member(lin[r], "bias", 0, 1, d, True, *part[r]) for r in roles]
        return out
    if unit.kind == "mlp":
        i = arch.layers[unit.layer].intermediate_size
        # fused gate_up (Phi-3): the gate rows, then the up rows, of one weight
        part = {"gate": (0, i), "up": (i, i)} if fam.fused_gate_up else {"gate": (0, 0), "up": (0, 0)}
        out = [Member(lin[r], "weight", 0, 1, 0, True, *part[r]) for r in ("gate", "up")]
        out.append(Member(lin["down"], "weight", 1, 1))
        if arch.mlp_bias:
            out += [Member(lin[r], "bias", 0, 1, 0, True, *part[r]) for r in ("gate", "up")]
        return out
    if unit.kind == "hidden":  # paths relative to the base model, not to a layer
        out = [Member("model.embed_tokens", "weight", 1, 1)]
        for i in range(arch.num_layers):
            p = f"model.layers.{i}."
            out += [Member(p + n, "weight", 0, 1) for n in fam.norms]
            # input columns: once per module (a fused linear serves several roles)
            ins = dict.fromkeys(lin[r] for r in ("q", "k", "v", "gate", "up"))
            out += [Member(p + path, "weight", 1, 1) for path in ins]
            out += [Member(p + lin[r], "weight", 0, 1) for r in ("o", "down")]
            if arch.o_bias:
                out.append(Member(p + lin["o"], "bias", 0, 1))
            if arch.mlp_bias:
                out.append(Member(p + lin["down"], "bias", 0, 1))
        out.append(Member("model.norm", "weight", 0, 1))
        if not arch.tie_word_embeddings:
            out.append(Member("lm_head", "weight", 1, 1))
        return out
    raise ValueError(f"unit kind {unit.kind!r} has no members")


def mask_kinds(masks: Masks) -> set[str]:
    """The structure kinds ``masks`` prune (keys "3.attn", "layers", "hidden")."""
    return {{"layers": "layer"}.get(k, k.rpartition(".")[2]) for k, v in masks.items() if not bool(v.all())}


def weight_members(arch: ArchInfo, unit: Unit) -> list[Member]:
    """The members of ``unit`` that are linears' weight matrices (biases and norms left out)."""
    return [m for m in members(arch, unit) if m.param == "weight" and m.linear]


def member_tensor(model: nn.Module, layer: int | None, m: Member) -> torch.Tensor:
    root = base_model(model) if layer is None else decoder_layers(model)[layer]
    return getattr(root.get_submodule(m.path), m.param)


def grouped(t: torch.Tensor, m: Member) -> torch.Tensor:
    """View a member tensor as [n_groups, elements_per_group]."""
    t = member_part(t, m)
    if m.period:  # group j: index j of every period (every head)
        d = m.period
        if m.dim == 0:  # [reps·d, …] -> [d, reps·…]
            return t.reshape(t.shape[0] // d, d, -1).transpose(0, 1).reshape(d, -1)
        return t.reshape(t.shape[0], t.shape[1] // d, d).permute(2, 0, 1).reshape(d, -1)
    if m.dim == 0:
        return t.reshape(t.shape[0] // m.width, -1)
    # dim 1: [out, n*width] -> [n, out*width]
    n = t.shape[1] // m.width
    return t.reshape(t.shape[0], n, m.width).transpose(0, 1).reshape(n, -1)


def iter_unit_members(model: nn.Module, arch: ArchInfo, unit: Unit) -> Iterator[tuple[Member, torch.Tensor]]:
    for m in members(arch, unit):
        yield m, member_tensor(model, unit.layer, m)


def full_masks(arch: ArchInfo, kinds: tuple[str, ...] = ("attn", "mlp")) -> Masks:
    return {u.key: torch.ones(u.n, dtype=torch.bool) for u in units(arch, kinds)}


def _expand(keep: torch.Tensor, width: int) -> torch.Tensor:
    return keep.repeat_interleave(width)


def expand_groups(values: torch.Tensor, m: Member, size: int) -> torch.Tensor:
    """A per-group vector spread over the ``size`` indices of member ``m`` along ``m.dim``:
    each value repeated over its block, or tiled over the heads for a strided member; for a
    part of a fused linear, 1 (True: kept, untouched) outside the part."""
    if m.size:
        out = values.new_ones(size)
        out[m.offset : m.offset + m.size] = expand_groups(values, replace(m, offset=0, size=0), m.size)
        return out
    return values.repeat(size // m.period) if m.period else values.repeat_interleave(m.width)


def select_groups(sel: torch.Tensor, m: Member, size: int) -> torch.Tensor:
    """Bool over the ``size`` indices of member ``m``'s dim: True at the groups ``sel`` selects
    (False outside a fused linear's part, unlike ``expand_groups``' keep semantics)."""
    return ~expand_groups(~sel.bool(), m, size)


def masked_params(arch: ArchInfo, masks: Masks) -> int:
    """Parameters of the masked-only groups (``MASKED_ONLY``) that ``masks`` prune: zeroed in
    place, still stored; what a ratio counts as removed beside the physically removed ones."""
    per = {"qk": arch.qk_channel_params, "vo": arch.vo_channel_params}
    total = 0
    for key, keep in masks.items():
        layer, _, kind = key.partition(".")
        if kind in MASKED_ONLY:
            total += int((~keep).sum()) * per[kind](int(layer))
    return total


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks, arch: ArchInfo | None = None) -> None:
    """Zero every member of every pruned group, in place (shapes unchanged)."""
    arch = arch or arch_info(base_model(model).config)
    check_kinds(arch, mask_kinds(masks), "the masks")
    layers = decoder_layers(model)
    paths = arch.family.linear_paths()
    for key, keep in masks.items():
        if key == "layers":
            for i in torch.nonzero(~keep).flatten().tolist():
                # A layer whose attention and MLP outputs are zero is the identity (residual;
                # a post-norm of zero is zero: Gemma, OLMo-2).
                for path in (paths["o"], paths["down"]):
                    lin = layers[i].get_submodule(path)
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
            continue
        if key == "hidden":
            unit = Unit(None, "hidden", keep.numel())
        else:
            layer, kind = key.split(".")
            unit = Unit(int(layer), kind, keep.numel())
        root = base_model(model) if unit.layer is None else layers[unit.layer]
        for m, t in iter_unit_members(model, arch, unit):
            drop = ~expand_groups(keep.to(t.device), m, t.shape[m.dim])
            if m.dim == 0:
                t[drop] = 0
            else:
                t[:, drop] = 0
            if m.param == "weight":  # the adapters' slices of a pruned group go with it
                for w in lora_slices(root.get_submodule(m.path), m):
                    if m.dim == 0:
                        w[drop.to(w.device)] = 0
                    else:
                        w[:, drop.to(w.device)] = 0
        if unit.kind == "attn" and arch.family.proj_norms:
            eps = base_model(model).config.rms_norm_eps
            for name in arch.family.proj_norms:  # whole-projection norms: module docstring
                getattr(root.self_attn, name).variance_epsilon = eps * float(keep.sum()) / keep.numel()


def lora_parts(module: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(lora_A, lora_B) of every adapter of a peft LoRA layer; [] for a plain linear."""
    if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
        return []
    if getattr(module, "lora_magnitude_vector", None):
        raise ValueError("DoRA adapters (lora_magnitude_vector) cannot be sliced by structure yet")
    return [(module.lora_A[k], module.lora_B[k]) for k in module.lora_A]


def lora_slices(module: nn.Module, m: Member) -> list[torch.Tensor]:
    """The adapter weights that hold member ``m``'s slices in a peft LoRA layer: lora_B (its
    rows) for an output-row member (q/k/v/gate/up), lora_A (its columns) for an input-column
    member (o/down); sliced along ``m.dim`` in blocks of ``m.width`` like the base weight."""
    return [b.weight if m.dim == 0 else a.weight for a, b in lora_parts(module)]


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight of a peft LoRA layer, or a plain linear's weight."""
    return module.base_layer.weight if hasattr(module, "base_layer") else module.weight


def lora_delta(module: nn.Module) -> torch.Tensor:
    """s·B·A summed over a LoRA layer's adapters, fp32 (zeros for a plain linear)."""
    out = torch.zeros_like(base_weight(module), dtype=torch.float32)
    for key in getattr(module, "lora_A", {}):
        a, b = module.lora_A[key].weight.detach().float(), module.lora_B[key].weight.detach().float()
        out += module.scaling[key] * (b @ a)
    return out


def _slice_linear(lin: nn.Module, dim: int, index: torch.Tensor) -> None:
    """Keep ``index`` along ``dim`` (0: output rows, 1: input columns). A peft LoRA layer is
    sliced with its adapters — lora_B rows for output rows, lora_A columns for input columns —
    so a model with un-merged adapters can be pruned physically."""
    parts = lora_parts(lin)
    if parts:
        _slice_linear(lin.base_layer, dim, index)
        for a, b in parts:
            if dim == 0:
                _slice_linear(b, 0, index)
            else:
                _slice_linear(a, 1, index)
        if dim == 0:
            lin.out_features = lin.base_layer.out_features
        else:
            lin.in_features = lin.base_layer.in_features
        return
    w = lin.weight.data.index_select(dim, index.to(lin.weight.device))
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        lin.out_features = w.shape[0]
        if lin.bias is not None:
            lin.bias = nn.Parameter(
                lin.bias.data.index_select(0, index.to(lin.bias.device)), lin.bias.requires_grad
            )
    else:
        lin.in_features = w.shape[1]


def _record_shapes(model: nn.Module, shapes: list[LayerShape], head_dim: int) -> None:
    """Write per-layer shapes into the config.

    A model whose layers share one shape gets a plain transformers config, so
    ``from_pretrained`` loads it, but only where transformers can represent it: its config
    validator requires ``hidden_size % num_attention_heads == 0`` even with ``head_dim``
    pinned. Otherwise the per-layer list is recorded and the global head fields keep valid
    dense values (``load_pretrained`` rebuilds the layers from the list).
    """
    config = base_model(model).config
    config.head_dim = head_dim  # pin it: rotary would otherwise derive it from hidden/heads
    config.num_hidden_layers = len(shapes)
    name = type(base_model(model)).__name__.removeprefix("Pruned")
    s = shapes[0]
    if len(set(shapes)) == 1 and config.hidden_size % s.num_attention_heads == 0:
        config.num_attention_heads = s.num_attention_heads
        config.num_key_value_heads = s.num_key_value_heads
        config.intermediate_size = s.intermediate_size
        if hasattr(config, LAYER_SHAPES_KEY):
            delattr(config, LAYER_SHAPES_KEY)
        config.architectures = [name]
        return
    setattr(config, LAYER_SHAPES_KEY, [x.to_dict() for x in shapes])
    if config.hidden_size % config.num_attention_heads:
        # Only the validator reads these now (the per-layer list is authoritative): pick values
        # it accepts. hidden // head_dim divides hidden unless the hidden size itself was pruned.
        heads = config.hidden_size // head_dim
        if heads == 0 or config.hidden_size % heads:
            heads = 1
        config.num_attention_heads = heads
        config.num_key_value_heads = (
            1 if heads == 1 else max(1, heads // (s.num_attention_heads // s.num_key_value_heads))
        )
    config.architectures = ["Pruned" + name]


@torch.no_grad()
def prune_physically(model: nn.Module, masks: Masks) -> ArchInfo:
    """Remove masked groups (and masked layers) for real; masked-only groups (``MASKED_ONLY``:
    ATP's shared head-dimension channels) are zeroed in place instead. Returns the new
    ArchInfo (whose parameter count still holds the masked-only groups: ``masked_params``)."""
    arch = arch_info(base_model(model).config)
    check_kinds(arch, mask_kinds(masks), "the masks")
    layers = decoder_layers(model)
    shapes = list(arch.layers)
    for key, keep in masks.items():
        if key in ("layers", "hidden") or bool(keep.all()):
            continue
        layer, kind = int(key.split(".")[0]), key.split(".")[1]
        if kind in MASKED_ONLY:  # zeroed, shapes unchanged: what is exact and runnable here
            apply_masks(model, {key: keep}, arch)
            continue
        if not bool(keep.any()):
            raise ValueError(
                f"mask {key!r} removes every {kind} group of layer {layer}; "
                "drop the whole layer (kind 'layer') instead"
            )
        unit = Unit(layer, kind, keep.numel())
        # one index per (module, dim): the kept entries of every member there (the parts of a
        # fused linear each contribute theirs; a weight and its bias share one)
        kept: dict[tuple[str, int], torch.Tensor] = {}
        for m in members(arch, unit):
            t = member_tensor(model, layer, m)
            full = expand_groups(keep.to(t.device), m, t.shape[m.dim if t.dim() > 1 else 0])
            k = (m.path, m.dim)
            kept[k] = full if k not in kept else kept[k] & full
        for (path, dim), full in kept.items():
            index = torch.nonzero(full).flatten()
            mod = layers[layer].get_submodule(path)
            if isinstance(mod, nn.Linear) or lora_parts(mod):
                _slice_linear(mod, dim, index)
            else:  # a norm over the whole projection (OLMo-2): its weight, sliced like the rows
                w = mod.weight
                mod.weight = nn.Parameter(w.data.index_select(0, index.to(w.device)), w.requires_grad)
        s = shapes[layer]
        if kind == "attn" and arch.family.proj_norms:  # whole-projection norms: module docstring
            attn = layers[layer].self_attn
            for name in arch.family.proj_norms:
                norm = getattr(attn, name)
                norm.weight.data.mul_((keep.numel() / float(keep.sum())) ** 0.5)
                norm.variance_epsilon = base_model(model).config.rms_norm_eps
        if kind == "attn":
            g = arch.group_size(layer)
            kv = int(keep.sum())
            shapes[layer] = LayerShape(kv * g, kv, s.intermediate_size)
            _set_attn_heads(layers[layer].self_attn, arch, kv * g, kv)
        else:
            if hasattr(layers[layer].mlp, "intermediate_size"):
                layers[layer].mlp.intermediate_size = int(keep.sum())
            shapes[layer] = LayerShape(s.num_attention_heads, s.num_key_value_heads, int(keep.sum()))
    if "layers" in masks and not bool(masks["layers"].all()):
        keep = masks["layers"].tolist()
        if not any(keep):
            raise ValueError("the layer mask removes every decoder layer")
        kept = [layer for layer, k in zip(layers, keep, strict=True) if k]
        for new_idx, layer in enumerate(kept):
            layer.self_attn.layer_idx = new_idx
        base_model(model).model.layers = nn.ModuleList(kept)
        shapes = [s for s, k in zip(shapes, keep, strict=True) if k]
        config = base_model(model).config
        if getattr(config, "layer_types", None):
            config.layer_types = [t for t, k in zip(config.layer_types, keep, strict=True) if k]
    if "hidden" in masks and not bool(masks["hidden"].all()):
        _prune_hidden(model, arch, masks["hidden"])
    _record_shapes(model, shapes, arch.head_dim)
    if arch.family.config_heads:  # _record_shapes may have set validator-only global counts
        for layer, shape in zip(decoder_layers(model), shapes, strict=True):
            _set_attn_heads(layer.self_attn, arch, shape.num_attention_heads, shape.num_key_value_heads)
    return arch_info(base_model(model).config)


def _prune_hidden(model: nn.Module, arch: ArchInfo, keep: torch.Tensor) -> None:
    """Slice the residual stream (embedding columns, norms, q/k/v/gate/up inputs, o/down outputs)."""
    if not bool(keep.any()):
        raise ValueError("the hidden mask removes every channel")
    root = base_model(model)
    index = torch.nonzero(keep).flatten()
    for m in members(arch, Unit(None, "hidden", keep.numel())):
        mod = root.get_submodule(m.path)
        t = getattr(mod, m.param)
        setattr(mod, m.param, nn.Parameter(t.data.index_select(m.dim, index.to(t.device)), t.requires_grad))
        if isinstance(mod, nn.Linear):
            mod.in_features, mod.out_features = mod.weight.shape[1], mod.weight.shape[0]
        elif isinstance(mod, nn.Embedding):
            mod.embedding_dim = mod.weight.shape[1]
    # sqrt(S/H' + eps·H/H') = sqrt(H/H')·sqrt(S/H + eps): scaling the weights by sqrt(H/H') and
    # eps by H/H' makes the narrowed model equal to the masked one exactly.
    ratio = keep.numel() / index.numel()
    for name, mod in root.named_modules():
        if name.endswith(("layernorm", "model.norm")) and hasattr(mod, "variance_epsilon"):
            mod.weight.data.mul_(ratio**0.5)
            mod.variance_epsilon = mod.variance_epsilon * ratio
    root.config.rms_norm_eps = root.config.rms_norm_eps * ratio
    if arch.tie_word_embeddings:
        root.lm_head.weight = root.model.embed_tokens.weight
    root.config.hidden_size = int(index.numel())


def _set_attn_heads(attn: nn.Module, arch: ArchInfo, heads: int, kv: int) -> None:
    """Tell a layer's attention its head counts where it keeps them: ``num_key_value_heads``
    (Phi-3), and for a family whose attention reads the query-head count from the shared
    config (``Family.config_heads``: Phi-3 splits qkv at config.num_attention_heads·head_dim)
    a config of its own with this layer's count."""
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = kv
    attn.num_key_value_groups = heads // kv
    if arch.family.config_heads and attn.config.num_attention_heads != heads:
        attn.config = copy.copy(attn.config)
        attn.config.num_attention_heads = heads
        attn.config.num_key_value_heads = kv


def set_layer_shapes(model: nn.Module, shapes: list[LayerShape], head_dim: int) -> None:
    """Rebuild each layer's linears (and whole-projection norms) to the given shapes (weights
    uninitialised: for loading), from the family's description."""
    config = base_model(model).config
    arch = arch_info(config)  # per-layer shapes from the config: module_shapes gives each layer's
    fam = arch.family
    for i, layer in enumerate(decoder_layers(model)):
        s = shapes[i]
        for path, (o, n_in) in arch.module_shapes(i).items():
            parent, _, name = path.rpartition(".")
            old = layer.get_submodule(path)
            new = nn.Linear(
                n_in, o, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
            )
            setattr(layer.get_submodule(parent), name, new)
        for name, n in zip(fam.proj_norms, (s.num_attention_heads, s.num_key_value_heads), strict=False):
            norm = getattr(layer.self_attn, name)
            norm.weight = nn.Parameter(norm.weight.data.new_ones(n * head_dim))
        _set_attn_heads(layer.self_attn, arch, s.num_attention_heads, s.num_key_value_heads)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = s.intermediate_size
