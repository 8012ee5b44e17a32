"""Taylor importance (LLM-Pruner): the loss change from removing weights, from gradients of
the LM loss on a few calibration sequences.

For a weight w with gradient g = (1/N)·Σ g_n and Fisher diagonal F = (1/N)·Σ g_n²
(per-sample gradients g_n):

- ``element1``: |w·g|                  first order, summed over a group's elements
- ``second``:   |w·F·w|                second-order term only
- ``element2``: |w·g − ½·w·F·w|        mixed (first + Fisher-approximated second order)
- ``vector``:   |Σ w·g|                sum inside the group slice, absolute value outside

A member's score sums its group slice; members combine by ``aggregate`` (sum by default).
Only the gradients of prunable layers' member weights are computed (requires_grad is set on
exactly those and restored afterwards). F needs one backward pass per calibration sample.
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.errors import NonFiniteError
from prunelab.importance import aggregate
from prunelab.numerics import DTYPE_HINT
from prunelab.progress import bar
from prunelab.structure import ArchInfo, Unit
from prunelab.structure.groups import decoder_layers, grouped, iter_unit_members, member_part

TAYLOR_KINDS = ("element1", "element2", "second", "vector")


def _targets(model: nn.Module, arch: ArchInfo, units: list[Unit]) -> dict[str, torch.Tensor]:
    """The member parameters of ``units`` by full name (names, not objects: on a dispatched
    model accelerate replaces an offloaded module's parameter objects at every forward)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = {}
    for unit in units:
        for _, t in iter_unit_members(model, arch, unit):
            params[names[id(t)]] = t
    return params


def gradient_stats(
    model: nn.Module,
    params: dict,
    calibration: torch.Tensor,
    fisher: bool,
    micro_batch: int = 8,
) -> tuple[dict, dict | None]:
    """Mean gradient g (and mean squared per-sample gradient F) of the LM loss, in fp32, keyed
    as ``params``. On a model dispatched by accelerate (model.device_map) the gradients are
    those of the tensors the forward used (``placement.live_parameters``); the sums of an
    offloaded weight are kept in CPU memory, those of a resident one on its device."""
    from prunelab.models.placement import input_device, live_parameters

    names_of = {id(p): n for n, p in model.named_parameters()}
    keyed = {k: names_of[id(p)] for k, p in params.items()}
    # where each sum lives: an offloaded weight's (meta here) in CPU memory, not on the execution
    # device that each forward borrows (a GPU would otherwise hold fp32 sums of every offloaded weight)
    home = {k: torch.device("cpu") if p.device.type == "meta" else None for k, p in params.items()}
    wanted = set(keyed.values())
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    device = input_device(model)
    n = calibration.shape[0]
    g: dict = {}
    f: dict | None = {} if fisher else None
    order = list(params)
    losses = []  # on the device: checked once after the loop, not synced per batch
    try:
        with live_parameters(model, sorted(wanted)) as live:
            step = 1 if fisher else micro_batch
            for i in bar(range(0, n, step), desc="calibration gradients", leave=False):
                x = calibration[i : i + step].to(device)
                loss = model(input_ids=x, labels=x).loss
                losses.append(loss.detach())
                grads = torch.autograd.grad(loss, [live[keyed[k]] for k in order])
                for k, gr in zip(order, grads, strict=True):
                    gr = gr.float().to(home[k] or gr.device)
                    if k not in g:
                        g[k] = torch.zeros_like(gr)
                        if f is not None:
                            f[k] = torch.zeros_like(gr)
                    g[k] += gr * (x.shape[0] / n)  # mean over samples of per-sample mean losses
                    if f is not None:
                        f[k] += gr.pow(2) / n
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved.get(name, False))
        model.train(was_training)
    bad = (~torch.isfinite(torch.stack(losses))).nonzero().flatten().tolist()
    if bad:
        first = bad[0] * step
        raise NonFiniteError(
            f"calibration (gradients of the LM loss for importance): the loss of calibration sequences "
            f"{first}-{min(first + step, n) - 1} of {n} is {float(losses[bad[0]])} ({len(bad)} of "
            f"{len(losses)} batches non-finite), so no importance can be computed from them; {DTYPE_HINT}"
        )
    return g, f


# `vector` scores: null = |Σ w·g| per channel (a row of q/k/v/gate/up, a column of o/down),
# then summed over the structure's channels — the official LLM-Pruner code; "slice" = one
# |Σ w·g| over the structure's whole slice of each member (prunelab before issue 18).
VECTOR_REDUCTIONS = (None, "slice")


def channel_sums(x: torch.Tensor, m) -> torch.Tensor:
    """[n groups, width]: Σ of ``x`` over each channel of each group of member ``m`` (a row's
    inputs for dim 0, a column's outputs for dim 1; a bias entry is its own channel)."""
    x = member_part(x, m)  # a part of a fused linear (Phi-3's qkv_proj): its slice
    if x.dim() == 1:
        return x.view(-1, m.width)
    if m.dim == 0:
        return x.view(-1, m.width, x.shape[1]).sum(2)
    return x.view(x.shape[0], -1, m.width).sum(0)


class TaylorImportance:
    needs_calibration = True

    def __init__(
        self,
        kind: str = "element1",
        aggregation: str = "sum",
        micro_batch: int = 8,
        vector: str | None = None,
    ) -> None:
        if kind not in TAYLOR_KINDS:
            raise ValueError(f"kind={kind!r} not in {TAYLOR_KINDS}")
        if vector not in VECTOR_REDUCTIONS:
            raise ValueError(f"vector={vector!r} not in {VECTOR_REDUCTIONS}")
        self.kind = kind
        self.vector = vector
        self.aggregation = aggregation
        self.micro_batch = micro_batch

    def salience(self, w: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        """Element-wise salience (signed for ``vector``, whose abs is taken after the group sum)."""
        w = w.detach().float()
        if self.kind == "element1":
            return (w * g).abs()
        if self.kind == "vector":
            return w * g
        wfw = w * f * w
        if self.kind == "second":
            return wfw.abs()
        return (w * g - 0.5 * wfw).abs()  # element2

    def scores(
        self, model: nn.Module, arch: ArchInfo, units: list[Unit], calibration: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if calibration is None:
            raise ValueError("Taylor importance needs calibration sequences")
        from prunelab.models.placement import materialized

        params = _targets(model, arch, units)
        g, f = gradient_stats(
            model, params, calibration, self.kind in ("element2", "second"), self.micro_batch
        )
        out = {}
        for unit in units:
            # a dispatched model: the unit's offloaded weights, read only, for w in the salience
            root = model if unit.layer is None else decoder_layers(model)[unit.layer]
            with materialized(root, "cpu" if unit.layer is None else None, write_back=False):
                names = {id(p): n for n, p in model.named_parameters()}
                per_member = []
                for m, t in iter_unit_members(model, arch, unit):
                    k = names[id(t)]
                    sal = self.salience(t, g[k].to(t.device), f[k].to(t.device) if f else None)
                    if self.kind == "vector" and self.vector is None:
                        per_member.append(channel_sums(sal, m).abs().sum(1))
                    else:
                        s = grouped(sal, m).sum(1)
                        per_member.append(s.abs() if self.kind == "vector" else s)
                out[unit.key] = aggregate(per_member, self.aggregation).cpu()
        return out
