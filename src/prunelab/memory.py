"""Peak-memory plan of a run, from its config and the model's config.json alone.

What each stage holds at once on its device — the model's weights, the method's statistics,
gradients, optimizer state and activations — summed into a peak per stage, as
``docs/performance.md``'s memory model does by hand for LLaMA-7B and LLaMA-2-70B. ``dry_run``
prints it when the model's config.json is readable without a download, and every run checks
it before the weights load: a stage that cannot fit its device is refused with the options
that would make it fit.

Estimates, not measurements: the lines are the large tensors (sizes exact from the shapes),
not the allocator's slack, framework buffers or attention kernels' workspaces (sdpa holds no
T×T matrix). ``tests/unit/test_memory.py`` checks the lines against the hand-computed table
and the engine's activation store against what it really allocates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# LLM-Pruner importances that back-propagate (first order: a mean gradient; second: + Fisher)
GRADIENT_IMPORTANCE = {"element1": 1, "vector": 1, "element2": 2, "second": 2}
LORA_METHODS = ("loraprune", "lorashear", "atp")
GRAM_SOLVERS = ("sparsegpt", "admm")
# saved-for-backward bytes per token per hidden unit of one decoder layer in 16-bit training
# (Korthikanti et al. 2022, sdpa: no T×T scores): the README's "≈ L·T·34·h bytes" per sequence
ACT_BYTES_PER_TOKEN_HIDDEN = 34


@dataclass(frozen=True)
class Shapes:
    """The sizes memory depends on (a decoder-only transformer's config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: Any) -> Shapes:
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            hidden=hidden,
            intermediate=int(config.intermediate_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one block."""
        h, i, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears.values()) + 2 * self.hidden  # + two norms

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.block_params + embed * (1 if self.tied else 2) + self.hidden

    def lora_params(self, r: int, modules: list[str] | None = None) -> int:
        wanted = self.linears if not modules else {m: self.linears[m] for m in modules if m in self.linears}
        return self.layers * sum(r * (a + b) for a, b in wanted.values())


@dataclass
class Stage:
    """One stage's large tensors on one device: (what, bytes) lines and their sum."""

    name: str
    device: str
    lines: list[tuple[str, int]] = field(default_factory=list)
    host: list[tuple[str, int]] = field(default_factory=list)  # held in CPU RAM while on an accelerator
    capacity: int | None = None  # this device's memory, where it is not the run's one device (device maps)

    def add(self, what: str, n_bytes: float) -> None:
        self.lines.append((what, int(n_bytes)))

    @property
    def peak(self) -> int:
        return sum(b for _, b in self.lines)


def _get(node: Any, key: str, default: Any = None) -> Any:
    try:
        value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    except Exception:  # an interpolation that cannot resolve here (e.g. ${seed} outside a run)
        return default
    return default if value is None else value


def _fraction_pruned_layers(method: Any, layers: int) -> int:
    """Layers a structured method scores (keep_first/keep_last as fractions or counts)."""

    def count(v: Any) -> int:
        if v is None:
            return 0
        v = float(v)
        return math.ceil(v * layers) if 0 < v < 1 else int(v)

    return max(
        0, layers - count(_get(method, "keep_first_layers", 0)) - count(_get(method, "keep_last_layers", 0))
    )


def _eval_stage(name: str, s: Shapes, wbytes: int, ev: Any, device: str) -> Stage:
    st = Stage(name, device)
    st.add("model weights", s.params * wbytes)
    ppl = _get(ev, "perplexity", {}) or {}
    zs = _get(ev, "zeroshot", {}) or {}
    tokens = max(
        int(_get(ppl, "batch_size", 16)) * int(_get(ppl, "seq_len", 128)),
        int(_get(zs, "batch_size", 32)) * int(_get(zs, "max_length", 256)) if _get(zs, "tasks") else 0,
    )
    # the logits of a batch (model dtype) and their fp32 copy for the loss / log-softmax
    st.add("logits of one evaluation batch (+ fp32 copy)", tokens * s.vocab * (wbytes + 4))
    st.add("one layer's activations of a batch (MLP intermediates)", 3 * tokens * s.intermediate * wbytes)
    return st


def _train_lines(st: Stage, s: Shapes, wbytes: int, train: Any, params: int) -> None:
    r = int(_get(train, "r", 8))
    lora = s.lora_params(r, list(_get(train, "target_modules", []) or []))
    micro = int(_get(train, "micro_batch_size", 1))
    T = int(_get(train, "cutoff_len", 256))
    st.add("model weights (frozen)", params * wbytes)
    st.add(f"LoRA r {r}: weights + gradients + Adam moments, fp32", lora * 4 * 4)
    if _get(train, "gradient_checkpointing", False):
        st.add(
            f"layer inputs kept for recomputation ({micro} × {T} tokens) + one layer's internals",
            micro * T * s.hidden * (s.layers * wbytes + ACT_BYTES_PER_TOKEN_HIDDEN),
        )
    else:
        st.add(
            f"activations saved for backward ({micro} × {T} tokens, ≈ L·T·34·h bytes each)",
            micro * T * s.layers * s.hidden * ACT_BYTES_PER_TOKEN_HIDDEN,
        )
    st.add("logits and their gradient, fp32", micro * T * s.vocab * 8)


def plan_memory(cfg: Any, config: Any, device: str = "cpu", built: Any = None) -> list[Stage]:
    """The stages of the run ``cfg`` on a model with ``config`` (its config.json), each with the
    large tensors it holds at once on ``device`` (``cpu``, ``cuda``, ``cuda:N``). ``built``: the
    method object ``validate`` built (which recovery runs after it); without it, the
    ``recovery`` group's."""
    s = Shapes.from_config(config)
    wbytes = DTYPE_BYTES.get(str(_get(cfg.model, "dtype", "float32")), 4)
    method = cfg.method
    name = str(_get(method, "name", ""))
    cal = _get(cfg.data, "calibration", {}) or {}
    n = int(_get(method, "calibration_samples", 0) or _get(cal, "num_samples", 0) or 0)
    T = int(_get(method, "calibration_seq_len", 0) or _get(cal, "seq_len", 0) or 0)
    stages = []
    ev = cfg.eval
    if _get(ev, "dense", True):
        stages.append(_eval_stage("dense evaluation", s, wbytes, ev, device))
    prune = Stage(f"prune ({name})", device)
    stages.append(prune)
    if name in ("magnitude", "wanda", *GRAM_SOLVERS):
        offload = bool(_get(method, "offload", False)) and not device.startswith("cpu")
        if offload:
            prune.add("one decoder block (the model stays in CPU RAM)", s.block_params * wbytes)
            prune.host.append(("model weights", s.params * wbytes))
        else:
            prune.add("model weights", s.params * wbytes)
        if name != "magnitude":
            b = int(_get(method, "batch_size", 8))
            h, i = s.hidden, s.intermediate
            where = str(_get(method, "activations", "auto"))
            need = 2 * n * T * h * wbytes
            if where == "auto":
                where = (
                    "memory" if need / MiB <= float(_get(method, "activation_budget_mb", 4096)) else "disk"
                )
            if where == "memory":
                prune.add(f"calibration activations in memory (inputs + outputs, 2·{n}·{T}·{h})", need)
            else:
                prune.add(
                    f"calibration activations on disk: one batch of {b} in + out", 2 * b * T * h * wbytes
                )
            q = s.heads * s.head_dim
            if name in GRAM_SOLVERS:
                prune.add(
                    "input statistics of one block (XᵀX fp32: q/k/v, o, gate/up, down)",
                    (2 * h * h + q * q + i * i) * 4,
                )
                copies = 3 if name == "admm" else 1  # ADMM: W, Z and U; SparseGPT: W
                inverses = (
                    2 if name == "admm" else 1
                )  # ADMM: XᵀX and (XᵀX + ρI)⁻¹; SparseGPT: its Cholesky factor
                big_in, big_out = max(s.linears.values(), key=lambda io: io[0] * io[0] + io[0] * io[1])
                prune.add(
                    f"solver working set ({copies} fp32 weight(s) + {inverses} factorised XᵀX, largest layer)",
                    (copies * big_in * big_out + inverses * big_in * big_in) * 4,
                )
            else:
                prune.add("input norms of one block (fp32)", (2 * h + q + i) * 4)
            prune.add(f"one batch inside a block (MLP intermediates 3·{b}·{T}·{i})", 3 * b * T * i * wbytes)
    elif name == "llm_pruner":
        prune.add("model weights", s.params * wbytes)
        order = GRADIENT_IMPORTANCE.get(str(_get(method, "importance", "")), 0)
        if order:
            layers = _fraction_pruned_layers(method, s.layers)
            grads = layers * s.block_params
            prune.add(
                f"fp32 mean gradient of the prunable weights ({layers} of {s.layers} layers)", grads * 4
            )
            prune.add("autograd gradients of one micro-batch (model dtype)", grads * wbytes)
            if order == 2:
                prune.add("fp32 Fisher diagonal (second order)", grads * 4)
            micro = int(_get(method, "micro_batch", 8))
            prune.add(
                f"activations saved for backward ({micro} × {T} tokens)",
                micro * T * s.layers * s.hidden * ACT_BYTES_PER_TOKEN_HIDDEN,
            )
            prune.add("logits and their gradient, fp32", micro * T * s.vocab * 8)
    elif name in LORA_METHODS:
        _train_lines(prune, s, wbytes, _get(method, "train", {}), s.params)
    else:  # structured (l1), random: the model and its weight norms
        prune.add("model weights", s.params * wbytes)
    ratio = float(_get(cfg, "ratio", 0) or 0)
    sparse = name in ("magnitude", "wanda", *GRAM_SOLVERS)
    after = s.params if sparse else int(s.params * (1 - ratio))  # structured: the requested share left
    train = None  # the LoRA training after pruning, as the runner's choose_recovery decides
    if built is not None and built.has_own_recovery:
        train = _get(method, "train", {}) if built.recovers else None
    elif built is not None and built.trains and not built.then_recover:
        train = None
    elif str(_get(_get(cfg, "recovery", {}), "name", "none")) != "none":
        train = cfg.recovery
    if train is not None:
        rec = Stage("LoRA recovery", device)
        _train_lines(rec, s, wbytes, train, after)
        stages.append(rec)
    ev_pruned = _eval_stage("pruned/recovered evaluation", s, wbytes, ev, device)
    ev_pruned.lines[0] = ("model weights (pruned)", after * wbytes)
    stages.append(ev_pruned)
    return stages


def capacity(device: str) -> int | None:
    """Total memory of ``device`` in bytes (CPU: physical RAM), None when it cannot be known."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    if device.startswith("cpu"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def fmt(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= GiB / 10 else f"{n_bytes / MiB:.1f} MiB"


def report(stages: list[Stage], total: int | None) -> str:
    """The plan as text: each stage's lines and peak, against the device's memory."""
    out = []
    for st in stages:
        of = f" of {fmt(st.capacity)}" if st.capacity is not None else ""
        out.append(f"{st.name} on {st.device}: peak ≈ {fmt(st.peak)}{of}")
        out += [f"    {fmt(b):>11}  {what}" for what, b in st.lines]
        out += [f"    {fmt(b):>11}  {what} (host RAM)" for what, b in st.host]
    if total is not None:
        out.append(f"device memory: {fmt(total)}")
    return "\n".join(out)


def suggestions(stage: Stage, cfg: Any) -> list[str]:
    """What would shrink ``stage``: the options its largest lines answer to."""
    name = str(_get(cfg.method, "name", ""))
    tips = []
    text = " ".join(w for w, _ in stage.lines)
    if stage.name.startswith("prune") and name in ("wanda", *GRAM_SOLVERS, "magnitude"):
        if not stage.device.startswith("cpu"):  # offloading from the CPU to the CPU saves nothing
            tips.append("method.offload=true (the model in CPU RAM, one block at a time on the device)")
        if "in memory" in text:
            tips.append(
                "method.activations=disk (calibration activations streamed through safetensors files)"
            )
    if "activations saved for backward" in text:
        tips.append(
            "gradient checkpointing (recovery.gradient_checkpointing=true / method.train.gradient_checkpointing=true)"
        )
        tips.append(
            "a smaller micro batch (recovery.micro_batch_size / method.train.micro_batch_size / method.micro_batch)"
        )
    if _get(cfg.model, "device_map") is None and "model weights" in text and "evaluation" in stage.name:
        tips.append(
            "model.device_map=auto (the model spread over the GPUs, then CPU, then disk; model.max_memory)"
        )
    if _get(cfg.model, "device_map") is not None:
        tips.append(
            "a smaller model.max_memory share on this device (the rest goes to the next device, then disk)"
        )
    if "Fisher" in text:
        tips.append("a first-order importance (method.importance=element1)")
    if "evaluation" in stage.name:
        tips.append("smaller evaluation batches (eval.perplexity.batch_size, eval.zeroshot.batch_size)")
    tips.append(
        "model.dtype=bfloat16 or float16 (half the weights)"
        if "float32" in str(_get(cfg.model, "dtype"))
        else "a device with more memory"
    )
    return tips


def check_fits(stages: list[Stage], total: int | None, cfg: Any) -> list[str]:
    """One problem per stage whose estimated peak exceeds ``total`` bytes."""
    problems = []
    for st in stages:
        cap = st.capacity if st.capacity is not None else total
        if cap is not None and st.peak > cap:
            big = max(st.lines, key=lambda line: line[1])
            problems.append(
                f"{st.name} needs ≈ {fmt(st.peak)} on {st.device}, which has {fmt(cap)} "
                f"(largest: {big[0]}, {fmt(big[1])}); options: " + "; ".join(suggestions(st, cfg))
            )
    return problems


def check_memory(cfg: Any, config: Any, built: Any = None) -> tuple[list[Stage], int | None, list[str]]:
    """(stages, the memory allowed, problems) for the run ``cfg`` on its device: the allowed
    memory is ``memory_limit_gib`` where set, else the device's total (CPU: physical RAM)."""
    import torch

    device = str(_get(cfg, "device", "auto"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    stages = plan_memory(cfg, config, device, built)
    limit = _get(cfg, "memory_limit_gib", None)
    if _get(cfg.model, "device_map") is not None:
        stages = split_by_device(cfg, config, stages)
        for st in stages:
            st.capacity = int(float(limit) * GiB) if limit is not None else capacity(st.device)
        return stages, None, check_fits(stages, None, cfg)
    total = int(float(limit) * GiB) if limit is not None else capacity(device)
    return stages, total, check_fits(stages, total, cfg)


def weights_by_device(cfg: Any, config: Any) -> tuple[dict[str, int], int]:
    """(bytes of weights per device — ``cpu``, ``cuda:N``, ``disk`` — under ``model.device_map``,
    the largest module accelerate offloads), from a meta-device model built from config.json:
    the map accelerate itself would compute (``models.placement.device_map_for``)."""
    import torch
    from accelerate.utils import compute_module_sizes
    from omegaconf import DictConfig, OmegaConf

    from prunelab.models.loading import DTYPES
    from prunelab.models.placement import device_map_for
    from prunelab.sparsity.blocks import meta_model

    def plain(v: Any) -> Any:
        return OmegaConf.to_container(v) if isinstance(v, DictConfig) else v

    dtype = DTYPES.get(str(_get(cfg.model, "dtype", "float32")), torch.float32)
    model = meta_model(config)
    explicit = device_map_for(model, plain(cfg.model.device_map), plain(_get(cfg.model, "max_memory")), dtype)
    sizes = compute_module_sizes(model, dtype=dtype)
    out: dict[str, int] = {}
    for name, dev in explicit.items():
        where = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        out[where] = out.get(where, 0) + int(sizes.get(name, 0))
    # what accelerate materializes at once: one offloaded module (a decoder block at most)
    block = max((int(v) for k, v in sizes.items() if k.count(".") == 2 and ".layers." in k), default=0)
    offloaded = [int(sizes.get(n, 0)) for n, d in explicit.items() if d in ("cpu", "disk")]
    return out, min(max(offloaded, default=0), block or max(offloaded, default=0))


def split_by_device(cfg: Any, config: Any, stages: list[Stage]) -> list[Stage]:
    """The one-device plan of a dispatched model, per device: each device holds the weights
    the map puts there; the main device (the map's first GPU, else the CPU) also holds the
    stage's working set (statistics, activations, logits) and, when modules are offloaded,
    the one module accelerate materializes at a time; disk holds no memory. Structured removal
    and saving materialize the whole model on the CPU (``models/placement.py``)."""
    from omegaconf import DictConfig, OmegaConf

    from prunelab.models.placement import main_device

    dm = cfg.model.device_map
    main = str(main_device(OmegaConf.to_container(dm) if isinstance(dm, DictConfig) else dm))
    split, unit = weights_by_device(cfg, config)
    total = sum(split.values())
    offloaded = any(d == "disk" or (d == "cpu" and main != "cpu") for d in split)
    method = str(_get(cfg.method, "name", ""))
    sparse = method in ("magnitude", "wanda", *GRAM_SOLVERS)
    out: list[Stage] = []
    for st in stages:
        weights = [b for what, b in st.lines if what.startswith("model weights")]
        share = weights[0] / total if weights and total else 1.0  # the pruned model: its share of the dense
        rest = [(w, b) for w, b in st.lines if not w.startswith(("model weights", "one decoder block"))]
        for dev in sorted({*split, main} - {"disk"}):
            d = Stage(st.name, dev)
            if split.get(dev):
                d.add(f"model weights placed on {dev} (model.device_map)", split[dev] * share)
            if dev == main:
                if offloaded:
                    d.add("one offloaded module materialized at a time (accelerate's hooks)", unit)
                for what, b in rest:
                    d.add(what, b)
            if dev == "cpu" and st.name.startswith("prune (") and not sparse:
                d.add(
                    "structured removal and saving: the rest of the model materialized on the CPU",
                    total - split.get("cpu", 0),
                )
            out.append(d)
    return out
