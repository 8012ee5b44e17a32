"""Non-finite numbers are errors: NaN or infinity in weights, losses, importance scores or
metrics stops the run with a ``NonFiniteError`` that says where and what to do, instead of a
NaN perplexity in results.json or pruning decisions taken by sorting NaNs.

The checks are cheap by construction: one reduction (a sum) per tensor and one host sync
per device for a whole model (``check_weights``); scalars the code already turned
into Python floats (logged losses, perplexities) are checked as they are.

fp16 training: ``loss_scaler`` decides whether a training loop scales its loss (dynamic
loss scaling with ``torch.amp.GradScaler``; see docs/reliability.md, "Non-finite numbers").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from prunelab.errors import NonFiniteError

# Said after a non-finite loss or metric of a model whose weights are finite: what usually fixes it.
DTYPE_HINT = (
    "a float16 model whose activations overflow gives this: run with model.dtype=bfloat16 "
    "(same memory, float32's range) or model.dtype=float32"
)


def _count(t: torch.Tensor) -> str:
    """``2 NaN and 1 inf of 4096 values`` (computed only for the tensor being reported)."""
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} inf of {t.numel()} values"


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN and no infinity. Screened by its sum (a NaN or an infinity
    always makes the sum non-finite, and a sum is ~30x faster than ``isfinite`` on a CPU);
    only a non-finite sum (or a finite tensor whose sum overflows) is checked element-wise."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity, else None: one
    sum per tensor, one host sync per device (not one per tensor), and an element-wise check
    only of the tensors whose sum is not finite."""
    names: dict[torch.device, list[str]] = {}
    sums: dict[torch.device, list[torch.Tensor]] = {}
    tensors = {}
    for name, t in named:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        names.setdefault(t.device, []).append(name)
        sums.setdefault(t.device, []).append(t.detach().sum().float())  # inf/NaN survive the cast
        tensors[name] = t
    suspects: set[str] = set()
    for dev, sm in sums.items():
        finite = torch.isfinite(torch.stack(sm)).cpu().tolist()
        suspects.update(n for n, ok in zip(names[dev], finite, strict=True) if not ok)
    return next(
        (n for n in tensors if n in suspects and not bool(torch.isfinite(tensors[n].detach()).all())), None
    )


def check_weights(model: nn.Module, what: str, hint: str) -> None:
    """Raise ``NonFiniteError`` naming the first parameter or buffer of ``model`` with a NaN
    or an infinity. ``what``: which model, at which stage; ``hint``: what to do."""
    from prunelab.models.placement import materialized, offloaded_units

    # a dispatched model: its offloaded modules one at a time (the rest are meta tensors here)
    for unit in offloaded_units(model):
        with materialized(unit, "cpu", write_back=False):
            check_weights(unit, what, hint)
    tensors = {n: p for n, p in model.named_parameters() if p.device.type != "meta"}
    tensors.update((n, b) for n, b in model.named_buffers() if n not in tensors and b.device.type != "meta")
    name = first_nonfinite(tensors.items())
    if name is not None:
        raise NonFiniteError(
            f"non-finite weights in {what}: {name} has {_count(tensors[name].detach())}; {hint}"
        )


def check_value(value: float, what: str, hint: str) -> float:
    """``value`` if it is finite, else ``NonFiniteError`` saying ``what`` it is and ``hint``."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value}; {hint}")
    return value


def check_scores(scores: Mapping[str, torch.Tensor], what: str, hint: str, allow_inf: bool = False) -> None:
    """Importance scores per unit: a NaN (or, unless ``allow_inf``, an infinity) ranks
    arbitrarily, so pruning decisions taken from it would be noise. One reduction per unit."""
    for key, s in scores.items():
        bad = torch.isnan(s) if allow_inf else ~torch.isfinite(s)
        if bool(bad.any()):
            raise NonFiniteError(
                f"non-finite importance scores in {what}: unit {key} has {_count(s.float())}; {hint}"
            )


@contextlib.contextmanager
def watch_outputs(module: nn.Module) -> Iterator[Callable[[], bool]]:
    """While inside, every output of ``module`` (a model's ``lm_head``) adds one reduction (a
    float32 sum: non-finite when any logit is, or beyond 3e38) to a flag that stays on the
    device (no host sync per forward); the yielded function reads it once: True when some
    output held a NaN or an infinity."""
    flag: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        bad = ~torch.isfinite(out.sum(dtype=torch.float32))  # NaN/inf make the sum non-finite
        flag[:] = [bad if not flag else flag[0] | bad]

    handle = module.register_forward_hook(hook)
    try:
        yield lambda: bool(flag and flag[0])
    finally:
        handle.remove()


def trains_in_fp16(model: nn.Module) -> bool:
    """Whether a training loop on ``model`` computes in float16 (any float16 parameter)."""
    return any(p.dtype == torch.float16 for p in model.parameters())


def loss_scaler(model: nn.Module) -> torch.amp.GradScaler:
    """The loss scaler of a LoRA training loop on ``model``: enabled for float16 models, a
    no-op (``enabled=False``) otherwise.

    Why: the gradients that flow back through float16 activations are the loss gradient
    divided by the batch's token count; below float16's smallest normal (6e-5) they lose
    precision and below 6e-8 they are zero, so unscaled fp16 training silently learns from a
    fraction of its gradient. Dynamic scaling multiplies the loss by 2^16 (halving on an
    overflow, when the step is skipped; doubling after 2000 clean steps). The LoRA factors
    and their AdamW state stay float32 (peft casts adapters of float16/bfloat16 models to
    float32), so unscaling and the update happen in float32. bfloat16 and float32 have
    float32's exponent range: no scaling."""
    device = next(model.parameters()).device
    return torch.amp.GradScaler(device.type, enabled=trains_in_fp16(model))
