"""LoRA recovery after pruning (LLM-Pruner's recipe): fine-tune LoRA adapters on instruction
data with the prompt masked out of the loss, keep the adapter with the lowest validation
loss, merge it into the (possibly per-layer pruned) weights.

    prunelab recovery=lora recovery.data=alpaca_cleaned

    prunelab recovery=lora recovery.format=text     # plain next-token windows of the data's text

peft is used as it is (``get_peft_model`` / ``merge_and_unload``); it adapts each linear at
its own shape, so pruned models with per-layer shapes need nothing special. Outputs in the
stage directory: ``adapter/`` (the best adapter, safetensors) and ``history.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from prunelab import distributed
from prunelab.errors import ConfigError, NonFiniteError, bad_value
from prunelab.numerics import check_value, check_weights, loss_scaler
from prunelab.progress import bar as progress_bar

log = logging.getLogger(__name__)

# LLaMA-family linears (LLaMA 1/2/3, Vicuna, Mistral, Qwen2): the only names LoRA may target.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_targets(requested: tuple[str, ...], names: set[str]) -> tuple[list[str], list[str]]:
    """(the leaf names peft adapts, the requested names the model lacks). A name the model has
    only inside a fused projection (Phi-3: q_proj/k_proj/v_proj in qkv_proj, gate_proj/up_proj
    in gate_up_proj) becomes that projection when all of its parts are requested; with only
    some of them it is missing (one adapter cannot cover half a weight)."""
    from prunelab.sparsity.blocks import FUSED

    out: list[str] = []
    missing: list[str] = []
    for t in requested:
        fused = [f for f, parts in FUSED.items() if t in parts and f in names]
        if t in names:
            target = t
        elif fused and all(p in requested for p in FUSED[fused[0]]):
            target = fused[0]
        else:
            missing.append(t)
            continue
        if target not in out:
            out.append(target)
    return out, missing


IGNORE_INDEX = -100  # label value cross_entropy skips
# instruction: Alpaca prompt + answer, loss on the answer (the papers); text: plain next-token
# windows of the data's text (pretraining-style; what lowers corpus perplexity, e.g. embedded).
FORMATS = ("instruction", "text")
# Where LoRA dropout draws its masks: stream: torch's one generator, micro-batch after
# micro-batch (a single process; the historical default); micro_batch: a generator seeded by
# (seed, step, micro-batch index), so the masks do not depend on which process runs the
# micro-batch; null (the default): stream in one process, micro_batch in several. (A null
# default: run directories made before the key keep their identity.)
DROPOUT_RNG = ("stream", "micro_batch")


# what a non-finite training loss, gradient or merged weight usually needs
TRAIN_HINT = (
    "the training diverged: lower the learning rate (lr), keep max_grad_norm set, check the training "
    "data, or train a float16 model at model.dtype=bfloat16 / float32"
)
# float16 training: this many overflowing steps in a row mean no loss scale helps
MAX_OVERFLOW_STREAK = 20


class LossScaling:
    """What dynamic loss scaling did in a float16 training run: the steps it skipped because
    the scaled gradient overflowed (the scale halves each time); too many in a row stop the
    run (the gradient overflows at any scale: the training diverged)."""

    def __init__(self, prefix: str, steps: int) -> None:
        self.prefix, self.steps = prefix, steps
        self.skipped: list[int] = []
        self.streak = 0

    def update(self, step: int, scaler: torch.amp.GradScaler) -> None:
        """``scaler.update()`` after the step; a scale that went down means the step was skipped."""
        before = scaler.get_scale()
        scaler.update()
        overflow = scaler.get_scale() < before
        self.streak = self.streak + 1 if overflow else 0
        if overflow:
            self.skipped.append(step)
            log.info(
                "%s: step %d skipped (float16 gradient overflow); loss scale now %g",
                self.prefix,
                step,
                scaler.get_scale(),
            )
        if self.streak >= MAX_OVERFLOW_STREAK:
            raise NonFiniteError(
                f"{self.prefix} training: the float16 gradient overflowed at {self.streak} steps in a row "
                f"(to step {step}/{self.steps}; loss scale now {scaler.get_scale():g}); {TRAIN_HINT}"
            )

    def summary(self, scaler: torch.amp.GradScaler) -> dict[str, Any]:
        return {"skipped_steps": self.skipped, "final_scale": scaler.get_scale()}

    def state(self, scaler: torch.amp.GradScaler) -> dict[str, Any]:
        """For a training-state checkpoint: the scaler's scale and growth counter, and this record."""
        return {"scaler": scaler.state_dict(), "skipped": list(self.skipped), "streak": self.streak}

    def load_state(self, scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
        scaler.load_state_dict(state["scaler"])
        self.skipped, self.streak = list(state["skipped"]), int(state["streak"])


class Tracker(Protocol):
    def log(self, data: dict[str, Any], step: int) -> None: ...


@dataclass
class TrainHooks:
    """How methods that train while they prune (LoRAPrune, LoRAShear) hook into the loop.

    ``setup(peft_model)`` once after the adapters are attached; ``before_step(model, step,
    steps, micro_batches)`` before the step's forward (ATP's generator step on the same batch);
    ``after_backward(model, step,
    steps)`` with gradients present, before the optimizer step; ``after_step(model, step,
    steps)`` after it (projections that must see the updated weights); ``on_validation(step,
    losses)`` with the per-group validation losses; ``sample(step, n)`` the train indices of
    a step (default: epoch-wise permutations). The best adapter is chosen among validation
    points at steps >= ``select_from``.

    Resuming (``checkpoint_every``): ``state()`` returns the hooks' own training state (a
    tree of dicts, lists, scalars and tensors: masks, moving averages, a generator and its
    optimizer, random streams, data cursors) and ``load_state(tree)`` puts it back, after
    ``setup``; ``key`` (JSON-able) is what the hooks' behaviour depends on, part of the
    checkpoint's identity. Hooks that act per step without ``state`` make the training
    uncheckpointable (it starts over after a kill), never resumed wrong."""

    setup: Callable[[nn.Module], None] | None = None
    before_step: Callable[[nn.Module, int, int, list[dict[str, torch.Tensor]]], None] | None = None
    after_backward: Callable[[nn.Module, int, int], None] | None = None
    after_step: Callable[[nn.Module, int, int], None] | None = None
    on_validation: Callable[[int, dict[str, float]], None] | None = None
    sample: Callable[[int, int], list[int]] | None = None
    select_from: int = 0
    state: Callable[[], Any] | None = None
    load_state: Callable[[Any], None] | None = None
    key: Any = None

    @property
    def resumable(self) -> bool:
        """Whether a checkpoint can hold everything the hooks carry from step to step."""
        per_step = (self.before_step, self.after_backward, self.after_step, self.on_validation, self.sample)
        return self.state is not None or all(h is None for h in per_step)


Example = Mapping[str, str]
Feature = dict[str, list[int]]


# ----------------------------------------------------------------------------- data


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], cutoff_len: int, train_on_inputs: bool
) -> list[Feature]:
    """``{input_ids, labels}`` per instruction example (Alpaca template, eos appended).

    As LLM-Pruner: the full text is tokenized once and its first ``len(prompt tokens)``
    labels are masked unless ``train_on_inputs``; everything is truncated to ``cutoff_len``.
    """
    from prunelab.data.sources import alpaca_prompt, format_alpaca

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(texts: list[str]) -> list[list[int]]:
        out = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]  # one batched call
        # Tokenizers that add no BOS themselves (the embedded BPE) get it here, as token_ids does.
        return [[bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids for ids in out]

    fulls = encode([format_alpaca(e) for e in examples])
    prompts = encode([alpaca_prompt(e) for e in examples]) if not train_on_inputs else fulls
    feats = []
    for full, prompt in zip(fulls, prompts, strict=True):
        if eos is not None and full[-1] != eos:
            full = [*full, eos]
        full = full[:cutoff_len]
        labels = list(full)
        if not train_on_inputs:
            n_prompt = min(len(prompt), len(full))
            labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
        feats.append({"input_ids": full, "labels": labels})
    return feats


def tokenize_example(tokenizer: Any, example: Example, cutoff_len: int, train_on_inputs: bool) -> Feature:
    """One example's ``{input_ids, labels}`` (see ``tokenize_examples``)."""
    return tokenize_examples(tokenizer, [example], cutoff_len, train_on_inputs)[0]


def collate(features: Sequence[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding gets attention 0 and label -100."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer: Any) -> int:
    """The id right-padding uses: pad, else eos, else 0 (never a target: labels are -100)."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def eval_batches(features: Sequence[Feature], pad_id: int, size: int) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches of similar lengths (less padding; a token-weighted mean is order-free)."""
    by_len = sorted(features, key=lambda f: len(f["input_ids"]))
    return [collate(by_len[i : i + size], pad_id) for i in range(0, len(by_len), size)]


def target_count(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labels shifted by one (position t predicts t+1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token NLL over non-masked labels (callers divide by their token count)."""
    from prunelab.models.placement import input_device

    device = input_device(model)  # a dispatched model (model.device_map): its first module's device
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@torch.no_grad()
def group_losses(
    model: nn.Module, groups: Mapping[str, Sequence[Mapping[str, torch.Tensor]]], shard: bool = False
) -> tuple[float, dict[str, float]]:
    """Token-weighted mean loss over all batches and per group, in eval mode (no dropout).
    ``shard``: under several processes each evaluates every N-th batch and the summed losses
    and token counts are all-reduced (the same token-weighted mean on every process)."""
    was_training = model.training
    model.eval()
    rank, n = (distributed.rank(), distributed.num_processes()) if shard else (0, 1)
    sums = torch.zeros(len(groups), 2, dtype=torch.float64)  # (summed loss, target tokens) per group
    for g, batches in enumerate(groups.values()):
        for b in list(batches)[rank::n]:
            sums[g, 0] += float(loss_sum(model, b))
            sums[g, 1] += target_count(b)
    if n > 1:  # on the model's device: NCCL reduces GPU tensors only
        sums = distributed.all_sum(sums.to(next(model.parameters()).device)).cpu()
    model.train(was_training)
    per, total, count = {}, 0.0, 0.0
    for (t, c), name in zip(sums.tolist(), groups, strict=True):  # in order: as one process always summed
        per[name] = t / max(c, 1.0)
        total, count = total + t, count + c
    return total / max(count, 1.0), per


def mean_loss(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over batches, in eval mode (no dropout)."""
    return group_losses(model, {"all": batches})[0]


# ----------------------------------------------------------------------------- peft helpers


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable (LoRA) parameters."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, t in state.items():
        params[n].copy_(t)


@torch.no_grad()
def merge_lora(peft_model: nn.Module, check_batch: Mapping[str, torch.Tensor] | None = None):
    """``merge_and_unload`` into the base model (eval mode, frozen, no peft wrappers left).

    Returns ``(model, max_abs_diff)``: the largest logit difference between the adapter model
    and the merged model on ``check_batch`` (None without one).
    """
    from prunelab.models.placement import input_device, is_dispatched, materialized, offload_paused

    peft_model.eval()
    diff = None
    if check_batch is not None:
        device = input_device(peft_model)
        kw = {k: check_batch[k].to(device) for k in ("input_ids", "attention_mask")}
        before = peft_model(**kw, use_cache=False).logits.float()
    if is_dispatched(peft_model):
        # a dispatched model: each adapter merged into its base weights while they are loaded,
        # written back into accelerate's offload store (peft's own ``merge``, as
        # merge_and_unload calls it), then the wrappers removed with nothing loaded
        from peft.tuners.lora import LoraLayer

        for module in list(peft_model.modules()):
            if isinstance(module, LoraLayer):
                with materialized(module.get_base_layer()):
                    module.merge()
        with offload_paused(peft_model):
            model = peft_model.unload()
    else:
        model = peft_model.merge_and_unload()
    if check_batch is not None:
        after = model(**kw, use_cache=False).logits.float()
        real = kw["attention_mask"].bool()  # padded positions are never read
        diff = float((after - before).abs()[real].max())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, diff


@torch.no_grad()
def remask(
    model: nn.Module, keep_masks: Mapping[str, torch.Tensor], check_batch: Mapping[str, torch.Tensor]
) -> dict:
    """Zero the merged weights outside ``keep_masks`` (LoRA's dense update fills them in);
    report how many merged weights that zeroed and how much it moved the logits."""
    from prunelab.models.placement import input_device, materialized, offloaded_units
    from prunelab.sparsity.checkpoint import apply_weight_masks

    device = input_device(model)
    kw = {k: check_batch[k].to(device) for k in ("input_ids", "attention_mask")}
    before = model(**kw, use_cache=False).logits.float()
    filled = 0
    # a dispatched model: each offloaded unit in turn (written back), then the resident rest
    for unit in [*offloaded_units(model), None]:
        with materialized(unit) if unit is not None else contextlib.nullcontext():
            params = {n: p for n, p in model.named_parameters() if p.device.type != "meta"}
            here = {n: k for n, k in keep_masks.items() if n in params}
            filled += sum(int((params[n][~k.to(params[n].device)] != 0).sum()) for n, k in here.items())
            apply_weight_masks(model, here)
            keep_masks = {n: k for n, k in keep_masks.items() if n not in here}
    after = model(**kw, use_cache=False).logits.float()
    real = kw["attention_mask"].bool()
    return {"weights_zeroed": filled, "max_abs_logit_change": float((after - before).abs()[real].max())}


# ----------------------------------------------------------------------------- the stage


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing of every decoder layer on or off, non-reentrant;
    transformers renamed the methods (``activation_checkpointing_*``) and keeps the old names
    until v6, so either is used."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        # enabling also hooked the input embeddings to require grad, and disabling leaves
        # that hook on a model wrapped by get_peft_model: every later forward with grad
        # enabled would then keep all activations
        if getattr(model, "_require_grads_hook", None) is not None:
            model.disable_input_require_grads()


def checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on."""
    flag = getattr(type(model), "is_activation_checkpointing", None) or type(model).is_gradient_checkpointing
    return bool(flag.fget(model))


@dataclass
class LoraRecovery:
    """Hyperparameters of LoRA recovery (defaults: LLM-Pruner's paper settings)."""

    name: str = "lora"
    data: str = "embedded"  # a conf/data/<name>.yaml; hub runs: alpaca_cleaned
    format: str = "instruction"  # instruction (Alpaca template) | text (plain windows of cutoff_len tokens)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default_factory=lambda: TARGET_MODULES)
    lr: float = 1e-4
    epochs: float = 2
    batch_size: int = 64
    micro_batch_size: int = 8  # gradient accumulation = batch_size / micro_batch_size
    cutoff_len: int = 256
    train_on_inputs: bool = False  # False: prompt tokens are masked out of the loss
    val_size: int = 2000  # the official LLM-Pruner run's val_set_size ...
    eval_every: int = 100  # ... and evaluation interval
    max_steps: int | None = None
    max_train_examples: int | None = None
    warmup_steps: int = 100  # the official run's
    weight_decay: float = 0.0
    patience: int | None = None  # stop after this many validations without a new best (null: never)
    # clip the LoRA gradients' global norm (the HF Trainer's default); None: no clipping
    max_grad_norm: float | None = 1.0
    # recompute each decoder layer's activations during the backward: one layer's activations
    # held instead of all of them (the big term at 7B+), for about one more forward per step
    gradient_checkpointing: bool = False
    # optimizer steps between checkpoints of the whole training state (adapter, optimizer,
    # random streams, data position, the method's masks/scores/generator) that a rerun of the
    # same command resumes from, bit-identically; also at the last step. 0: off
    checkpoint_every: int = 50
    # null | stream | micro_batch (DROPOUT_RNG): micro_batch makes one process and N processes
    # (accelerate launch) train identically
    dropout_rng: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.log_prefix = "recovery"  # W&B keys and progress bar; LoRAPrune's training says "loraprune"
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        problems = self._problems()
        if len(problems) == 1:
            raise ConfigError(problems[0])
        if problems:
            raise ConfigError("invalid recovery config:\n  - " + "\n  - ".join(problems))

    def _problems(self) -> list[str]:
        from prunelab.data.sources import available_names

        p: list[str] = []

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                p.append(f"recovery.{key}={getattr(self, key)!r} {what}")

        names = available_names()
        if self.data not in names:
            p.append(str(bad_value("recovery.data", self.data, names)))
        if self.format not in FORMATS:
            p.append(str(bad_value("recovery.format", self.format, FORMATS)))
        need(_is_int(self.r) and self.r > 0, "r", "must be a positive integer (the LoRA rank)")
        need(_is_num(self.alpha) and self.alpha > 0, "alpha", "must be positive (scaling = alpha / r)")
        need(_is_num(self.dropout) and 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        if not self.target_modules:
            p.append(f"recovery.target_modules=[] is empty; allowed: any of {', '.join(TARGET_MODULES)}")
        for t in self.target_modules:
            if t not in TARGET_MODULES:
                p.append(str(bad_value("recovery.target_modules", t, TARGET_MODULES)))
        need(isinstance(self.gradient_checkpointing, bool), "gradient_checkpointing", "must be true or false")
        need(_is_num(self.lr) and self.lr > 0, "lr", "must be a positive learning rate")
        need(_is_num(self.epochs) and self.epochs > 0, "epochs", "must be positive (fractions allowed)")
        need(_is_int(self.batch_size) and self.batch_size > 0, "batch_size", "must be a positive integer")
        need(
            _is_int(self.micro_batch_size) and self.micro_batch_size > 0,
            "micro_batch_size",
            "must be a positive integer",
        )
        if (
            _is_int(self.batch_size)
            and _is_int(self.micro_batch_size)
            and self.micro_batch_size > 0
            and self.batch_size % self.micro_batch_size
        ):
            p.append(
                f"recovery.micro_batch_size={self.micro_batch_size!r} must divide "
                f"recovery.batch_size={self.batch_size!r} (gradient accumulation = batch / micro)"
            )
        need(_is_int(self.cutoff_len) and self.cutoff_len >= 2, "cutoff_len", "must be an integer >= 2")
        need(isinstance(self.train_on_inputs, bool), "train_on_inputs", "must be true or false")
        need(_is_int(self.val_size) and self.val_size >= 0, "val_size", "must be an integer >= 0")
        need(_is_int(self.eval_every) and self.eval_every > 0, "eval_every", "must be a positive integer")
        need(
            self.max_steps is None or (_is_int(self.max_steps) and self.max_steps > 0),
            "max_steps",
            "must be null or a positive integer",
        )
        need(
            self.max_train_examples is None
            or (_is_int(self.max_train_examples) and self.max_train_examples > 0),
            "max_train_examples",
            "must be null or a positive integer",
        )
        need(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "must be an integer >= 0")
        need(_is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(
            self.max_grad_norm is None or (_is_num(self.max_grad_norm) and self.max_grad_norm > 0),
            "max_grad_norm",
            "must be null (no clipping) or > 0",
        )
        need(
            self.patience is None or (_is_int(self.patience) and self.patience > 0),
            "patience",
            "must be null or a positive integer (validations without improvement before stopping)",
        )
        need(
            _is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
            "checkpoint_every",
            "must be an integer >= 0 (optimizer steps between training-state checkpoints; 0: off)",
        )
        need(_is_int(self.seed), "seed", "must be an integer")
        if self.dropout_rng is not None and self.dropout_rng not in DROPOUT_RNG:
            p.append(
                f"recovery.dropout_rng={self.dropout_rng!r} is not allowed; allowed: null (stream in one "
                "process, micro_batch in several), stream, micro_batch"
            )
        elif self.dropout_rng == "stream" and distributed.num_processes() > 1:
            p.append(
                f"recovery.dropout_rng='stream' needs one process (this launch has "
                f"{distributed.num_processes()}): one generator cannot be shared by several; "
                "allowed here: null, micro_batch"
            )
        return p

    @property
    def dropout_per_micro_batch(self) -> bool:
        """Whether each micro-batch draws its dropout masks from its own seeded generator."""
        return self.dropout_rng == "micro_batch" or (
            self.dropout_rng is None and distributed.num_processes() > 1
        )

    # ------------------------------------------------------------------ data

    def _data_node(self, data_cfg: Any = None) -> Any:
        from prunelab.data.sources import load_source_config

        # The run's own data node may carry overrides (local_files) for the same dataset.
        if data_cfg is not None and data_cfg.get("name") == self.data:
            return data_cfg
        return load_source_config(self.data)

    def check(self, data_cfg: Any = None) -> None:
        """Cheap: the data config exists and its local files (if any) are there."""
        from prunelab.data.sources import build_source

        build_source(self._data_node(data_cfg)).check()

    def _split(self, source: Any, get: Any, val_only: bool = False) -> tuple[list[Any], list[Any]]:
        """(train, validation) items: the data's validation split if it has one, else
        ``val_size`` held out of train; both sampled with ``seed``, train capped. ``val_only``:
        the training split is not read when a validation split exists (train: [])."""
        from prunelab.data.corpus import SPLITS

        g = torch.Generator().manual_seed(self.seed)
        if "validation" in getattr(source, "splits", SPLITS):
            val = get("validation")
            val = [val[i] for i in torch.randperm(len(val), generator=g)[: self.val_size].tolist()]
            if val_only:
                return [], val
            train = get("train")
        else:
            train = get("train")
            if self.val_size >= len(train):
                raise ConfigError(
                    f"recovery.val_size={self.val_size} leaves nothing to train on in data {self.data!r} "
                    f"({len(train)} {self.format} items, no validation split)"
                )
            order = torch.randperm(len(train), generator=g).tolist()
            val = [train[i] for i in order[: self.val_size]]
            train = [train[i] for i in order[self.val_size :]]
        if self.max_train_examples is not None and len(train) > self.max_train_examples:
            keep = torch.randperm(len(train), generator=g)[: self.max_train_examples].tolist()
            train = [train[i] for i in sorted(keep)]
        return train, val

    def examples(
        self, data_cfg: Any = None, val_only: bool = False
    ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """(train, validation) instruction examples of ``recovery.data``."""
        from prunelab.data.sources import build_source

        source = build_source(self._data_node(data_cfg))
        return self._split(source, source.instruction_examples, val_only)

    def text_windows(
        self, tokenizer: Any, data_cfg: Any = None, val_only: bool = False
    ) -> tuple[list[Feature], list[Feature]]:
        """(train, validation) non-overlapping ``cutoff_len``-token windows of the data's text,
        every token a target (``format=text``)."""
        from prunelab.data.sources import build_source

        source = build_source(self._data_node(data_cfg))
        n = self.cutoff_len

        def windows(split: str) -> list[Feature]:
            ids = source.token_ids(tokenizer, split)
            rows = ids[: ids.numel() // n * n].view(-1, n).tolist()
            return [{"input_ids": r, "labels": list(r)} for r in rows]

        return self._split(source, windows, val_only)

    def features(self, tokenizer: Any, examples: Sequence[Example]) -> tuple[list[Feature], int]:
        """Tokenized examples, minus those with no answer token left after truncation
        (they carry no loss); returns (features, number dropped)."""
        if not examples:
            return [], 0
        feats = tokenize_examples(tokenizer, examples, self.cutoff_len, self.train_on_inputs)
        kept = [f for f in feats if any(x != IGNORE_INDEX for x in f["labels"][1:])]
        return kept, len(feats) - len(kept)

    # ------------------------------------------------------------------ training

    def num_steps(self, num_train: int) -> int:
        steps = max(1, math.ceil(self.epochs * math.ceil(num_train / self.batch_size)))
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    def _lr_factor(self, step: int, total: int) -> float:
        """Linear warm-up, then linear decay to 0 (the HF Trainer schedule LLM-Pruner uses)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, (total - step) / max(1, total - self.warmup_steps))

    def lr_at(self, step: int, steps: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based) of ``steps``."""
        return self.lr * self._lr_factor(step - 1, steps)

    def recover(
        self,
        model: nn.Module,
        tokenizer: Any,
        out_dir: Path,
        tracker: Tracker | None = None,
        data_cfg: Any = None,
        keep_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> nn.Module:
        """Train LoRA on ``model`` with this config's data, restore the best adapter, merge it;
        returns the merged model (same class, eval mode). ``keep_masks`` (parameter name ->
        bool keep-mask, from the layer-wise methods) are re-applied after the merge, so an
        element-wise sparse model stays exactly as sparse."""
        train, val, extra = self.features_for(tokenizer, data_cfg)
        return self.fit_features(model, tokenizer, train, val, out_dir, tracker, extra, keep_masks)

    def features_for(
        self, tokenizer: Any, data_cfg: Any = None, val_only: bool = False
    ) -> tuple[list[Feature], list[Feature], dict]:
        """Tokenized (train, validation) features of this config's data, and timing facts."""
        start = time.perf_counter()
        if self.format == "text":
            train, val = self.text_windows(tokenizer, data_cfg, val_only)
            return train, val, {"data_time_s": time.perf_counter() - start}
        train_ex, val_ex = self.examples(data_cfg, val_only)
        data_time = time.perf_counter() - start
        train, val, extra = self._tokenize(tokenizer, train_ex, val_ex)
        return train, val, {"data_time_s": data_time, **extra}

    def _tokenize(
        self, tokenizer: Any, train_ex: Sequence[Example], val_ex: Sequence[Example]
    ) -> tuple[list[Feature], list[Feature], dict]:
        start = time.perf_counter()
        train, dropped_train = self.features(tokenizer, train_ex)
        val, dropped_val = self.features(tokenizer, val_ex)
        extra = {
            "dropped_no_answer": {"train": dropped_train, "validation": dropped_val},
            "tokenize_time_s": time.perf_counter() - start,
        }
        return train, val, extra

    def fit(
        self,
        model: nn.Module,
        tokenizer: Any,
        train_examples: Sequence[Example],
        val_examples: Sequence[Example],
        out_dir: Path,
        tracker: Tracker | None = None,
        extra_history: Mapping[str, Any] | None = None,
        keep_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> nn.Module:
        """``recover`` on given instruction examples (tokenized here)."""
        train, val, extra = self._tokenize(tokenizer, train_examples, val_examples)
        extra = {**(extra_history or {}), **extra}
        return self.fit_features(model, tokenizer, train, val, out_dir, tracker, extra, keep_masks)

    def fit_features(
        self,
        model: nn.Module,
        tokenizer: Any,
        train: list[Feature],
        val: list[Feature] | Mapping[str, list[Feature]],
        out_dir: Path,
        tracker: Tracker | None = None,
        extra_history: Mapping[str, Any] | None = None,
        keep_masks: Mapping[str, torch.Tensor] | None = None,
        hooks: TrainHooks | None = None,
    ) -> nn.Module:
        """``recover`` on tokenized ``{input_ids, labels}`` features. ``val`` given as
        ``{group: features}`` is validated per group too (logged, and passed to
        ``hooks.on_validation``); methods that train while they prune hook in with ``hooks``."""
        from peft import LoraConfig, get_peft_model

        start = time.perf_counter()
        out_dir = Path(out_dir)
        if distributed.num_processes() > 1 and hooks is not None:
            # LoRAPrune's scores, LoRAShear's LHSPG projections, ATP's generator: per-step
            # state no process group keeps in step (docs/performance.md, "Several processes")
            distributed.refuse(
                f"method={self.log_prefix}'s training",
                "its per-step hooks (importance scores, masks, projections or generator) are "
                "not synchronised across processes",
            )
        main = distributed.is_main()  # several processes: only the main one writes out_dir
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
        if not train:
            raise ValueError(
                f"no training example of data {self.data!r} keeps a target token within "
                f"recovery.cutoff_len={self.cutoff_len}"
            )
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets, missing = adapter_targets(self.target_modules, names)
        if missing:
            raise ConfigError(
                f"recovery.target_modules: {missing} not in the model; it has "
                f"{', '.join(t for t in TARGET_MODULES if t in names)}"
            )
        from prunelab.models.placement import input_device, is_dispatched, placeholders

        pad_id = pad_id_of(tokenizer)
        device = input_device(model)
        # a dispatched model (model.device_map): accelerate hooks each offloaded module that owns
        # tensors (a linear, a norm), so the adapters peft adds beside them are left resident
        dispatched = is_dispatched(model)
        micro = self.micro_batch_size
        hooks = hooks or TrainHooks()
        val_groups = dict(val) if isinstance(val, Mapping) else {"all": val}
        val_batches = {k: eval_batches(v, pad_id, micro) for k, v in val_groups.items() if v}
        steps = self.num_steps(len(train))
        key = None  # the training state's identity, when it is checkpointed
        if self.checkpoint_every and hooks.resumable:
            key = self._state_key(model, train, val_groups, steps, hooks)
        elif self.checkpoint_every:
            log.warning(
                "%s: the method's hooks keep no checkpointable state; this training starts over after a kill",
                self.log_prefix,
            )

        # Seeded LoRA init and dropout without disturbing the caller's RNG streams.
        fork = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(self.seed)
            # a dispatched model: its offloaded base weights as placeholders on their execution
            # devices, so peft puts each adapter there (not on `meta`) with the same seeded init
            with placeholders(model) if dispatched else contextlib.nullcontext():
                peft_model = get_peft_model(
                    model,
                    LoraConfig(
                        r=self.r,
                        lora_alpha=self.alpha,
                        lora_dropout=self.dropout,
                        target_modules=targets,
                        bias="none",
                        task_type="CAUSAL_LM",
                    ),
                )
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            if hooks.setup is not None:
                hooks.setup(peft_model)
            was_on = checkpointing(model)
            if self.gradient_checkpointing and not was_on:
                # non-reentrant: gradients reach the LoRA factors although the inputs of the
                # checkpointed layers do not require grad; dropout masks are replayed exactly
                set_checkpointing(model, True)
            try:
                history, best_state = self._train(
                    peft_model, opt, train, val_batches, steps, pad_id, tracker, hooks, out_dir, key
                )
            finally:
                if self.gradient_checkpointing and not was_on:
                    set_checkpointing(model, False)
        if best_state is not None:
            load_lora_state(peft_model, best_state)
        if main:
            peft_model.save_pretrained(str(out_dir / "adapter"), safe_serialization=True)
        first = next(iter(val_batches.values()), None)
        check = first[0] if first else collate(train[:micro], pad_id)
        merged, diff = merge_lora(peft_model, check)
        if keep_masks is not None:
            history["remask"] = remask(merged, keep_masks, check)
        check_weights(
            merged,
            f"the model after {self.log_prefix} training (the adapter of step {history['best_step']} merged)",
            TRAIN_HINT,
        )
        history.update(
            merge_max_abs_diff=diff,
            num_train_examples=len(train),
            num_val_examples=sum(len(v) for v in val_groups.values()),
            trainable_params=sum(p.numel() for p in params),
            config=asdict(self),
        )
        history.update(extra_history or {})
        history["time_s"] = (
            time.perf_counter()
            - start
            + history.get("data_time_s", 0.0)
            + history.get("tokenize_time_s", 0.0)
        )
        if main:
            (out_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        return merged

    def _state_key(
        self,
        model: nn.Module,
        train: list[Feature],
        val_groups: Mapping[str, list[Feature]],
        steps: int,
        hooks: TrainHooks,
    ) -> str:
        """What a training state belongs to: the starting weights, the data, every setting that
        changes the result, and the hooks' own settings (``hooks.key``)."""
        from prunelab.recovery import train_state

        volatile = ("checkpoint_every", "gradient_checkpointing")  # change where/how, never what
        # dropout_rng enters as what it resolves to (null: per process count), below
        return train_state.digest(
            {
                "trainer": {k: v for k, v in asdict(self).items() if k not in (*volatile, "dropout_rng")},
                "steps": steps,
                "weights": train_state.weights_digest(model),
                "data": train_state.features_digest(train, *val_groups.values()),
                "val_groups": list(val_groups),
                "hooks": hooks.key,
                "select_from": hooks.select_from,
                # how dropout draws (not the process count: per-micro-batch masks are the same
                # in any number of processes, so a resume may use another count)
                "dropout_per_micro_batch": self.dropout_per_micro_batch,
            }
        )

    def _train(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        train: list[Feature],
        val_batches: dict[str, list[dict[str, torch.Tensor]]],
        steps: int,
        pad_id: int,
        tracker: Tracker | None,
        hooks: TrainHooks,
        out_dir: Path | None = None,
        key: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The optimizer loop; returns (history, LoRA state of the best validation loss). With a
        ``key``, the whole training state is checkpointed under ``out_dir/train_state`` every
        ``checkpoint_every`` steps and at the last, and a checkpoint found there is resumed."""
        from prunelab.recovery import train_state

        g = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        hist: dict[str, Any] = {
            "train": [],
            "val": [],
            "steps": steps,
            "best_step": None,
            "best_val_loss": None,
        }
        best_state = None
        since_best = 0
        scaler = loss_scaler(model)  # float16 models: dynamic loss scaling, else a no-op
        scaling = LossScaling(self.log_prefix, steps)

        def validate(step: int) -> float:
            v, per = self._val_losses(model, val_batches)
            check_value(
                v, f"{self.log_prefix} training: the validation loss at step {step}/{steps}", TRAIN_HINT
            )
            named = set(per) != {"all"}  # validation given per group (e.g. per data source)
            point = {"step": step, "loss": v, **({"per_group": per} if named else {})}
            hist["val"].append(point)
            if tracker is not None:
                logged = {f"{self.log_prefix}/val_loss": v}
                if named:
                    logged.update({f"{self.log_prefix}/val_loss/{k}": x for k, x in per.items()})
                tracker.log(logged, step=step)
            if hooks.on_validation is not None:
                hooks.on_validation(step, per)
            return v

        # Step 0 is a reference point, not a candidate: as the papers' Trainer, a checkpoint
        # is one the optimizer produced.
        log.info(
            "%s: LoRA r=%d on %d training examples, %d steps × %d, lr %g, validation every %d",
            self.log_prefix,
            self.r,
            len(train),
            steps,
            self.batch_size,
            self.lr,
            self.eval_every,
        )
        every = self.checkpoint_every if key is not None and out_dir is not None else 0
        device = next(model.parameters()).device
        rank, n_proc = distributed.rank(), distributed.num_processes()
        main = rank == 0
        per_micro = self.dropout_per_micro_batch
        n_micro = self.batch_size // self.micro_batch_size
        if n_proc > 1 and n_micro % n_proc and main:
            log.warning(
                "%s: %d micro-batches per step (batch_size %d / micro_batch_size %d) do not split evenly "
                "over %d processes: some wait each step (the result is the same)",
                self.log_prefix, n_micro, self.batch_size, self.micro_batch_size, n_proc,
            )  # fmt: skip
        fork = [device.index if device.index is not None else 0] if device.type == "cuda" else []
        trainable = {id(p) for group in opt.param_groups for p in group["params"]}
        tokens, train_time, start = 0, 0.0, 0

        def snapshot() -> dict[str, Any]:
            """Everything the steps after this one depend on, as of the end of this step."""
            lora = {n: p for n, p in model.named_parameters() if id(p) in trainable}
            return {
                "loop": {
                    "hist": hist,
                    "order": order,
                    "since_best": since_best,
                    "tokens": tokens,
                    "train_time": train_time,
                },
                "lora": lora,
                "best": None if best_state is None else {n: best_state[n] for n in lora},
                "optimizer": train_state.optimizer_state(opt),
                "sampler": g.get_state(),
                "rng": train_state.rng_state(device),
                "hooks": hooks.state() if hooks.state is not None else None,
                # float16: the loss scale and its growth counter shape the steps to come
                "loss_scaling": scaling.state(scaler) if scaler.is_enabled() else None,
            }

        loaded = None
        if every:  # the main process first: it discards a checkpoint of another training
            if main:
                loaded = train_state.load(out_dir, key)
            distributed.barrier()
            if not main:
                loaded = train_state.load(out_dir, key)
        if loaded is not None:
            start, tree = loaded
            loop = tree["loop"]
            hist, order, since_best = loop["hist"], loop["order"], loop["since_best"]
            tokens, train_time = loop["tokens"], loop["train_time"]
            best_state = tree["best"]
            load_lora_state(model, tree["lora"])
            train_state.load_optimizer_state(opt, tree["optimizer"])
            g.set_state(tree["sampler"])
            if scaler.is_enabled() and tree.get("loss_scaling") is not None:
                scaling.load_state(scaler, tree["loss_scaling"])
            if hooks.load_state is not None:
                hooks.load_state(tree["hooks"])
            train_state.set_rng_state(tree["rng"], device)  # last: nothing draws before the next step
            hist.setdefault("resumed_at", []).append(start)
            log.info(
                "%s: resumed from the training state of step %d/%d in %s",
                self.log_prefix,
                start,
                steps,
                Path(out_dir) / train_state.STATE_DIR,
            )
        elif val_batches:
            validate(0)
        model.train()
        todo = range(start + 1, steps + 1) if "stopped_early_at" not in hist else range(0)
        bar = progress_bar(todo, desc=f"{self.log_prefix} (LoRA)", unit="step", leave=False, disable=not main)
        for step in bar:
            t0 = time.perf_counter()
            if hooks.sample is not None:
                idx = list(hooks.sample(step, self.batch_size))
            else:
                while len(order) < self.batch_size:  # one fresh permutation per epoch
                    order += torch.randperm(len(train), generator=g).tolist()
                idx, order = order[: self.batch_size], order[self.batch_size :]
            # Similar lengths share a micro-batch (less padding); the batch's gradient is the same.
            idx.sort(key=lambda i: len(train[i]["input_ids"]))
            micro = [
                collate([train[i] for i in idx[j : j + self.micro_batch_size]], pad_id)
                for j in range(0, len(idx), self.micro_batch_size)
            ]
            if hooks.before_step is not None:
                hooks.before_step(model, step, steps, micro)
            # Mean over the whole batch's target tokens, not a mean of micro-batch means.
            count = max(1, sum(target_count(b) for b in micro))
            lr = self.lr_at(step, steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            total = 0.0
            step_tokens = 0
            # Several processes: process r runs micro-batches r, r+N, ... of the same global batch
            # (the data order never depends on N); ``count`` is the whole batch's, the same on
            # every process, so the summed gradients are the single process's.
            for j in range(rank, len(micro), n_proc):
                b = micro[j]
                with torch.random.fork_rng(devices=fork, enabled=per_micro):
                    if per_micro:  # this micro-batch's dropout masks, wherever it runs
                        torch.manual_seed(self._micro_seed(step, j))
                    loss = loss_sum(model, b) / count
                    scaler.scale(loss).backward()  # (float16 models only: scaled, see loss_scaler)
                total += float(loss.detach())
                step_tokens += int(b["attention_mask"].sum())
            trained = [p for grp in opt.param_groups for p in grp["params"]]
            if n_proc > 1:
                total, step_tokens = self._sync_grads(trained, total, step_tokens)
            tokens += step_tokens
            # the loss was synced for the log anyway: a NaN/inf stops here, before any update
            check_value(total, f"{self.log_prefix} training: the loss of step {step}/{steps}", TRAIN_HINT)
            scaler.unscale_(opt)
            norm = torch.nn.utils.get_total_norm([p.grad for p in trained if p.grad is not None])
            overflow = not math.isfinite(float(norm))  # one sync per step, none per micro-batch
            if overflow and not scaler.is_enabled():
                raise NonFiniteError(
                    f"{self.log_prefix} training: the gradient of the LoRA parameters at step {step}/{steps} "
                    f"is {float(norm)} although the loss {total:.4g} is finite; {TRAIN_HINT}"
                )
            if hooks.after_backward is not None:  # (LoRAPrune's scores see the unclipped gradients)
                hooks.after_backward(model, step, steps)
            if self.max_grad_norm is not None and not overflow:
                torch.nn.utils.clip_grads_with_norm_(trained, self.max_grad_norm, norm)
            scaler.step(opt)  # float16: skipped when the scaled gradient overflowed
            if scaler.is_enabled():
                scaling.update(step, scaler)
            if hooks.after_step is not None:
                hooks.after_step(model, step, steps)
            train_time += time.perf_counter() - t0
            hist["train"].append({"step": step, "loss": total, "lr": lr})
            if tracker is not None:
                tracker.log({f"{self.log_prefix}/train_loss": total, f"{self.log_prefix}/lr": lr}, step=step)
            bar.set_postfix(loss=f"{total:.4f}")
            if val_batches and (step % self.eval_every == 0 or step == steps):
                v = validate(step)
                if step >= hooks.select_from:
                    if hist["best_val_loss"] is None or v < hist["best_val_loss"]:
                        hist["best_val_loss"], hist["best_step"] = v, step
                        best_state = lora_state(model)
                        since_best = 0
                    else:
                        since_best += 1
                bar.set_postfix(loss=f"{total:.4f}", val=f"{v:.4f}")
                best = hist["best_val_loss"]
                log.info(
                    "%s: step %d/%d train loss %.4f, validation %.4f (%s)",
                    self.log_prefix,
                    step,
                    steps,
                    total,
                    v,
                    f"best {best:.4f} at step {hist['best_step']}"
                    if best is not None
                    else f"candidates from step {hooks.select_from}",
                )
                if self.patience is not None and since_best >= self.patience and step < steps:
                    hist["stopped_early_at"] = step  # validation stopped improving
            stop = "stopped_early_at" in hist
            if every and main and (step % every == 0 or step == steps or stop):
                train_state.save(out_dir, step, key, snapshot())
            if stop:
                break
        bar.close()
        hist["steps_run"] = len(hist["train"])
        if scaler.is_enabled():
            hist["loss_scaling"] = scaling.summary(scaler)
        if not val_batches:  # nothing to choose by: the last state is the result
            hist["best_step"] = hist["steps_run"]
        hist.update(train_time_s=train_time, train_tokens=tokens, tokens_per_s=tokens / max(train_time, 1e-9))
        log.info(
            "%s: %d steps, %d tokens in %.1f s; the adapter of step %s is merged",
            self.log_prefix,
            hist["steps_run"],
            tokens,
            train_time,
            hist["best_step"],
        )
        return hist, best_state

    def _val_losses(
        self, model: nn.Module, groups: dict[str, list[dict[str, torch.Tensor]]]
    ) -> tuple[float, dict[str, float]]:
        return group_losses(model, groups, shard=True)

    def _micro_seed(self, step: int, j: int) -> int:
        """The dropout seed of micro-batch ``j`` of optimizer step ``step`` (dropout_rng=micro_batch)."""
        return (self.seed * 1_000_003 + step) * 65_537 + j

    @staticmethod
    def _sync_grads(params: list[nn.Parameter], total: float, tokens: int) -> tuple[float, int]:
        """Sum the LoRA gradients, the step's loss and its token count over the processes: one
        all-reduce of one flat buffer per optimizer step (a few MB: the adapters only). Each
        process's loss was divided by the whole batch's target-token count, so the sum is the
        token-weighted mean gradient of the global batch, as in one process. Before the loss
        scaler's unscale: an overflow anywhere is seen by every process alike."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        buf = distributed.all_sum(torch.cat([g.reshape(-1).float() for g in grads]))
        offset = 0
        for p, g in zip(params, grads, strict=True):
            k = g.numel()
            p.grad = buf[offset : offset + k].view_as(g).to(g.dtype)
            offset += k
        facts = distributed.all_sum(
            torch.tensor([total, float(tokens)], dtype=torch.float64, device=buf.device)
        )
        return float(facts[0]), int(facts[1])
