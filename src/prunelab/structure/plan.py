"""From a requested ratio of *all* parameters to per-unit group counts.

``ratio`` is the fraction of all model parameters removed (embeddings and lm_head count in
the total but are never pruned). The per-layer amounts are derived here, from the config
alone: attention is rounded to whole KV groups (heads under MHA) at the per-layer fraction
``p`` that the target implies; MLP channels then absorb the rounding so the total lands on
the target. Requested and achieved ratios are both reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from prunelab.errors import ConfigError
from prunelab.structure.arch import ArchInfo


@dataclass
class PrunePlan:
    requested: float
    achieved: float
    params_before: int
    params_after: int
    kinds: tuple[str, ...]
    prunable_layers: list[int]
    remove: dict[str, int] = field(default_factory=dict)  # unit key -> groups to remove
    # ratio_convention other than "params": the ratio as the user (a paper) meant it,
    # {"convention", "meaning", "requested", "achieved"}; requested/achieved above stay in
    # all-parameter terms, which the methods plan with
    convention: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_keep(key: str, value: Any) -> None:
    """``method.keep_first_layers`` / ``keep_last_layers``: a fraction of depth in [0, 1) or a
    layer count ≥ 0 (a float ≥ 1 is neither)."""
    fraction = isinstance(value, float) and 0.0 <= value < 1.0
    count = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if not (fraction or count):
        raise ConfigError(
            f"{key}={value!r} is not allowed; allowed: a fraction of depth in [0, 1) or a layer count >= 0"
        )


def prunable_layers(num_layers: int, keep_first: float | int, keep_last: float | int) -> list[int]:
    """Layers open to pruning. Fractions of depth are rounded up (LLaMA-7B: 4/32 and 2/32 keep
    the first 4 and the last 2 of 32, and the first and last of 8); ints are layer counts."""

    def count(x: float | int) -> int:
        return int(x) if isinstance(x, int) else math.ceil(x * num_layers - 1e-9)

    first, last = count(keep_first), count(keep_last)
    layers = list(range(first, num_layers - last))
    if not layers:
        raise ConfigError(
            f"method.keep_first_layers={keep_first!r} and method.keep_last_layers={keep_last!r} leave "
            f"no prunable layer out of {num_layers}"
        )
    return layers


def _spread(total: int, caps: list[int]) -> list[int]:
    """Split ``total`` as evenly as possible over slots with upper bounds ``caps``."""
    out = [0] * len(caps)
    left = total
    open_slots = [i for i, c in enumerate(caps) if c > 0]
    while left > 0 and open_slots:
        share, extra = divmod(left, len(open_slots))
        nxt = []
        for j, i in enumerate(open_slots):
            want = share + (1 if j < extra else 0)
            take = min(want, caps[i] - out[i])
            out[i] += take
            left -= take
            if out[i] < caps[i]:
                nxt.append(i)
        if len(nxt) == len(open_slots) and left > 0 and share == 0 and extra == 0:
            break
        open_slots = nxt
    return out


def _achieved(arch: ArchInfo, remove: dict[str, int], kinds: tuple[str, ...]) -> int:
    removed = 0
    for key, k in remove.items():
        if key == "layers":
            continue
        layer, kind = key.split(".")
        removed += k * (arch.attn_group_params(int(layer)) if kind == "attn" else arch.mlp_channel_params())
    return removed


def plan_ratio(
    arch: ArchInfo,
    ratio: float,
    kinds: tuple[str, ...] = ("attn", "mlp"),
    layers: list[int] | None = None,
    tolerance: float = 0.01,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> PrunePlan:
    """``exclude``: unit keys ("3.attn", "0.mlp") never pruned (e.g. LoRAShear's unprunable
    groups); the target is met on the remaining units."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"ratio={ratio!r} is outside the allowed range (0, 1): the fraction of all parameters removed"
        )
    layers = list(range(arch.num_layers)) if layers is None else layers
    total = arch.total_params()
    target = ratio * total
    remove: dict[str, int] = {}
    if kinds == ("layer",):
        removable = [arch.layer_params(i) for i in layers]
        per = sum(removable) / len(removable)
        k = min(len(layers) - 1, max(1, round(target / per)))
        remove["layers"] = k
        removed = round(k * per)  # exact count depends on which layers are chosen; uniform models: exact
        return _finish(arch, ratio, total, removed, kinds, layers, remove, tolerance, step=per)

    if tuple(kinds) == ("hidden",):
        per = arch.hidden_channel_params()
        k = min(arch.hidden_size - 1, max(1, round(target / per)))
        remove["hidden"] = k
        return _finish(arch, ratio, total, k * per, kinds, layers, remove, tolerance, step=per)

    # groups open to pruning per layer (0: kind not targeted, or the unit excluded)
    attn_n = [
        arch.layers[i].num_key_value_heads if "attn" in kinds and f"{i}.attn" not in exclude else 0
        for i in layers
    ]
    mlp_n = [
        arch.layers[i].intermediate_size if "mlp" in kinds and f"{i}.mlp" not in exclude else 0
        for i in layers
    ]
    attn_caps = [max(0, n - 1) for n in attn_n]
    mlp_caps = [max(0, n - 1) for n in mlp_n]
    attn_p = [arch.attn_group_params(i) for i in layers]
    mlp_p = arch.mlp_channel_params()
    max_removable = sum(c * p for c, p in zip(attn_caps, attn_p, strict=True)) + sum(mlp_caps) * mlp_p
    if target > max_removable:
        raise ConfigError(
            f"ratio={ratio} cannot be met: with method.targets={list(kinds)} on layers {layers[0]}..{layers[-1]} at "
            f"most {max_removable / total:.3f} of all parameters can be removed (at least one head group and one "
            f"channel stay in each layer); allowed: (0, {max_removable / total:.3f}]"
        )
    if "attn" in kinds and "mlp" in kinds:
        prunable = sum(n * p for n, p in zip(attn_n, attn_p, strict=True)) + sum(mlp_n) * mlp_p
        frac = target / prunable
        attn_k = [min(c, round(frac * n)) for c, n in zip(attn_caps, attn_n, strict=True)]
        while sum(k * p for k, p in zip(attn_k, attn_p, strict=True)) > target:  # rounding overshoot
            attn_k[attn_k.index(max(attn_k))] -= 1
        rest = target - sum(k * p for k, p in zip(attn_k, attn_p, strict=True))
        # Equal channel counts per layer keep equal-shaped layers equal (plain-loadable checkpoints).
        per_layer = round(rest / mlp_p / max(1, sum(n > 0 for n in mlp_n)))
        mlp_k = [min(c, per_layer) for c in mlp_caps]
        attn_removed = sum(k * p for k, p in zip(attn_k, attn_p, strict=True))
        if abs(attn_removed + sum(mlp_k) * mlp_p - target) > tolerance * target:
            mlp_k = _spread(round(rest / mlp_p), mlp_caps)  # small models: exactness over equal shapes
        step = mlp_p
    elif "attn" in kinds:
        attn_k = _spread(round(target / (sum(attn_p) / len(attn_p))), attn_caps)
        mlp_k = [0] * len(layers)
        step = sum(attn_p) / len(attn_p)
    elif "mlp" in kinds:
        attn_k = [0] * len(layers)
        mlp_k = _spread(round(target / mlp_p), mlp_caps)
        step = mlp_p
    else:
        raise ConfigError(
            f"method.targets={list(kinds)} is not allowed; allowed: [attn, mlp], [attn], [mlp], [layer]"
        )
    for i, a, m in zip(layers, attn_k, mlp_k, strict=True):
        if "attn" in kinds and f"{i}.attn" not in exclude:
            remove[f"{i}.attn"] = a
        if "mlp" in kinds and f"{i}.mlp" not in exclude:
            remove[f"{i}.mlp"] = m
    removed = _achieved(arch, remove, kinds)
    return _finish(arch, ratio, total, removed, kinds, layers, remove, tolerance, step)


