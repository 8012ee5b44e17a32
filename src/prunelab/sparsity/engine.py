"""The sequential block-by-block calibration engine of the layer-wise methods.

1. Capture the inputs of decoder block 0 for every calibration sequence (a pre-hook stops
   the forward there, so nothing after the embeddings runs).
2. For each block: hooks on its linear layers accumulate input statistics (Σx² per column,
   or XᵀX in fp32), each linear is handed to the solver, then the *pruned* block runs on
   the same inputs to produce the next block's inputs.

Held at once: the activations of one block for all calibration sequences and the
statistics of one block (q/k/v share one, gate/up share one). The model may stay on the CPU:
each block moves to ``device`` while it is processed and goes back afterwards, so a model
larger than the accelerator can be pruned on it one block at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelab.sparsity.solvers import InputStats, reconstruction_error

# LLaMA-family linear layers by the input they read: layers reading one input share its stats.
SITES = {
    "q_proj": ("self_attn.q_proj", "attn_in"),
    "k_proj": ("self_attn.k_proj", "attn_in"),
    "v_proj": ("self_attn.v_proj", "attn_in"),
    "o_proj": ("self_attn.o_proj", "o_in"),
    "gate_proj": ("mlp.gate_proj", "mlp_in"),
    "up_proj": ("mlp.up_proj", "mlp_in"),
    "down_proj": ("mlp.down_proj", "down_in"),
}
LINEARS = tuple(SITES)

# solve(module name, fp32 weight, stats or None) -> (new weight, keep-mask, info)
Solve = Callable[[str, torch.Tensor, InputStats | None], tuple[torch.Tensor, torch.Tensor, dict]]


class _Captured(Exception):
    """Raised by the block-0 pre-hook: the rest of the forward is not needed."""


def _device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the duration, then back where each was."""
    homes = [_device_of(m) for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes, strict=True):
            m.to(home)


def _batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [calibration[i : i + batch_size] for i in range(0, calibration.shape[0], batch_size)]


@torch.no_grad()
def capture_inputs(
    model: nn.Module, calibration: torch.Tensor, device: torch.device, batch_size: int = 8
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Block 0's hidden states and keyword arguments (positions, rotary, mask) per batch."""
    inner = model.model
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(module, args, kw):
        hs = args[0] if args else kw["hidden_states"]
        inputs.append(hs.detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    first = inner.layers[0]
    stem = [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with on_device(stem, device):
            for batch in _batches(calibration, batch_size):
                with contextlib.suppress(_Captured):
                    model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return inputs, kwargs


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict[str, Any]]
) -> list[torch.Tensor]:
    outs = []
    for x, kw in zip(inputs, kwargs, strict=True):
        out = block(x, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def propagate(
    model: nn.Module, calibration: torch.Tensor, device: torch.device, batch_size: int = 8
) -> list[torch.Tensor]:
    """The last block's outputs, block by block as the engine computes them (for checks)."""
    inputs, kwargs = capture_inputs(model, calibration, device, batch_size)
    for block in model.model.layers:
        with on_device([block], device):
            inputs = run_block(block, inputs, kwargs)
    return inputs


@torch.no_grad()
def prune_layerwise(
    model: nn.Module,
    calibration: torch.Tensor | None,
    solve: Solve,
    layers: list[int],
    modules: tuple[str, ...] | list[str],
    gram: bool,
    device: torch.device,
    batch_size: int = 8,
    errors: bool = False,
    desc: str = "layer-wise",
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Prune ``modules`` of each block in ``layers``; weights are updated in place.

    Returns keep-masks by parameter name (``model.layers.3.mlp.up_proj.weight``) and a
    per-layer report (sparsity; relative reconstruction error when ``errors``).
    ``calibration=None`` (data-free solvers) skips the forward passes entirely.
    """
    blocks = model.model.layers
    masks: dict[str, torch.Tensor] = {}
    report: dict[str, dict] = {}
    inputs = kwargs = None
    if calibration is not None:
        inputs, kwargs = capture_inputs(model, calibration, device, batch_size)
    last = max(layers)
    todo = set(layers)
    for i in tqdm(range(last + 1), desc=desc, unit="block", leave=False):
        block = blocks[i]
        with on_device([block], device):
            if i in todo:
                stats: dict[str, InputStats] = {}
                hooks = []
                if inputs is not None:
                    for name in modules:
                        path, site = SITES[name]
                        if site in stats:
                            continue
                        lin = block.get_submodule(path)
                        stats[site] = InputStats(lin.in_features, gram or errors, device)
                        hooks.append(lin.register_forward_hook(lambda m, a, o, s=stats[site]: s.add(a[0])))
                    try:
                        run_block(block, inputs, kwargs)
                    finally:
                        for h in hooks:
                            h.remove()
                for name in modules:
                    path, site = SITES[name]
                    lin = block.get_submodule(path)
                    st = stats.get(site)
                    w = lin.weight.detach().float()
                    if errors:
                        w = w.clone()  # .float() of an fp32 weight is the weight itself
                    new, keep, info = solve(name, w, st)
                    lin.weight.copy_(new.to(lin.weight.dtype))
                    key = f"model.layers.{i}.{path}.weight"
                    masks[key] = keep.cpu()
                    entry = {"sparsity": 1.0 - keep.sum().item() / keep.numel(), **info}
                    if errors and st is not None:
                        entry["rel_error"] = reconstruction_error(w, lin.weight.detach().float(), st)
                    report[key] = entry
                del stats
            if inputs is not None and i < last:  # the pruned block feeds the next one
                inputs = run_block(block, inputs, kwargs)
    return masks, report
