"""LoRAPrune (Zhang et al., ACL Findings 2024): structured pruning *during* LoRA fine-tuning,
scored from the LoRA factors' gradients (``prunelab.importance.lora_grad``).

    prunelab method=loraprune ratio=0.5
    prunelab -m method=loraprune method.importance=lora_grad,taylor,magnitude

The loop (the shared LoRA trainer with two hooks):
- heads (KV groups) and MLP channels are masked in the forward pass by zeroing their inputs
  to o_proj / down_proj — both the frozen and the LoRA path, so a masked structure
  contributes nothing, exactly as if removed;
- after every backward pass, structure scores from ``importance`` are smoothed by a moving
  average Ī ← β·Ī + (1 − β)·I (a float16 model's overflow steps skipped, as loss scaling
  skips them; otherwise non-finite scores are an error);
- every ``prune_freq`` optimizer steps the target follows a cubic schedule from 0 (until
  ``warmup`` of the run) to the plan's per-layer counts (from ``1 − cooldown`` of the run);
  the lowest-scoring still-kept structures of each prunable layer are masked — masks only
  ever add zeros;
- the best adapter is chosen among validation points after the final masks are in place;
  LoRA is merged and the runner removes the masked structures physically.

``ratio`` is the fraction of all parameters removed, as for every structured method.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from prunelab.errors import ConfigError, NonFiniteError, bad_value
from prunelab.importance.lora_grad import ESTIMATORS, unit_scores
from prunelab.methods import (
    COUPLED_MODULES,
    PruneContext,
    PruningMethod,
    check_trainer,
    lora_targets,
    method_trainer,
)
from prunelab.models.placement import is_dispatched, live_parameters
from prunelab.numerics import trains_in_fp16
from prunelab.recovery.lora import TRAIN_HINT, LoraRecovery, TrainHooks
from prunelab.structure import arch_info, units
from prunelab.structure.groups import Masks, decoder_layers, weight_members
from prunelab.structure.plan import PrunePlan, prunable_layers

log = logging.getLogger(__name__)


def cubic_fraction(step: int, total: int, warmup: float, cooldown: float) -> float:
    """Share of the final pruning reached at ``step`` of ``total``: 0 until warmup·total,
    1 from (1 − cooldown)·total, cubic in between (fast early, gentle late)."""
    t0, t1 = warmup * total, (1 - cooldown) * total
    if step <= t0:
        return 0.0
    if step >= t1:
        return 1.0
    return 1.0 - (1.0 - (step - t0) / (t1 - t0)) ** 3


def grow_masks(masks: Masks, scores: dict[str, torch.Tensor], want: dict[str, int]) -> None:
    """Mask the lowest-scoring still-kept groups until ``want[key]`` are masked; masks only
    ever add zeros (a masked group is never restored, however its score moves)."""
    for key, k in want.items():
        have = int((~masks[key]).sum())
        if k > have and key in scores:
            score = scores[key].masked_fill(~masks[key], math.inf)
            drop = torch.sort(score, stable=True).indices[: k - have]
            masks[key][drop] = False


class PruneSchedule:
    """LoRAPrune's two training hooks as one object: masks applied in the forward pass
    (``setup``), and after every backward the moving-average scores and, every
    ``prune_freq`` steps, the masks grown along the cubic schedule (``after_backward`` →
    ``update``). ``update`` takes the scores themselves, so the schedule is testable without
    a model."""

    def __init__(
        self,
        arch: Any,
        todo: list[Any],
        remove: dict[str, int],
        importance: str,
        beta: float,
        prune_freq: int,
        warmup: float,
        cooldown: float,
    ) -> None:
        self.arch, self.todo, self.remove_counts = arch, todo, remove
        self.importance, self.beta, self.prune_freq = importance, beta, prune_freq
        self.warmup, self.cooldown = warmup, cooldown
        self.masks: Masks = {u.key: torch.ones(u.n, dtype=torch.bool) for u in todo}
        self.ema: dict[str, torch.Tensor] = {}
        self.log: list[dict] = []
        self.skipped = 0  # non-finite score updates left out of the average (float16 overflow steps)
        self.fp16 = False  # set in setup: only a float16 model's overflowing steps may be skipped
        self._base_grads: list[torch.Tensor] = []
        self._grad_names: list[str] = []  # full names of the base weights taylor reads gradients of
        self._live: contextlib.ExitStack | None = None  # a dispatched model: those weights, live
        self._handles: list[Any] = []
        self._norms: list[tuple[nn.Module, float]] = []  # (norm, its eps) to restore

    def _mask_inputs(self, key: str, width: int):
        def hook(module, args):
            keep = self.masks[key].repeat_interleave(width).to(args[0].device, args[0].dtype)
            return (args[0] * keep, *args[1:])

        return hook

    def setup(self, peft_model: nn.Module) -> None:
        """Mask each pruned structure's inputs to o_proj / down_proj; for ``taylor``, let the
        base weights take gradients (the comparison: true gradients)."""
        layers, arch = decoder_layers(peft_model), self.arch
        self.fp16 = trains_in_fp16(peft_model)
        for u in self.todo:
            if u.kind == "attn":  # a KV group's query heads are consecutive o_proj input blocks
                mod, width = layers[u.layer].self_attn.o_proj, arch.group_size(u.layer) * arch.head_dim
            else:
                mod, width = layers[u.layer].mlp.down_proj, 1
            # on peft's wrapper (masks the frozen and the LoRA path while training) and on the
            # base layer (the module left after merge_and_unload: the merge check stays masked)
            self._handles.append(mod.base_layer.register_forward_pre_hook(self._mask_inputs(u.key, width)))
            self._handles.append(mod.register_forward_pre_hook(self._mask_inputs(u.key, width)))
            if u.kind == "attn" and arch.family.proj_norms:
                self._mask_proj_norms(layers[u.layer].self_attn, u, arch)
        if self.importance == "taylor":
            for u in self.todo:
                for m in weight_members(arch, u):
                    mod = layers[u.layer].get_submodule(m.path)
                    w = mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight
                    if not w.requires_grad:
                        w.requires_grad_(True)  # (a dispatched model: accelerate carries it over)
                        self._base_grads.append(w)
            if is_dispatched(peft_model):
                names = {id(p): n for n, p in peft_model.named_parameters()}
                self._grad_names = sorted(names[id(w)] for w in self._base_grads)

    def before_step(self, peft_model: nn.Module, step: int, steps: int, micro: list[Any]) -> None:
        """A dispatched model, taylor: accelerate's offload hooks load each offloaded weight as a
        new tensor per forward and drop it (with its gradient) after; for the step the base
        weights scored are held as the tensors the forwards use (``placement.live_parameters``:
        read-only copies, so their gradients accumulate over the micro-batches as on one
        device), released after the scores (``after_backward``)."""
        self._release()
        if self._grad_names:
            self._live = contextlib.ExitStack()
            self._live.enter_context(live_parameters(peft_model, self._grad_names))

    def _release(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None

    def _mask_proj_norms(self, attn: nn.Module, u: Any, arch: Any) -> None:
        """OLMo-2's q_norm/k_norm average over every head: a head masked only at o_proj would
        still weigh in the RMS of the kept ones, so the model trained would not be the model
        pruned. Mask the norms' inputs too, with the eps that makes masked == removed
        (``prunelab.structure.groups``, whole-projection norms); restored by ``remove``."""
        d, g = arch.head_dim, arch.group_size(u.layer)
        for name, width in zip(arch.family.proj_norms, (g * d, d), strict=False):
            norm = getattr(attn, name)
            eps = norm.variance_epsilon
            self._norms.append((norm, eps))

            def hook(module, args, key=u.key, width=width, eps=eps):
                keep = self.masks[key]
                module.variance_epsilon = eps * float(keep.sum()) / keep.numel()
                m = keep.repeat_interleave(width).to(args[0].device, args[0].dtype)
                return (args[0] * m, *args[1:])

            self._handles.append(norm.register_forward_pre_hook(hook))

    def after_backward(self, peft_model: nn.Module, step: int, steps: int) -> None:
        try:
            self.update(unit_scores(peft_model, self.arch, self.todo, self.importance), step, steps)
        finally:
            self._release()  # a dispatched model: the live copies (and their gradients) go
        for w in self._base_grads:
            w.grad = None  # not in the optimizer: clear, or they would accumulate

    def update(self, scores: dict[str, torch.Tensor], step: int, steps: int) -> None:
        """Ī ← β·Ī + (1 − β)·I per structure (the first finite update initialises Ī); at
        every ``prune_freq``-th step and the last, mask the lowest-Ī kept structures up to
        round(cubic_fraction · plan count) per unit."""
        for k, s in scores.items():
            if not torch.isfinite(s).all():
                if not self.fp16:  # float32/bfloat16: the loop refused non-finite gradients already
                    raise NonFiniteError(
                        f"loraprune training: the {self.importance} importance scores of unit {k} at step "
                        f"{step}/{steps} hold {int(torch.isnan(s).sum())} NaN and "
                        f"{int(torch.isinf(s).sum())} inf of {s.numel()}; {TRAIN_HINT}"
                    )
                self.skipped += 1  # float16: the step whose gradient overflowed (loss scaling skips it too)
                continue
            self.ema[k] = s if k not in self.ema else self.beta * self.ema[k] + (1 - self.beta) * s
        if step % self.prune_freq and step != steps:
            return
        frac = cubic_fraction(step, steps, self.warmup, self.cooldown)
        grow_masks(self.masks, self.ema, {k: round(frac * n) for k, n in self.remove_counts.items()})
        self.log.append(
            {"step": step, "fraction": frac, "removed": {k: int((~v).sum()) for k, v in self.masks.items()}}
        )
        log.info(
            "loraprune: pruning step at %d/%d — %.0f%% of the plan, %d structures masked",
            step,
            steps,
            100 * frac,
            sum(self.log[-1]["removed"].values()),
        )

    def resume_state(self) -> dict[str, Any]:
        """What the schedule carries from step to step (a rerun resumes it)."""
        return {"masks": self.masks, "ema": self.ema, "log": self.log, "skipped": self.skipped}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        for k, m in self.masks.items():  # in place: the forward hooks and the caller hold these
            m.copy_(state["masks"][k])
        self.ema = dict(state["ema"])
        self.log[:] = state["log"]
        self.skipped = state["skipped"]

    def hooks(self, select_from: int) -> TrainHooks:
        key = {
            "units": [u.key for u in self.todo],
            "remove": self.remove_counts,
            "importance": self.importance,
            "beta": self.beta,
            "prune_freq": self.prune_freq,
            "warmup": self.warmup,
            "cooldown": self.cooldown,
        }
        return TrainHooks(
            setup=self.setup,
            before_step=self.before_step if self.importance == "taylor" else None,
            after_backward=self.after_backward,
            select_from=select_from,
            state=self.resume_state,
            load_state=self.load_resume_state,
            key=key,
        )

    def remove(self) -> None:
        """Take the hooks off and leave the base weights frozen again."""
        self._release()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for norm, eps in self._norms:
            norm.variance_epsilon = eps
        self._norms.clear()
        for w in self._base_grads:
            w.requires_grad_(False)
            w.grad = None


@dataclass
class LoRAPrune(PruningMethod):
    name: str = "loraprune"
    importance: str = "lora_grad"  # lora_grad (the paper) | taylor (true weight gradients) | magnitude
    targets: tuple[str, ...] = field(default_factory=lambda: tuple(COUPLED_MODULES))
    keep_first_layers: float | int = 0.1  # the paper: first 10% of layers ...
    keep_last_layers: float | int = 1  # ... and the last layer are never pruned
    beta: float = 0.9  # moving average of the importance
    prune_freq: int = 10  # optimizer steps between pruning steps
    warmup: float = 0.1  # fraction of the run before the first pruning step
    cooldown: float = 0.1  # fraction of the run after the final ratio is reached
    train: dict[str, Any] = field(default_factory=dict)  # LoRA training: keys of recovery=lora
    then_recover: bool = False  # the fine-tuning above is the recovery; true adds the recovery stage
    seed: int = 0

    sparse: ClassVar[bool] = False
    trains: ClassVar[bool] = True  # fine-tunes while pruning: needs data, an output dir, a tracker
    sub_configs: ClassVar[dict[str, type]] = {"train": LoraRecovery}
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.targets = lora_targets(self.targets)
        if self.importance not in ESTIMATORS:
            raise bad_value("method.importance", self.importance, ESTIMATORS)
        if not (isinstance(self.beta, (int, float)) and 0 <= self.beta < 1):
            raise ConfigError(
                f"method.beta={self.beta!r} must be in [0, 1) (moving-average weight of the past)"
            )
        if not isinstance(self.prune_freq, int) or self.prune_freq < 1:
            raise ConfigError(
                f"method.prune_freq={self.prune_freq!r} must be a positive integer (optimizer steps)"
            )
        for key in ("warmup", "cooldown"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ConfigError(f"method.{key}={v!r} must be a fraction of the run in [0, 1)")
        if self.warmup + self.cooldown >= 1:
            raise ConfigError(
                f"method.warmup={self.warmup} + method.cooldown={self.cooldown} leave no room to prune; "
                "their sum must be < 1"
            )
        self.trainer = method_trainer(
            self.train,
            "loraprune",
            self.seed,
            self.targets,
            why="every module coupled to a pruned structure needs a LoRA adapter (its scores come from it)",
        )
        self.history: dict[str, Any] = {}

    def layers(self, num_layers: int) -> list[int]:
        return prunable_layers(num_layers, self.keep_first_layers, self.keep_last_layers)

    def check(self, data_cfg: Any = None) -> None:
        check_trainer(self.trainer, data_cfg)

    def final_step(self, steps: int) -> int:
        """The pruning step at which the plan's counts are reached."""
        t1 = math.ceil((1 - self.cooldown) * steps)
        return min(steps, math.ceil(t1 / self.prune_freq) * self.prune_freq)

    def prune(self, model: nn.Module, plan: PrunePlan, ctx: PruneContext) -> Masks:
        """Fine-tune LoRA on the masked model while masks grow; returns the final masks. The
        model comes back with LoRA merged (masked structures still present, not yet removed)."""
        arch = arch_info(model.config)
        todo = [u for u in units(arch, self.targets) if plan.remove.get(u.key, 0) > 0]
        schedule = PruneSchedule(
            arch=arch,
            todo=todo,
            remove={u.key: plan.remove[u.key] for u in todo},
            importance=self.importance,
            beta=self.beta,
            prune_freq=self.prune_freq,
            warmup=self.warmup,
            cooldown=self.cooldown,
        )
        masks = schedule.masks
        tr = self.trainer
        train, val, extra = tr.features_for(ctx.tokenizer, ctx.data_cfg)
        steps = tr.num_steps(len(train))
        try:
            merged = tr.fit_features(
                model,
                ctx.tokenizer,
                train,
                val,
                ctx.out_dir,
                ctx.tracker,
                extra,
                hooks=schedule.hooks(select_from=self.final_step(steps)),
            )
        finally:
            schedule.remove()
        missing = {
            k: plan.remove[k] - int((~v).sum()) for k, v in masks.items() if int((~v).sum()) != plan.remove[k]
        }
        if missing:
            raise RuntimeError(
                f"loraprune ended short of the plan: {missing} (too few steps for prune_freq?)"
            )
        self.history = {
            "prune_steps": schedule.log,
            "nonfinite_updates_skipped": schedule.skipped,
            "steps": steps,
        }
        if merged is not model:
            raise RuntimeError("LoRA merge must update the model in place")
        return masks