_GRAIN = {("layer",): "layers", ("hidden",): "hidden channels"}


def _finish(arch, ratio, total, removed, kinds, layers, remove, tolerance, step) -> PrunePlan:
    achieved = removed / total
    if abs(achieved - ratio) > tolerance * ratio:
        lo, hi = (removed - step) / total, (removed + step) / total
        near = sorted({round(x, 4) for x in (lo, achieved, hi) if 0 < x < 1})
        raise ConfigError(
            f"ratio={ratio} cannot be met within ratio_tolerance={tolerance} (relative) with whole "
            f"{_GRAIN.get(tuple(kinds), 'head groups')} (method.targets={list(kinds)}): nearest achievable "
            f"ratios are {near}; use one of them or raise ratio_tolerance"
        )
    return PrunePlan(
        requested=ratio,
        achieved=achieved,
        params_before=total,
        params_after=total - removed,
        kinds=tuple(kinds),
        prunable_layers=list(layers),
        remove=remove,
    )


# ---------------------------------------------------------------- element-wise sparsity
@dataclass
class SparsityPlan:
    """Plan of the layer-wise (element-wise) methods. Here ``ratio`` is the sparsity of the
    pruned linear layers — their papers' convention; embeddings, lm_head and norms are
    untouched — and ``zero_fraction`` the share of *all* parameters that becomes zero."""

    requested: float
    achieved: float  # exact count over the pruned linears (rounded per layer or row)
    pattern: str
    scope: str
    modules: list[str]
    prunable_layers: list[int]
    params_before: int
    params_targeted: int
    params_zeroed: int
    zero_fraction: float
    sparse: bool = True

    @property
    def params_after(self) -> int:
        return self.params_before  # nothing is removed, only zeroed

    def to_dict(self) -> dict:
        return asdict(self)


