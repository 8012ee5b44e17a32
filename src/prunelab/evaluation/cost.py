"""Cost of a model: parameters, MACs for a fixed input, memory, prefill and decode speed.

MACs count every linear layer (weights × tokens, lm_head included) plus the attention
products QKᵀ and A·V over the full ``seq_len × seq_len`` score matrix, for batch 1.
Memory: the weights' bytes, the process's peak RSS (CPU; process-wide, so it only grows)
and the peak allocated CUDA memory of one prefill (GPU).
"""

from __future__ import annotations

import math
import platform
import resource
import statistics
import sys
import time

import torch
from torch import nn

from prunelab.structure import arch_info
from prunelab.structure.arch import SUPPORTED_MODEL_TYPES
from prunelab.structure.groups import base_model


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = base_model(model).get_input_embeddings().weight.numel()
    return {"parameters": total, "non_embedding_parameters": total - embed}


def macs(model: nn.Module, seq_len: int) -> int:
    """Linear-layer MACs plus the attention products (QKᵀ and AV, full causal-free count) of
    a forward over ``seq_len`` tokens. Families without prunelab structure: the config's
    uniform head count (sliding-window layers counted as full ones)."""
    config = base_model(model).config
    if getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES:
        arch = arch_info(config)
        heads, head_dim = [s.num_attention_heads for s in arch.layers], arch.head_dim
    else:
        heads = [config.num_attention_heads] * config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    attention = sum(2 * h * head_dim * seq_len * seq_len for h in heads)
    return linear * seq_len + attention


def peak_rss_mb() -> float:
    """The process's lifetime peak RSS in MiB (ru_maxrss: bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _inputs(model: nn.Module, seq_len: int, batch_size: int, vocab: int | None) -> torch.Tensor:
    vocab = vocab or base_model(model).config.vocab_size
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(_input_device(model))


def _input_device(model: nn.Module) -> torch.device:
    from prunelab.models.placement import input_device

    return input_device(model)


def _timer(device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    return timed


def _generate(model: nn.Module, prompt: torch.Tensor, tokens: int) -> None:
    model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=base_model(model).config.pad_token_id or 0,
    )


@torch.no_grad()
def compare_speed(
    models: dict[str, nn.Module],
    seq_len: int = 128,
    batch_size: int = 1,
    decode_tokens: int = 32,
    repeats: int = 5,
    min_sample_s: float = 0.2,
    vocab: int | None = None,
) -> dict[str, dict[str, float]]:
    """Prefill tokens/s and decode ms/token of several models (dense and pruned, say),
    measured interleaved — A, B, A, B, … — so the drifts of a shared machine fall on all of
    them alike. One prefill sample repeats the forward until it lasts ``min_sample_s``; the
    median of ``repeats`` samples is reported."""
    first = next(iter(models.values()))
    x = _inputs(first, seq_len, batch_size, vocab)
    timed = _timer(x.device)
    prompt = x[:1, :16]
    reps = {}
    for name, m in models.items():
        m.eval()
        m(input_ids=x)  # warm-up
        _generate(m, prompt, 2)
        reps[name] = max(1, math.ceil(min_sample_s / max(timed(lambda m=m: m(input_ids=x)), 1e-6)))
    prefill: dict[str, list[float]] = {n: [] for n in models}
    decode: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(repeats):
        for name, m in models.items():
            k = reps[name]
            prefill[name].append(timed(lambda m=m, k=k: [m(input_ids=x) for _ in range(k)]) / k)
            decode[name].append(timed(lambda m=m: _generate(m, prompt, decode_tokens)) / decode_tokens)
    return {
        n: {
            "prefill_tokens_per_s": batch_size * seq_len / statistics.median(prefill[n]),
            "decode_ms_per_token": 1000 * statistics.median(decode[n]),
            "prefill_spread": (max(prefill[n]) - min(prefill[n])) / statistics.median(prefill[n]),
        }
        for n in models
    }


@torch.no_grad()
def measure_cost(
    model: nn.Module,
    seq_len: int = 128,
    batch_size: int = 1,
    decode_tokens: int = 32,
    repeats: int = 3,
    vocab: int | None = None,
) -> dict[str, float | str]:
    x = _inputs(model, seq_len, batch_size, vocab)
    device = x.device
    timed = _timer(device)
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model(input_ids=x)  # warm-up
    prefill = [timed(lambda: model(input_ids=x)) for _ in range(repeats)]
    prompt = x[:1, :16]
    decode = [timed(lambda: _generate(model, prompt, decode_tokens)) / decode_tokens for _ in range(repeats)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {
        **count_params(model),
        "macs": macs(model, seq_len),
        "weights_mb": weight_bytes / 2**20,
        "peak_rss_mb": peak_rss_mb(),
        "prefill_tokens_per_s": batch_size * seq_len / statistics.median(prefill),
        "decode_ms_per_token": 1000 * statistics.median(decode),
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    # Speed depends on where and when it was measured: say so, so that a cached dense number
    # is never read as a paired comparison with a pruned one measured later (prunelab-bench
    # interleaves both in one process for that).
    out["measured_on"] = hardware(device)
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return out


def hardware(device: torch.device) -> str:
    """``cuda:0 NVIDIA H200`` / ``cpu <processor>, <n> threads``."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{device.type} {name}, {torch.get_num_threads()} threads"
