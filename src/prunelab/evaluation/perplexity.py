"""Perplexity with the papers' protocol: the split's text concatenated, cut into
non-overlapping windows of ``seq_len`` tokens, exp(mean token NLL). (Not lm-eval's
word perplexity, which is a different number.)"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunelab.progress import bar


def next_token_nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Σ −log p(ids[:, t+1] | ids[:, ≤t]) over a batch of windows, in fp32."""
    logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1).to(logits.device), reduction="sum"
    ).item()


@torch.no_grad()
def window_nll(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 16,
    max_windows: int | None = None,
    progress: str | None = None,
) -> float:
    """Mean next-token NLL over non-overlapping windows of ``seq_len`` tokens."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows:
        n = min(n, max_windows)
    windows = ids[: n * seq_len].view(n, seq_len)
    from prunelab.models.placement import input_device

    device = input_device(model)  # a dispatched model: where accelerate sends its inputs
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in bar(range(0, n, batch_size), desc=progress, disable=progress is None, leave=False):
        batch = windows[i : i + batch_size].to(device)
        total += next_token_nll_sum(model(input_ids=batch).logits, batch)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, **kw) -> float:
    return math.exp(window_nll(model, ids, seq_len, **kw))
