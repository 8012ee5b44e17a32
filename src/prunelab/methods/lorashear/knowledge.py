"""LoRAShear's knowledge distribution analysis: which node groups hold knowledge the model
cannot afford to lose.

For every node group — each layer's attention, each layer's MLP — prune it *alone* at a few
ratios with a cheap proxy (magnitude scores of its heads / channels), measure the perplexity
deviation on a small held-out token set, and restore it exactly (the member slices are
copied before and written back after each probe). The ``gamma`` fraction of groups with the
largest mean deviation is marked unprunable. The paper leaves the ratios, the proxy and γ
open; prunelab's defaults (ratios 0.25 and 0.5, magnitude, γ = 0.25) are config keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from prunelab.evaluation.perplexity import next_token_nll_sum
from prunelab.importance import select_masks
from prunelab.importance.magnitude import MagnitudeImportance
from prunelab.models.placement import materialized
from prunelab.numerics import DTYPE_HINT, check_value
from prunelab.structure import ArchInfo, apply_masks, units
from prunelab.structure.groups import decoder_layers, iter_unit_members


@dataclass
class KnowledgeReport:
    base_ppl: float
    deviations: dict[str, dict[str, float]]  # unit key -> {ratio: ppl − base_ppl}
    score: dict[str, float]  # unit key -> mean deviation over the ratios
    unprunable: list[str]  # the gamma fraction with the largest score
    ratios: list[float]
    gamma: float

    def to_dict(self) -> dict:
        return asdict(self)


class PrefixCache:
    """The probe windows' hidden states at the input of the decoder blocks in ``starts``,
    from one dense pass, kept in CPU memory (one block input at a time goes to the device).
    A probe changes one layer only, so the blocks before it compute what they computed
    densely: each probe runs from its own layer on (half the model on average), not from
    the embeddings. ``nll(start)`` equals ``window_nll`` of the whole model, up to float
    rounding. Held: len(starts) × tokens × hidden values (LLaMA-7B, 8192 tokens: 64 MiB per
    layer in fp16)."""

    def __init__(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        seq_len: int,
        batch_size: int,
        starts: set[int] | None = None,
    ) -> None:
        from prunelab.sparsity.engine import ActivationStore, capture_inputs, run_block

        n = ids.numel() // seq_len
        if n == 0:
            raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
        from prunelab.models.placement import input_device

        self.model = model
        layers = model.model.layers
        starts = set(range(len(layers))) if starts is None else set(starts) | {0}
        device = input_device(model)  # a dispatched model: where accelerate sends its inputs
        self.windows = ids[: n * seq_len].view(n, seq_len)
        captured = capture_inputs(model, self.windows, device, batch_size)
        # each block's own keyword arguments (a sliding-window layer gets its own mask)
        self.kwargs = [captured.kwargs(i) for i in range(len(layers))]
        current = captured.store
        self.inputs: dict[int, list[torch.Tensor]] = {}
        for i in range(max(starts) + 1):
            if i in starts:
                self.inputs[i] = [x.to("cpu") for x in current]
            if i < max(starts):
                out = ActivationStore("memory", device)
                run_block(layers[i], current, self.kwargs[i], out)
                current = out
        self.batch_size = batch_size

    @torch.no_grad()
    def nll(self, start: int) -> float:
        """Mean next-token NLL with blocks ``start``… run on the cached inputs of ``start``."""
        from prunelab.models.placement import input_device

        inner = self.model.model
        device = input_device(self.model)  # (each block's hook moves its inputs where it computes)
        total, count = 0.0, 0
        for b, x in enumerate(self.inputs[start]):
            x = x.to(device)
            for i in range(start, len(inner.layers)):
                out = inner.layers[i](x, **self.kwargs[i][b])
                x = out[0] if isinstance(out, tuple) else out
            window = self.windows[b * self.batch_size : (b + 1) * self.batch_size]
            total += next_token_nll_sum(self.model.lm_head(inner.norm(x)), window)
            count += window[:, 1:].numel()
        return total / count


@torch.no_grad()
def knowledge_distribution(
    model: nn.Module,
    arch: ArchInfo,
    ids: torch.Tensor,
    seq_len: int = 128,
    ratios: tuple[float, ...] = (0.25, 0.5),
    gamma: float = 0.25,
    layers: list[int] | None = None,
    batch_size: int = 16,
    kinds: tuple[str, ...] = ("attn", "mlp"),
) -> KnowledgeReport:
    """Probe each (layer, attn|mlp) group alone on held-out token ids (1-D); the model comes
    back bit-identical."""
    was_training = model.training
    model.eval()
    todo = [u for u in units(arch, kinds) if layers is None or u.layer in layers]
    cache = PrefixCache(model, ids, seq_len, batch_size, {u.layer or 0 for u in todo})
    base = math.exp(cache.nll(0))
    layers_of = decoder_layers(model)
    deviations: dict[str, dict[str, float]] = {}
    for unit in todo:
        # a dispatched model: the probed layer's offloaded weights as real tensors, read only —
        # the probe's zeros live in this copy alone and are never written to the offload store
        with materialized(layers_of[unit.layer], write_back=False):
            scores = MagnitudeImportance().scores(model, arch, [unit])
            saved = [(t, t.detach().clone()) for _, t in iter_unit_members(model, arch, unit)]
            deviations[unit.key] = {}
            for r in ratios:
                k = min(unit.n - 1, max(1, round(r * unit.n)))
                apply_masks(model, select_masks({unit.key: scores[unit.key]}, {unit.key: k}), arch)
                deviations[unit.key][str(r)] = math.exp(cache.nll(unit.layer or 0)) - base
                for t, copy in saved:  # restore exactly before the next probe
                    t.copy_(copy)
    score = {k: sum(v.values()) / len(v) for k, v in deviations.items()}
    check_value(base, "lorashear knowledge analysis: the perplexity of the unpruned model", DTYPE_HINT)
    for k, v in score.items():  # which groups are unprunable is decided by sorting these
        check_value(v, f"lorashear knowledge analysis: the perplexity deviation of group {k}", DTYPE_HINT)
    n_keep = math.ceil(gamma * len(score) - 1e-9)
    unprunable = sorted(score, key=lambda k: -score[k])[:n_keep]
    model.train(was_training)
    return KnowledgeReport(base, deviations, score, unprunable, list(ratios), gamma)


def plot_knowledge(report: KnowledgeReport, path: str | Path) -> Path:
    """Bar chart of the mean perplexity deviation per layer, attention and MLP side by side;
    unprunable groups hatched. PNG."""
    from prunelab.plotting import pyplot, save_figure

    plt = pyplot()

    layers = sorted({int(k.split(".")[0]) for k in report.score})
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(layers) + 2), 3))
    for j, kind in enumerate(("attn", "mlp")):
        xs = [i + (j - 0.5) * 0.4 for i in layers]
        keys = [f"{i}.{kind}" for i in layers]
        bars = ax.bar(xs, [report.score.get(k, 0.0) for k in keys], width=0.4, label=kind)
        for b, k in zip(bars, keys, strict=True):
            if k in report.unprunable:
                b.set_hatch("//")
    vals = sorted(abs(v) for v in report.score.values())
    if vals and vals[-1] > 20 * max(vals[len(vals) // 2], 1e-9):  # one group dwarfs the rest: log scale
        ax.set_yscale("symlog", linthresh=max(vals[len(vals) // 2], 1e-3))
    ax.set_xlabel("layer")
    ax.set_ylabel("Δ perplexity (mean over ratios)")
    ax.set_title(f"knowledge distribution (base ppl {report.base_ppl:.2f}; hatched: unprunable)")
    ax.legend()
    return save_figure(fig, path)
