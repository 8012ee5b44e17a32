"""ATP — All-in-One Tuning and Structural Pruning (Lu et al. 2024): a trainable
pruning-decision generator and LoRA trained together on (domain) data, one stage.

    prunelab method=atp ratio=0.4 data=embedded_domain
    prunelab -m method=atp,llm_pruner ratio=0.4 data=embedded_domain recovery.data=embedded_domain

Every training step (``method.schedule`` says for how long the generator trains):

1. **generator step** — on held-out batches (``generator_data: heldout``: a ``heldout_fraction``
   of the training data the LoRA step never sees; ``shared``: the LoRA step's own batch) with
   the model in eval mode (``generator_mode: eval``: no dropout), soft decisions s on the merged path of every structure's output
   rows, y = (W·x + B·A·x) ⊙ s (q/k/v rows of a KV group, gate/up rows of an MLP channel);
   loss = LM loss + ``budget_weight`` · log(max(r, p) / min(r, p)), where r is the kept
   fraction of the prunable *parameters* under the straight-through hard decisions and p the
   fraction the ratio leaves; only the generator is updated.
2. **LoRA step** — the generator's deterministic hard decisions d on the frozen path only,
   y = (W·x) ⊙ d + B·A·x; objective = LM loss + λ · Σ_g √p_g·‖w_g‖ over the pruned
   structures' LoRA slices, one group g per structure and adapter matrix (its lora_B rows of
   q/k/v/gate/up, its lora_A columns of o/down; p_g entries; λ = ``lasso``), so a pruned structure's LoRA path is driven to zero and the structure can
   be removed; only LoRA is updated. The lasso term is applied by its proximal operator after
   each optimizer step (group soft-thresholding at lr_t·λ·√p_g), which reaches exact zeros;
   its subgradient under Adam only oscillates around zero at the learning rate's scale.

Once the budget loss stays below ``freeze_tolerance`` for ``freeze_patience`` generator steps
(or at ``freeze_by`` of the run at the latest), the decisions are frozen. ``schedule: official``
follows the official code (train_llm.py, main_llm_atp.py): the generator trains for the first
40% of the run (4 of 10 epochs) in 4 periods with a cosine step-down of its learning rate to
0.1× (×0.2 for the last fifth of the last period), gradients clipped at norm 3, and stops early
only once the budget loss of the step's sampled decisions stays ≤ 0.005 for 4000 generator
steps within one period; ``fast`` (prunelab's variant) watches the deterministic decisions,
< 0.02 for 10 steps, by 50% of the run. Then the fewest
decisions are flipped (by the generator's margins) to meet the budget to within one
structure, the generator stops, and LoRA keeps training on the frozen structure. At the end
the final adapter is merged, and the runner removes the pruned
structures physically; ``training.removal_max_abs_logit_change`` is what that removal costs
(the LoRA slices the lasso did not zero).

``attention_space: head_dim`` is the paper's attention space (the official
``layer_uniform_attn``): per layer one mask over the head dimension for q/k and one for v/o,
shared by every head, gated on the q/k/v output rows h·head_dim + j before RoPE as the official
code masks them; a channel weighs (n_heads + n_kv)·hidden parameters as the official accounting
counts it. Those channels are zeroed in place, not removed (the runner counts them as removed
and records the stored count beside it); MLP channels are removed as under ``heads``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunelab.errors import ConfigError, NonFiniteError, bad_value
from prunelab.methods import (
    COUPLED_MODULES,
    PruneContext,
    PruningMethod,
    check_trainer,
    lora_targets,
    method_trainer,
    plain,
    sub_config,
)
from prunelab.methods.atp.generator import ENCODERS, DecisionGenerator
from prunelab.numerics import check_value, loss_scaler
from prunelab.recovery.lora import (
    TRAIN_HINT,
    Feature,
    LoraRecovery,
    TrainHooks,
    collate,
    loss_sum,
    pad_id_of,
    target_count,
)
from prunelab.structure import ArchInfo, Unit, arch_info, masked_params, units
from prunelab.structure.groups import (
    Masks,
    Member,
    decoder_layers,
    expand_groups,
    grouped,
    lora_slices,
    weight_members,
)
from prunelab.structure.plan import PrunePlan, prunable_layers

_log = logging.getLogger(__name__)

# The generator's training and freeze schedules. Each sets the defaults of method.freeze_*
# (an explicit value overrides them).
# official — train_llm.py / main_llm_atp.py of the official code: the generator trains during
#   epochs [start_epoch_control, start_epoch_control + control_epochs) = [0, 4) of --epochs 10,
#   i.e. the first 40% of the run, one generator step per LoRA step (--control-step 1); it stops
#   early only when the ratio loss of the step's *sampled* hard mask stays ≤ 0.005 for 4000
#   consecutive generator steps (the counter restarts every epoch); its AdamW lr 1e-3 follows
#   CosineAnnealingLR(T_max=control_epochs, eta_min=1e-4) stepped per epoch, is cut to 1/5
#   after 4/5 of the last control epoch, and its gradients are clipped at norm 3.
# fast — prunelab's variant for short runs: the deterministic decisions' budget loss < 0.02 for
#   10 generator steps, by 50% of the run at the latest; constant lr, no clipping.
SCHEDULES = {
    "official": {"freeze_tolerance": 0.005, "freeze_patience": 4000, "freeze_by": 0.4},
    "fast": {"freeze_tolerance": 0.02, "freeze_patience": 10, "freeze_by": 0.5},
}
OFFICIAL_PERIODS = 4  # control_epochs: the generator phase's lr periods (the official epochs)
OFFICIAL_LR_FLOOR = 0.1  # eta_min / lr = 1e-4 / 1e-3
OFFICIAL_LR_CUT = 0.2  # ... × 1/5 after 4/5 of the last period
OFFICIAL_CUT_AT = 0.8
OFFICIAL_CLIP = 3.0  # clip_grad_norm_(hyper_net.parameters(), 3.0)
GENERATOR_DATA = ("heldout", "shared")
GENERATOR_MODES = ("eval", "train")
# The attention search space: heads — whole KV groups (whole heads under MHA), removed
# physically; head_dim — the paper's (the official --pruning-method layer_uniform_attn): per
# layer one head-dimension mask for q/k and one for v/o, shared by every head, masked in place
# (zeroed, shapes unchanged; prunelab.structure.groups says why it cannot be sliced)
ATTENTION_SPACES = ("heads", "head_dim")


def period_starts(gen_steps: int, periods: int = OFFICIAL_PERIODS) -> list[int]:
    """First generator step (1-based) of each of ``periods`` near-equal periods of ``gen_steps``."""
    return [math.ceil(e * gen_steps / periods) + 1 for e in range(periods)]


def official_generator_lr(step: int, gen_steps: int, lr: float) -> float:
    """The official generator learning rate at generator step ``step`` of ``gen_steps``: a
    per-period cosine from lr to 0.1·lr over the 4 periods (CosineAnnealingLR's value at epoch
    e of T_max = 4), and ×0.2 for the steps after 4/5 of the last period."""
    starts = period_starts(gen_steps)
    e = max(i for i, s0 in enumerate(starts) if s0 <= step) if step >= starts[0] else 0
    floor = OFFICIAL_LR_FLOOR * lr
    value = floor + (lr - floor) * (1 + math.cos(math.pi * e / OFFICIAL_PERIODS)) / 2
    if e == OFFICIAL_PERIODS - 1:
        length = gen_steps - starts[-1] + 1
        if step - starts[-1] + 1 > int(OFFICIAL_CUT_AT * length):
            value *= OFFICIAL_LR_CUT
    return value


def heldout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(the LoRA step's indices, the generator's held-out indices) of ``n`` training features:
    a seeded random ``fraction`` held out (at least one, and at least one left for LoRA)."""
    if n < 2:
        raise ConfigError(f"method.generator_data=heldout needs at least 2 training examples, got {n}")
    k = min(n - 1, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(perm[:k])
    return [i for i in range(n) if i not in held], sorted(held)


@dataclass
class GeneratorConfig:
    encoder: str = "transformer"  # transformer | gru (the earlier work's bidirectional GRU)
    dim: int = 64
    heads: int = 4
    layers: int = 2
    temperature: float = 0.4
    offset: float = 3.0  # > 0: every structure starts kept
    lr: float = 1e-2  # logits must move by ~offset within a short run

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise bad_value("method.generator.encoder", self.encoder, ENCODERS)
        for key in ("dim", "heads", "layers"):
            v = getattr(self, key)
            if not (isinstance(v, int) and v > 0):
                raise ConfigError(f"method.generator.{key}={v!r} must be a positive integer")
        if self.encoder == "transformer" and self.dim % self.heads:
            raise ConfigError(
                f"method.generator.heads={self.heads} must divide method.generator.dim={self.dim}"
            )
        for key in ("temperature", "lr"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"method.generator.{key}={v!r} must be positive")
        if not (isinstance(self.offset, (int, float)) and self.offset > 0):
            raise ConfigError(
                f"method.generator.offset={self.offset!r} must be positive (structures start kept)"
            )


def structure_params(arch: ArchInfo, unit: Unit) -> int:
    """Parameters one structure of ``unit`` holds: a KV group with its heads; a shared q/k
    channel — its q row in every query head, its k row in every KV head, as the official
    accounting counts it ((n_heads + n_kv)·hidden, train_llm.py ``caculate_remaining_parmams``);
    a shared v/o channel — v rows, o columns, likewise; an MLP channel (gate/up rows, down column)."""
    per = {
        "attn": arch.attn_group_params,
        "qk": arch.qk_channel_params,
        "vo": arch.vo_channel_params,
    }
    return per[unit.kind](unit.layer) if unit.kind in per else arch.mlp_channel_params()


def budget_loss(kept: torch.Tensor, target: float) -> torch.Tensor:
    """log(max(r, p) / min(r, p)) = |log r − log p|: zero exactly at the target."""
    return (kept.double().clamp_min(1e-12).log() - math.log(target)).abs()  # fp64: exactly 0 at p


def kept_fraction(decisions: dict[str, torch.Tensor], weights: dict[str, int], total: int) -> torch.Tensor:
    """Kept fraction of the prunable parameters (differentiable through ``decisions``)."""
    return sum(decisions[k].sum() * w for k, w in weights.items()) / total


def meet_budget(
    keep: dict[str, torch.Tensor], margins: dict[str, torch.Tensor], weights: dict[str, int], target: float
) -> tuple[dict[str, torch.Tensor], int]:
    """Flip decisions, least confident first, while a flip brings the kept parameters closer to
    ``target``: a structure too large for the remaining gap is skipped, not the end of the
    search, so the result is within half of the *smallest* structure of the target wherever
    enough of them can flip (at least one structure per unit stays); returns (keep, flips)."""
    keep = {k: v.clone() for k, v in keep.items()}
    flips = 0
    for k, v in keep.items():  # a unit left empty keeps its most confident structure
        if not bool(v.any()):
            v[int(torch.argmax(margins[k]))] = True
            flips += 1
    kept = sum(int(keep[k].sum()) * w for k, w in weights.items())
    if kept > target:  # prune the kept structures with the smallest margins
        cand = sorted(
            (float(margins[k][i]), k, i) for k in keep for i in torch.nonzero(keep[k]).flatten().tolist()
        )
        for _, k, i in cand:
            if weights[k] >= 2 * (kept - target):  # would land as far or farther on the other side
                continue
            if int(keep[k].sum()) > 1:
                keep[k][i] = False
                kept -= weights[k]
                flips += 1
    else:  # restore the pruned structures with the largest margins
        cand = sorted(
            (-float(margins[k][i]), k, i) for k in keep for i in torch.nonzero(~keep[k]).flatten().tolist()
        )
        for _, k, i in cand:
            if weights[k] >= 2 * (target - kept):
                continue
            keep[k][i] = True
            kept += weights[k]
            flips += 1
    return keep, flips


def _lora_members(model: nn.Module, arch: ArchInfo, unit: Unit) -> Iterator[tuple[Member, torch.Tensor]]:
    """(member, adapter weight) for every LoRA matrix holding slices of ``unit``'s structures:
    lora_B rows of its output linears, lora_A columns of its input linear."""
    layer = decoder_layers(model)[unit.layer]
    for m in weight_members(arch, unit):
        for t in lora_slices(layer.get_submodule(m.path), m):
            yield m, t


def lora_group_norms(model: nn.Module, arch: ArchInfo, unit: Unit) -> torch.Tensor:
    """‖LoRA slices‖ of every structure of ``unit`` over all its adapter matrices."""
    sq = torch.zeros(unit.n)
    for m, t in _lora_members(model, arch, unit):
        sq += grouped(t.detach().float(), m).pow(2).sum(1).cpu()
    return sq.sqrt()


@torch.no_grad()
def group_lasso_prox(
    model: nn.Module, arch: ArchInfo, unit: Unit, pruned: torch.Tensor, threshold: float
) -> None:
    """The proximal step of threshold·Σ_g √p_g·‖w_g‖ over the pruned structures' LoRA slices,
    one group per structure and adapter matrix (its lora_B rows in q/k/v/gate/up, its lora_A
    columns in o/down; p_g = the group's entries, the usual group-lasso weighting):
    w_g ← w_g · max(0, 1 − threshold·√p_g / ‖w_g‖) — exact zeros once ‖w_g‖ ≤ threshold·√p_g.
    Per matrix, not per structure: the B rows that carry a pruned structure's output start at
    zero and are zeroed exactly, whatever the (randomly initialised) A columns weigh."""
    for m, t in _lora_members(model, arch, unit):
        groups = grouped(t, m).float()  # [n, p_g]
        factor = (1 - threshold * groups.shape[1] ** 0.5 / groups.norm(dim=1).clamp_min(1e-30)).clamp_min(0)
        factor = torch.where(pruned.to(factor.device), factor, torch.ones_like(factor))
        shape = (-1, 1) if m.dim == 0 else (1, -1)
        t.mul_(expand_groups(factor.to(t.dtype), m, t.shape[m.dim]).view(shape))


class _Gates:
    """Forward hooks that apply decisions to the structures' output rows: ``hard`` on the
    frozen path (peft's base layer), ``soft`` on the merged path (the LoRA wrapper)."""

    def __init__(self, arch: ArchInfo, todo: list[Unit]) -> None:
        self.arch, self.todo = arch, todo
        self.mode: str | None = None
        self.values: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def _hook(self, key: str, member: Member, mode: str):
        def hook(module, args, out):
            if self.mode != mode:
                return None
            # a block per structure (heads, channels), or a shared head-dimension channel tiled
            # over the heads (q/k/v rows h·head_dim + j)
            return out * expand_groups(self.values[key].to(out.device, out.dtype), member, out.shape[-1])

        return hook

    def install(self, model: nn.Module) -> None:
        layers = decoder_layers(model)
        for u in self.todo:
            for m in weight_members(self.arch, u):
                if m.dim != 0:  # the structure's output rows: q/k/v, gate/up
                    continue
                mod = layers[u.layer].get_submodule(m.path)
                self.handles.append(mod.base_layer.register_forward_hook(self._hook(u.key, m, "hard")))
                self.handles.append(mod.register_forward_hook(self._hook(u.key, m, "soft")))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class JointTraining:
    """ATP's hooks into the LoRA trainer as one object: before each LoRA step, the generator
    step on the same batch (LoRA frozen), the deterministic decisions as hard gates and the
    freeze once the budget holds (``before_step``); after it, the group-lasso proximal step
    on the pruned structures' LoRA slices (``after_step``)."""

    def __init__(
        self,
        method: ATP,
        arch: ArchInfo,
        todo: list[Unit],
        weights: dict[str, int],
        target: float,
        steps: int,
        device: torch.device,
        tracker: Any = None,
        heldout: list[Feature] | None = None,
        pad_id: int = 0,
        lora_indices: list[int] | None = None,
    ) -> None:
        g = method.generator
        self.method, self.arch, self.todo, self.weights = method, arch, todo, weights
        self.schedule = getattr(method, "schedule", "fast")
        self.mode = getattr(method, "generator_mode", "train")
        # the generator step's batches: held-out features (None: the LoRA step's own batch)
        self.heldout, self.pad_id = heldout, pad_id
        # the training indices the LoRA step may draw (None: all, the trainer's own sampler)
        self.lora_indices = lora_indices
        self._lora_order: list[int] = []
        self._lora_rng = torch.Generator().manual_seed(getattr(method, "seed", 0))
        trainer = getattr(method, "trainer", None)
        self.batch_size = getattr(trainer, "batch_size", 1)
        self.micro_batch_size = getattr(trainer, "micro_batch_size", self.batch_size)
        self._order: list[int] = []
        self._heldout_rng = torch.Generator().manual_seed(getattr(method, "seed", 0) + 104729)
        self.prunable = sum(u.n * weights[u.key] for u in todo)
        self.target, self.steps, self.tracker = target, steps, tracker
        self.gen = DecisionGenerator(
            todo, arch.num_layers, g.dim, g.heads, g.layers, g.encoder, g.temperature, g.offset, method.seed
        ).to(device)
        self.gen_opt = torch.optim.AdamW(self.gen.parameters(), lr=g.lr, weight_decay=0.0)
        # float16 models: the generator's loss is scaled as the LoRA step's is (set in setup)
        self.gen_scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.gen_skipped: list[int] = []  # float16: generator steps skipped on a gradient overflow
        self.gates = _Gates(arch, todo)
        self.state: dict[str, Any] = {
            "frozen": None,
            "below": 0,
            "frozen_at": None,
            "forced": False,
            "flips": 0,
            "period": 0,
        }
        self.log: list[dict] = []
        self.freeze_limit = max(1, math.floor(method.freeze_by * steps))  # the generator's steps
        self.starts = period_starts(self.freeze_limit)

    def hooks(self, select_from: int) -> TrainHooks:
        from prunelab.recovery.train_state import config_key

        key = {
            "method": config_key(self.method, drop=("train",)),
            "units": [u.key for u in self.todo],
            "weights": self.weights,
            "target": self.target,
            "lora_indices": self.lora_indices,
            "heldout": len(self.heldout) if self.heldout is not None else None,
        }
        return TrainHooks(
            setup=self.setup,
            before_step=self.before_step,
            after_step=self.after_step,
            sample=self.sample if self.lora_indices is not None else None,
            select_from=select_from,
            state=self.resume_state,
            load_state=self.load_resume_state,
            key=key,
        )

    def setup(self, peft_model: nn.Module) -> None:
        """Adapters attached: the gates go in; a float16 model gets a generator loss scaler."""
        self.gates.install(peft_model)
        self.gen_scaler = loss_scaler(peft_model)

    def resume_state(self) -> dict[str, Any]:
        """What the joint training carries from step to step besides LoRA: the generator, its
        optimizer and noise stream, the freeze state, the decision log and both data cursors."""
        from prunelab.recovery.train_state import optimizer_state

        return {
            "generator": self.gen.state_dict(),
            "generator_optimizer": optimizer_state(self.gen_opt),
            "noise": self.gen._g.get_state(),
            "freeze": self.state,
            "log": self.log,
            "lora_order": self._lora_order,
            "lora_rng": self._lora_rng.get_state(),
            "heldout_order": self._order,
            "heldout_rng": self._heldout_rng.get_state(),
            "generator_scaler": self.gen_scaler.state_dict() if self.gen_scaler.is_enabled() else None,
            "generator_skipped": self.gen_skipped,
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        from prunelab.recovery.train_state import load_optimizer_state

        self.gen.load_state_dict(state["generator"])
        load_optimizer_state(self.gen_opt, state["generator_optimizer"])
        self.gen._g.set_state(state["noise"])
        self.state.clear()
        self.state.update(state["freeze"])
        self.log[:] = state["log"]
        self._lora_order = list(state["lora_order"])
        self._lora_rng.set_state(state["lora_rng"])
        self._order = list(state["heldout_order"])
        self._heldout_rng.set_state(state["heldout_rng"])
        if self.gen_scaler.is_enabled() and state.get("generator_scaler") is not None:
            self.gen_scaler.load_state_dict(state["generator_scaler"])
        self.gen_skipped = list(state.get("generator_skipped", []))

    def sample(self, step: int, n: int) -> list[int]:
        """The LoRA step's training indices: epoch-wise permutations of the indices not held out
        (the trainer's own sampler, restricted)."""
        while len(self._lora_order) < n:
            perm = torch.randperm(len(self.lora_indices), generator=self._lora_rng).tolist()
            self._lora_order += [self.lora_indices[i] for i in perm]
        idx, self._lora_order = self._lora_order[:n], self._lora_order[n:]
        return idx

    def deterministic(self) -> dict[str, torch.Tensor]:
        """The decisions now: frozen ones once frozen, else the generator's noise-free ones."""
        if self.state["frozen"] is not None:
            return self.state["frozen"]
        return {k: v.cpu() for k, v in self.gen.decisions().items()}

    def freeze(self, step: int, forced: bool) -> None:
        keep, flips = meet_budget(
            self.deterministic(), self.gen.margins(), self.weights, self.target * self.prunable
        )
        self.state.update(frozen=keep, frozen_at=step, forced=forced, flips=flips)
        self.log.append({"step": step, "event": "freeze", "forced": forced, "flips": flips})
        _log.info(
            "atp: decisions frozen at step %d/%d (%s; %d flipped to meet the budget)",
            step,
            self.steps,
            "forced at method.freeze_by" if forced else "budget loss within method.freeze_tolerance",
            flips,
        )

    def generator_batches(self, batches: list) -> list:
        """The generator step's micro-batches: ``batch_size`` held-out features (epoch-wise
        permutations of the held-out pool, similar lengths together), or the LoRA step's own
        ``batches`` without a held-out pool."""
        if self.heldout is None:
            return batches
        while len(self._order) < self.batch_size:
            self._order += torch.randperm(len(self.heldout), generator=self._heldout_rng).tolist()
        idx, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        idx.sort(key=lambda i: len(self.heldout[i]["input_ids"]))
        mb = self.micro_batch_size
        return [
            collate([self.heldout[i] for i in idx[j : j + mb]], self.pad_id) for j in range(0, len(idx), mb)
        ]

    @contextmanager
    def model_mode(self, peft_model: nn.Module) -> Iterator[None]:
        """The model's mode for the generator step: ``eval`` turns dropout off (LoRA's and the
        attention's), as the official hypernet_step's ``llm_model.eval()``; activation
        checkpointing, which transformers gates on each decoder layer's own ``training``
        flag, stays as it was."""
        if self.mode != "eval":
            yield
            return
        was = peft_model.training
        peft_model.eval()
        layers = decoder_layers(peft_model)
        if was and any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
            for layer in layers:  # the layer itself only: its dropout submodules stay off
                layer.training = True
        try:
            yield
        finally:
            peft_model.train(was)

    def count_quiet(self, step: int, det_loss: float, sampled: float) -> bool:
        """Count generator step ``step`` as quiet or not; whether the decisions freeze now.
        official: the step's sampled-decision budget loss ≤ tolerance, the count restarting
        with each of the 4 periods (the official counter is local to an epoch); fast: the
        deterministic decisions' budget loss < tolerance. Either way at ``freeze_limit``."""
        m, state = self.method, self.state
        if self.schedule == "official":
            period = sum(1 for s0 in self.starts if s0 <= step) - 1
            if period != state["period"]:
                state["period"], state["below"] = period, 0
            state["below"] = state["below"] + 1 if sampled <= m.freeze_tolerance else 0
        else:
            state["below"] = state["below"] + 1 if det_loss < m.freeze_tolerance else 0
        return state["below"] >= m.freeze_patience or step >= self.freeze_limit

    def generator_lr(self, step: int) -> float:
        """The generator's learning rate at generator step ``step``."""
        lr = self.method.generator.lr
        return official_generator_lr(step, self.freeze_limit, lr) if self.schedule == "official" else lr

    def lm_loss(self, peft_model: nn.Module, batches: list) -> torch.Tensor:
        """Token-weighted mean LM loss of ``batches`` (called inside ``model_mode``)."""
        count = max(1, sum(target_count(b) for b in batches))  # as the LoRA step counts
        return sum(loss_sum(peft_model, b) for b in batches) / count

    def before_step(self, peft_model: nn.Module, step: int, steps: int, batches: list) -> None:
        m, state = self.method, self.state
        if state["frozen"] is None:  # 1. the generator step (LoRA frozen for it)
            lora = [p for p in peft_model.parameters() if p.requires_grad]
            for p in lora:
                p.requires_grad_(False)
            self.gen.train()
            lr = self.generator_lr(step)
            for group in self.gen_opt.param_groups:
                group["lr"] = lr
            self.gen_opt.zero_grad(set_to_none=True)
            soft, hard = self.gen(noise=True)
            self.gates.mode, self.gates.values = "soft", soft
            # the backward inside the same mode: activation checkpointing recomputes the forward
            # there, and a recomputation in train mode (dropout on) would not match the first pass
            with self.model_mode(peft_model):
                lm = self.lm_loss(peft_model, self.generator_batches(batches))
                bl = budget_loss(kept_fraction(hard, self.weights, self.prunable), self.target)
                sc = self.gen_scaler  # float16: scaled (the gradient crosses float16 activations)
                sc.scale(lm + m.budget_weight * bl).backward()
            lm_loss = check_value(  # (synced for the log anyway) before the generator's update
                float(lm.detach()), f"atp generator step {step}/{steps}: the LM loss", TRAIN_HINT
            )
            sc.unscale_(self.gen_opt)
            if not sc.is_enabled():  # float16 skips an overflowing step below; elsewhere it is an error
                norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in self.gen.parameters() if p.grad is not None]
                )
                if not math.isfinite(float(norm)):
                    raise NonFiniteError(
                        f"atp generator step {step}/{steps}: the generator's gradient is {float(norm)} "
                        f"although the LM loss {lm_loss:.4g} is finite; {TRAIN_HINT}"
                    )
            if self.schedule == "official":
                torch.nn.utils.clip_grad_norm_(self.gen.parameters(), OFFICIAL_CLIP)
            before = sc.get_scale() if sc.is_enabled() else None
            sc.step(self.gen_opt)  # float16: skipped when the scaled gradient overflowed
            if sc.is_enabled():
                sc.update()
                if sc.get_scale() < before:
                    self.gen_skipped.append(step)
                    _log.info("atp generator step %d skipped (float16 gradient overflow)", step)
            for p in lora:
                p.requires_grad_(True)
            det = self.deterministic()
            r = float(kept_fraction({k: v.float() for k, v in det.items()}, self.weights, self.prunable))
            det_loss = float(budget_loss(torch.tensor(r), self.target))
            sampled = float(bl.detach())
            freeze = self.count_quiet(step, det_loss, sampled)
            entry = {
                "step": step,
                "lm_loss": lm_loss,
                "budget_loss": det_loss,
                "sampled_budget_loss": sampled,
                "generator_lr": lr,
                "kept_params": r,
                "kept": {k: float(v.float().mean()) for k, v in det.items()},
            }
            self.log.append(entry)
            if self.tracker is not None:
                self.tracker.log(
                    {
                        "atp/budget_loss": det_loss,
                        "atp/kept_params": r,
                        "atp/generator_lm_loss": lm_loss,
                        **{f"atp/kept/{k}": v for k, v in entry["kept"].items()},
                    },
                    step=step,
                )
            if freeze:
                self.freeze(step, forced=state["below"] < m.freeze_patience)
        self.gates.mode, self.gates.values = "hard", {k: v.float() for k, v in self.deterministic().items()}

    def after_step(self, peft_model: nn.Module, step: int, steps: int) -> None:
        # 2. the LoRA step's group lasso over the pruned structures' LoRA slices, by its
        # proximal operator (threshold lr_t·λ): exact zeros, which its subgradient under
        # Adam never reaches (it oscillates at the scale of the learning rate)
        if self.method.lasso == 0:
            return
        lr = self.method.trainer.lr_at(step, steps)
        for u in self.todo:
            pruned = ~self.gates.values[u.key].bool()
            if bool(pruned.any()):
                group_lasso_prox(peft_model, self.arch, u, pruned, lr * self.method.lasso)