def plan_sparsity(
    arch: Any,
    ratio: float,
    pattern,
    scope: str,
    modules: list[str] | tuple[str, ...],
    layers: list[int],
) -> SparsityPlan:
    """Check a sparsity target against the architecture (from config alone) and count it.
    ``arch``: an ArchInfo, or for a family prunelab has no structure for, the LinearArch of
    its meta-device model (``prunelab.sparsity.blocks``)."""
    from prunelab.sparsity.patterns import prune_count

    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"ratio={ratio!r} is outside the allowed range (0, 1): the sparsity of the pruned linear layers"
        )
    if pattern.m is not None and abs(ratio - pattern.sparsity) > 1e-9:
        raise ConfigError(
            f"ratio={ratio} contradicts method.sparsity_pattern={pattern}: {pattern} keeps {pattern.n} of "
            f"every {pattern.m} weights, i.e. sparsity {pattern.sparsity:g}; use ratio={pattern.sparsity:g} "
            f"or sparsity_pattern=unstructured"
        )
    from prunelab.sparsity.blocks import resolve_modules

    targeted = zeroed = 0
    for i in layers:
        shapes = arch.linear_shapes(i)
        for name in resolve_modules(modules, list(shapes), f"model_type={arch.model_type}"):
            rows, cols = shapes[name]
            if pattern.m is not None and cols % pattern.m:
                raise ConfigError(
                    f"method.sparsity_pattern={pattern} needs each row's inputs in groups of {pattern.m}, but "
                    f"layer {i} {name} has {cols} inputs; allowed: an M dividing {cols}, or unstructured"
                )
            targeted += rows * cols
            if pattern.m is not None:
                zeroed += rows * cols // pattern.m * (pattern.m - pattern.n)
            else:  # per row or per layer: the same exact total per layer
                zeroed += prune_count(ratio, rows * cols)
    total = arch.total_params()
    return SparsityPlan(
        requested=ratio,
        achieved=zeroed / targeted,
        pattern=str(pattern),
        scope=scope,
        modules=list(modules),
        prunable_layers=list(layers),
        params_before=total,
        params_targeted=targeted,
        params_zeroed=zeroed,
        zero_fraction=zeroed / total,
    )