@dataclass
class ATP(PruningMethod):
    name: str = "atp"
    targets: tuple[str, ...] = field(default_factory=lambda: tuple(COUPLED_MODULES))
    keep_first_layers: float | int = 0
    keep_last_layers: float | int = 0
    generator: Any = field(default_factory=dict)
    budget_weight: float = 5.0  # the reference's weight on the log-ratio budget loss
    lasso: float = 1.0  # λ of the group lasso on pruned structures' LoRA slices (√p_g-weighted)
    schedule: str = "official"  # the generator's training and freeze schedule: official | fast (SCHEDULES)
    freeze_tolerance: float | None = None  # budget loss within this ... (None: the schedule's)
    freeze_patience: int | None = None  # ... for this many generator steps freezes the decisions
    freeze_by: float | None = None  # at the latest at this fraction of the run
    generator_data: str = "heldout"  # the generator step's batches: heldout | shared (the LoRA step's)
    generator_mode: str = "eval"  # the model's mode in the generator step: eval (no dropout) | train
    attention_space: str = "heads"  # heads (KV groups, removed) | head_dim (the paper's; masked in place)
    heldout_fraction: float = 0.1  # of the training data, held out of the LoRA step for the generator
    train: dict[str, Any] = field(default_factory=dict)  # the joint LoRA training: keys of recovery=lora
    seed: int = 0

    sparse: ClassVar[bool] = False
    trains: ClassVar[bool] = True
    sub_configs: ClassVar[dict[str, type]] = {"generator": GeneratorConfig, "train": LoraRecovery}
    then_recover: ClassVar[bool] = False  # the joint training is the recovery (one stage)
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.targets = lora_targets(self.targets)
        self.generator = sub_config(GeneratorConfig, self.generator, "method.generator")
        for key in ("budget_weight", "lasso"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"method.{key}={v!r} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise bad_value("method.schedule", self.schedule, tuple(SCHEDULES))
        for key, default in SCHEDULES[self.schedule].items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.generator_data not in GENERATOR_DATA:
            raise bad_value("method.generator_data", self.generator_data, GENERATOR_DATA)
        if self.generator_mode not in GENERATOR_MODES:
            raise bad_value("method.generator_mode", self.generator_mode, GENERATOR_MODES)
        if self.attention_space not in ATTENTION_SPACES:
            raise bad_value("method.attention_space", self.attention_space, ATTENTION_SPACES)
        if not (isinstance(self.heldout_fraction, (int, float)) and 0 < self.heldout_fraction < 1):
            raise ConfigError(f"method.heldout_fraction={self.heldout_fraction!r} must be in (0, 1)")
        if not (isinstance(self.freeze_tolerance, (int, float)) and self.freeze_tolerance > 0):
            raise ConfigError(f"method.freeze_tolerance={self.freeze_tolerance!r} must be positive")
        if not (isinstance(self.freeze_patience, int) and self.freeze_patience > 0):
            raise ConfigError(f"method.freeze_patience={self.freeze_patience!r} must be a positive integer")
        if not (isinstance(self.freeze_by, (int, float)) and 0 < self.freeze_by <= 1):
            raise ConfigError(f"method.freeze_by={self.freeze_by!r} must be a fraction of the run in (0, 1]")
        train = dict(plain(self.train))
        if "patience" in train:
            raise ConfigError("method.train.patience cannot be set: the decisions need the whole run")
        self.trainer = method_trainer(
            train,
            "atp",
            self.seed,
            self.targets,
            why="the LoRA step and the group lasso need an adapter on every module of a pruned structure",
        )
        self.history: dict[str, Any] = {}
        self.final_plan: PrunePlan | None = None

    def layers(self, num_layers: int) -> list[int]:
        return prunable_layers(num_layers, self.keep_first_layers, self.keep_last_layers)

    @property
    def search_kinds(self) -> tuple[str, ...]:
        """The structure kinds the generator decides: ``attn`` is whole KV groups, or under
        ``attention_space=head_dim`` the shared q/k and v/o channels (``qk``, ``vo``)."""
        if self.attention_space == "heads":
            return self.targets
        return tuple(k for t in self.targets for k in (("qk", "vo") if t == "attn" else (t,)))

    def check(self, data_cfg: Any = None) -> None:
        check_trainer(self.trainer, data_cfg)

    def prune(self, model: nn.Module, plan: PrunePlan, ctx: PruneContext) -> Masks:
        """Joint generator + LoRA training; returns the keep masks. The model comes back with
        LoRA merged (pruned structures still present, removed by the runner)."""
        arch = arch_info(model.config)
        todo = [u for u in units(arch, self.search_kinds) if u.layer in plan.prunable_layers]
        weights = {u.key: structure_params(arch, u) for u in todo}
        prunable = sum(u.n * weights[u.key] for u in todo)
        target = (prunable - plan.requested * plan.params_before) / prunable  # kept fraction p
        floor = sum(weights.values()) / prunable  # one structure per unit stays
        if not floor <= target < 1:
            raise ConfigError(
                f"ratio={plan.requested} cannot be met by pruning the {'/'.join(self.search_kinds)} structures "
                f"of layers {plan.prunable_layers} (method.attention_space={self.attention_space}: at most "
                f"{1 - floor:.3f} of their parameters can go)"
            )
        tr = self.trainer
        train, val, extra = tr.features_for(ctx.tokenizer, ctx.data_cfg)
        # the LoRA steps of the whole training split: held-out batches or not, ATP trains as
        # many steps (and tokens) as the two-stage baseline's recovery on the same data
        steps = tr.num_steps(len(train))
        heldout = lora_indices = None
        if self.generator_data == "heldout":  # the generator's batches: never seen by the LoRA step
            lora_indices, held = heldout_split(len(train), self.heldout_fraction, self.seed)
            heldout = [train[i] for i in held]
        joint = JointTraining(
            self,
            arch,
            todo,
            weights,
            target,
            steps,
            next(model.parameters()).device,
            ctx.tracker,
            heldout=heldout,
            pad_id=pad_id_of(ctx.tokenizer),
            lora_indices=lora_indices,
        )
        try:
            # the final adapter: the lasso has had the whole post-freeze run to zero the pruned
            # slices (an earlier "best" adapter would bring their LoRA paths back)
            merged = tr.fit_features(
                model,
                ctx.tokenizer,
                train,
                val,
                ctx.out_dir,
                ctx.tracker,
                extra,
                hooks=joint.hooks(select_from=steps),
            )
        finally:
            joint.gates.remove()
        if merged is not model:
            raise RuntimeError("LoRA merge must update the model in place")
        state, log = joint.state, joint.log
        keep = state["frozen"]
        masks = {u.key: keep[u.key].clone() for u in todo if not bool(keep[u.key].all())}
        # the trainer's merge check compares the trained model (LoRA-aware forward, final
        # decisions) with the merged model whose pruned structures are masked == removed
        fit = json.loads((Path(ctx.out_dir) / "history.json").read_text())
        removal = fit["merge_max_abs_diff"]
        remove = {k: int((~v).sum()) for k, v in masks.items()}
        removed = sum(n * weights[k] for k, n in remove.items())
        # masked-only channels (head_dim) count as removed, as in the official accounting; the
        # runner records the stored count beside it
        masked = masked_params(arch, masks)
        if masked != sum(n * weights[k] for k, n in remove.items() if k.split(".")[1] in ("qk", "vo")):
            raise RuntimeError("atp: the masked-channel count disagrees with the generator's weights")
        after = plan.params_before - removed
        self.final_plan = PrunePlan(
            plan.requested,
            1 - after / plan.params_before,
            plan.params_before,
            after,
            self.search_kinds,
            plan.prunable_layers,
            remove,
        )
        if abs(self.final_plan.achieved - plan.requested) > ctx.ratio_tolerance * plan.requested:
            raise RuntimeError(
                f"atp achieved ratio {self.final_plan.achieved:.4f} for ratio={plan.requested}, outside "
                f"ratio_tolerance={ctx.ratio_tolerance}: the decisions frozen at step {state['frozen_at']} "
                "could not meet the budget with the structures left to flip"
            )
        history = {
            "attention_space": self.attention_space,
            "params_masked": masked,  # in place (zeroed), still stored; 0 under heads
            "schedule": self.schedule,
            "generator_steps": joint.freeze_limit,
            "generator_data": self.generator_data,
            "generator_mode": self.generator_mode,
            "heldout_examples": len(heldout) if heldout is not None else 0,
            "target_kept_fraction": target,
            "frozen_at": state["frozen_at"],
            **(
                {
                    "generator_loss_scaling": {
                        "skipped_steps": joint.gen_skipped,
                        "final_scale": joint.gen_scaler.get_scale(),
                    }
                }
                if joint.gen_scaler.is_enabled()
                else {}
            ),
            "freeze_forced": state["forced"],
            "budget_flips": state["flips"],
            "decisions": log,
            "steps": steps,
            "removal_max_abs_logit_change": removal,
            "plan": self.final_plan.to_dict(),
        }
        self.history = history
        run_dir = Path(ctx.run_dir or ctx.out_dir)
        (run_dir / "atp_decisions.json").write_text(json.dumps(log, indent=2) + "\n")
        png = plot_decisions(log, run_dir / "atp_decisions.png")
        if ctx.tracker is not None:
            ctx.tracker.image("atp/decisions", png)
        return masks


def plot_decisions(log: list[dict], path: str | Path) -> Path:
    """Kept fraction per (layer, kind) over the generator steps; the budget in the title. PNG."""
    from prunelab.plotting import pyplot, save_figure

    plt = pyplot()

    points = [e for e in log if "kept" in e]
    keys = sorted(points[0]["kept"], key=lambda k: (k.split(".")[1], int(k.split(".")[0]))) if points else []
    order = ("attn", "qk", "vo", "mlp")
    kinds = sorted({k.split(".")[1] for k in keys}, key=order.index) or ["attn", "mlp"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, kind in zip(axes, kinds, strict=True):
        for k in (k for k in keys if k.split(".")[1] == kind):
            ax.plot(
                [e["step"] for e in points], [e["kept"][k] for e in points], label=f"layer {k.split('.')[0]}"
            )
        freeze = [e["step"] for e in log if e.get("event") == "freeze"]
        for s in freeze:
            ax.axvline(s, color="k", linestyle=":", linewidth=1)
        ax.set_title(f"{kind}: kept fraction")
        ax.set_xlabel("step")
    axes[0].set_ylabel("kept")
    axes[-1].legend(fontsize=6, ncol=2)
    return save_figure(fig, path)