# ---------------------------------------------------------------- the papers' ratio conventions
CONVENTIONS = {
    "params": "fraction of all parameters removed",
    "linear": "fraction of the parameters of the prunable linear layers removed",
    "per_layer": "fraction of the heads (KV groups) and MLP channels removed in each pruned layer",
}
_CONVENTION_KEY = "ratio_convention"


def check_convention(convention: object) -> str:
    """``ratio_convention``: null / "params" (prunelab's), "linear" (ATP's budget), "per_layer"
    (LoRAPrune's and LLM-Pruner's official ``--ratio``)."""
    if convention is None:
        return "params"
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"{_CONVENTION_KEY}={convention!r} is not allowed; allowed: null or "
            + ", ".join(f"{k} ({v})" for k, v in CONVENTIONS.items())
        )
    return str(convention)


def linear_params(arch: ArchInfo, layers: list[int]) -> int:
    """Parameters of the linear layers (q, k, v, o, gate, up, down, with biases) of ``layers``."""
    return sum(arch.layer_params(i) - arch.norm_params(i) for i in layers)


def plan_convention(
    arch: ArchInfo,
    ratio: float,
    convention: str | None,
    kinds: tuple[str, ...] = ("attn", "mlp"),
    layers: list[int] | None = None,
    tolerance: float = 0.01,
) -> PrunePlan:
    """``plan_ratio`` with ``ratio`` read in a paper's convention; the plan records both the
    convention's ratio and the fraction of all parameters."""
    convention = check_convention(convention)
    layers = list(range(arch.num_layers)) if layers is None else layers
    if convention == "params":
        return plan_ratio(arch, ratio, kinds, layers, tolerance)
    if tuple(kinds) in (("layer",), ("hidden",)):
        raise ConfigError(
            f"{_CONVENTION_KEY}={convention!r} needs head/channel pruning; method.targets={list(kinds)} "
            "prunes whole layers or hidden channels: use ratio_convention=null (fraction of all parameters)"
        )
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"ratio={ratio!r} is outside the allowed range (0, 1): the {CONVENTIONS[convention]}"
        )
    total = arch.total_params()
    if convention == "linear":
        base = linear_params(arch, layers)
        plan = plan_ratio(arch, ratio * base / total, kinds, layers, tolerance)
        achieved = (plan.params_before - plan.params_after) / base
    else:  # per_layer: the same fraction of each pruned layer's heads and channels
        remove: dict[str, int] = {}
        groups = kept = 0
        for i in layers:
            for kind, n in (
                ("attn", arch.layers[i].num_key_value_heads),
                ("mlp", arch.layers[i].intermediate_size),
            ):
                if kind in kinds:
                    # int(n · ratio), as the official scripts (LLM-Pruner, LoRAPrune) count
                    remove[f"{i}.{kind}"] = min(n - 1, math.floor(ratio * n + 1e-9))
                    groups, kept = groups + n, kept + n - remove[f"{i}.{kind}"]
        removed = _achieved(arch, remove, tuple(kinds))
        plan = PrunePlan(
            requested=removed / total,  # what the methods plan with: the counts above, exactly
            achieved=removed / total,
            params_before=total,
            params_after=total - removed,
            kinds=tuple(kinds),
            prunable_layers=list(layers),
            remove=remove,
        )
        achieved = 1 - kept / groups
    plan.convention = {
        "convention": convention,
        "meaning": CONVENTIONS[convention],
        "requested": ratio,
        "achieved": achieved,
    }
    if convention == "linear":  # the denominator: a method that re-plans is re-read against it
        plan.convention["params_base"] = base
    return plan
