"""LoRAShear (Chen et al. 2023): progressive structured pruning of the base weights while
LoRA keeps learning, then dynamic knowledge recovery.

    prunelab method=lorashear ratio=0.2
    prunelab -m method=lorashear ratio=0.5 method.lora_aware=false,true   # an ablation

The four parts, each switchable by config for ablations:

1. **LoRA-aware groups** (``lora_aware``): a head group / MLP channel owns its LoRA slices
   (lora_B rows of q/k/v/gate/up, lora_A columns of o/down); the projection acts on the
   effective weight W + s·B·A and zeroes the slices, so a redundant group is exactly zero
   in the merged model. Off: the projection sees W only and LoRA keeps training the slices
   (the merge refills the group; its removal then costs accuracy).
2. **Knowledge distribution analysis** (``knowledge``): every (layer, attn|mlp) group of
   the prunable layers is pruned alone with magnitude scores at ``ratios``, its perplexity
   deviation measured on ``tokens`` held-out validation tokens of the run's data, and the
   model restored bit-exactly; the ``gamma`` fraction with the largest mean deviation is
   never pruned (the target moves to the other groups). Results: ``knowledge_distribution
   .json`` and ``.png`` in the run directory, the PNG also in W&B.
3. **LHSPG** (``lhspg``): ``warmup_steps`` of plain LoRA training, then ``periods`` periods
   of ``period_steps``. At each period start the least salient not-yet-redundant groups of
   each unit join the redundant set so that the plan's per-unit count is reached by the last
   period (p/P of it after period p). During the period, after every optimizer step, the
   half-space projected step drives them to zero — λ_g = ‖x_g‖/steps_left (a linear decay
   that reaches exactly zero at the period's last step), projection to zero when
   ⟨x̃_g, W_g⟩ < ε‖W_g‖² (ε = ``epsilon``, default 0) — and at period end LoRA is merged
   into the base weights, *after* the next period's selection (that step is both): the
   selection must see the B·A the period learned, which the merge resets to zero. Off: all redundant groups are chosen after the warm-up and zeroed
   at once (one-shot), the same steps then train around them.
4. **Dynamic knowledge recovery** (``recovery``, see recovery.py): text stage, then
   instruction stage, mixture rebuilt from per-source degradation. ``recovery.dynamic=false``
   keeps each stage's natural mixture; ``recovery.enabled=false`` skips the stage.

``ratio`` is the fraction of all parameters removed, as for every structured method; the
per-unit counts come from the same planner as LLM-Pruner's (uniform over the pruned units),
re-planned around the unprunable groups.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunelab.errors import ConfigError, bad_value
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
from prunelab.methods.lorashear.recovery import DynamicRecovery
from prunelab.numerics import check_scores
from prunelab.recovery.lora import TRAIN_HINT, LoraRecovery, TrainHooks
from prunelab.structure import Unit, arch_info, units
from prunelab.structure.groups import Masks
from prunelab.structure.plan import PrunePlan, plan_ratio, prunable_layers

_log = logging.getLogger(__name__)
SALIENCY = ("lora_aware", "magnitude")
SCOPES = ("global", "unit")


@dataclass
class KnowledgeConfig:
    enabled: bool = True
    gamma: float = 0.25  # fraction of (layer, attn|mlp) groups kept unprunable
    ratios: list[float] = field(default_factory=lambda: [0.25, 0.5])  # probe ratios per group
    tokens: int = 8192  # held-out validation tokens the deviation is measured on
    seq_len: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"method.knowledge.enabled={self.enabled!r} must be true or false")
        if not (isinstance(self.gamma, (int, float)) and 0 <= self.gamma < 1):
            raise ConfigError(f"method.knowledge.gamma={self.gamma!r} must be in [0, 1)")
        if not self.ratios or not all(isinstance(r, (int, float)) and 0 < r < 1 for r in self.ratios):
            raise ConfigError(f"method.knowledge.ratios={self.ratios!r} must be a non-empty list in (0, 1)")
        for key in ("tokens", "seq_len"):
            v = getattr(self, key)
            if not (isinstance(v, int) and v >= 2):
                raise ConfigError(f"method.knowledge.{key}={v!r} must be an integer >= 2")


@dataclass
class LHSPGConfig:
    enabled: bool = True
    warmup_steps: int = 10  # LoRA-only steps before the first period
    periods: int = 4  # P
    period_steps: int = 10  # steps per period
    epsilon: float = 0.0  # half-space threshold ε
    saliency: str = "lora_aware"  # lora_aware (‖W‖, |⟨W,BA⟩|, cos) | magnitude (‖W + BA‖)
    scope: str = "global"  # global: rank each kind's groups across layers | unit: the plan's per-unit counts
    min_keep: float = 0.1  # global scope: fraction of each unit's groups never selected (at least 1)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"method.lhspg.enabled={self.enabled!r} must be true or false")
        if self.scope not in SCOPES:
            raise bad_value("method.lhspg.scope", self.scope, SCOPES)
        if isinstance(self.min_keep, bool) or not (
            isinstance(self.min_keep, (int, float)) and 0 <= self.min_keep < 1
        ):
            raise ConfigError(f"method.lhspg.min_keep={self.min_keep!r} must be in [0, 1)")
        for key, lo in (("warmup_steps", 0), ("periods", 1), ("period_steps", 1)):
            v = getattr(self, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise ConfigError(f"method.lhspg.{key}={v!r} must be an integer >= {lo}")
        if not (isinstance(self.epsilon, (int, float)) and 0 <= self.epsilon < 1):
            raise ConfigError(f"method.lhspg.epsilon={self.epsilon!r} must be in [0, 1)")
        if self.saliency not in SALIENCY:
            raise bad_value("method.lhspg.saliency", self.saliency, SALIENCY)

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.periods * self.period_steps


def schedule(cfg: LHSPGConfig) -> tuple[list[int], list[int]]:
    """(selection steps, period end steps): groups are chosen after step s of the first list
    and reach zero at the matching end. Off: one selection after warm-up, zero at once."""
    if not cfg.enabled:
        return [cfg.warmup_steps], [cfg.warmup_steps + 1]
    starts = [cfg.warmup_steps + p * cfg.period_steps for p in range(cfg.periods)]
    return starts, [s + cfg.period_steps for s in starts]


class LHSPGSchedule:
    """LoRAShear's hooks into the LoRA trainer as one object: the periods' selection of
    redundant groups (at each period's start), the half-space projection after every
    optimizer step within a period, and the merge of B·A at each period's end."""

    def __init__(self, method: LoRAShear, arch: Any, todo: list[Unit], plan: PrunePlan) -> None:
        self.method, self.arch, self.todo, self.plan = method, arch, todo, plan
        self.redundant: Masks = {u.key: torch.zeros(u.n, dtype=torch.bool) for u in todo}
        self.starts, self.ends = schedule(method.lhspg)
        self.log: list[dict] = []
        self.touched = False  # whether a projection or merge has written the base weights yet
        self.model: nn.Module | None = None
        self.totals: dict[str, int] = {}  # global scope: groups to remove per kind, over all units
        for u in todo:
            self.totals[u.kind] = self.totals.get(u.kind, 0) + plan.remove.get(u.key, 0)

    def hooks(self, select_from: int) -> TrainHooks:
        from prunelab.recovery.train_state import config_key

        key = {
            "method": config_key(self.method, drop=("train", "recovery")),
            "units": [u.key for u in self.todo],
            "remove": self.plan.remove,
        }
        return TrainHooks(
            setup=self.setup,
            after_step=self.after_step,
            select_from=select_from,
            state=self.resume_state,
            load_state=self.load_resume_state,
            key=key,
        )

    def _lora_layers(self) -> dict[str, nn.Module]:
        """The LoRA layers, whose frozen base weights the projections and the period-end merges
        write (the only training that changes base weights)."""
        from prunelab.structure.groups import lora_parts

        return {n: m for n, m in self.model.named_modules() if lora_parts(m)}

    def _base_weights(self) -> dict[str, torch.Tensor]:
        """The frozen weights under every LoRA layer (a dispatched model: their values, read on
        the CPU one layer at a time)."""
        from prunelab.models.placement import materialized

        out = {}
        for n, m in self._lora_layers().items():
            with materialized(m, "cpu", write_back=False):
                out[f"{n}.weight"] = m.base_layer.weight
        return out

    def resume_state(self) -> dict[str, Any]:
        """The redundant sets, the event log and — once a period has begun writing them — the
        base weights under the LoRA layers."""
        return {
            "redundant": self.redundant,
            "log": self.log,
            "base": self._base_weights() if self.touched else None,
        }

    @torch.no_grad()
    def load_resume_state(self, state: dict[str, Any]) -> None:
        from prunelab.models.placement import materialized

        for k, v in self.redundant.items():  # in place: the method holds these
            v.copy_(state["redundant"][k])
        self.log[:] = state["log"]
        if state["base"] is not None:
            for n, m in self._lora_layers().items():
                with materialized(m):  # a dispatched model: written back into the offload store
                    m.base_layer.weight.copy_(state["base"][f"{n}.weight"])
            self.touched = True

    def setup(self, peft_model: nn.Module) -> None:
        self.model = peft_model
        if self.method.lhspg.warmup_steps == 0:
            self.after_step(peft_model, 0, self.method.lhspg.steps)  # select before the first step

    def after_step(self, peft_model: nn.Module, step: int, steps: int) -> None:
        from prunelab.methods.lorashear.lhspg import lhspg_step, merge_lora_into_base

        m, arch, starts, ends, redundant = self.method, self.arch, self.starts, self.ends, self.redundant
        n_sel = len(starts)
        active = [i for i, s in enumerate(starts) if s < step]  # periods begun
        merge = None
        if active:
            self.touched = True
            end = ends[active[-1]]
            left = max(1, end - step + 1)  # steps_left 1 = exactly zero now
            proj = lhspg_step(peft_model, arch, redundant, left, m.lhspg.epsilon, lora_aware=m.lora_aware)
            if step == end:
                # the effective weights W + s·B·A of every redundant group: exactly 0 here
                # with LoRA-aware groups (the ablation leaves LoRA's share in them)
                residual = m._residual(peft_model, arch, self.todo, redundant, effective=True)
                merge = {
                    "step": step,
                    "event": "period_end_merge",
                    "projected": proj,
                    "redundant_max_norm": residual,
                }
        if step in starts:
            # Before this step's merge: a period's end is the next one's start, and the merge
            # restarts B at zero — selecting after it would rank by ‖W‖ alone, not LoRA-aware.
            p = starts.index(step) + 1
            if m.lhspg.scope == "unit":
                want = {u.key: round(p / n_sel * self.plan.remove[u.key]) for u in self.todo}
                m._select(peft_model, arch, self.todo, redundant, want)
            else:
                want = {kind: round(p / n_sel * total) for kind, total in self.totals.items()}
                m._select_global(peft_model, arch, self.todo, redundant, want)
            self.log.append(
                {
                    "step": step,
                    "event": "select",
                    "redundant": {k: int(v.sum()) for k, v in redundant.items()},
                }
            )
            _log.info(
                "lorashear: LHSPG period %d/%d starts at step %d — %d redundant groups selected",
                p,
                n_sel,
                step,
                sum(self.log[-1]["redundant"].values()),
            )
        if merge is not None:
            merge_lora_into_base(peft_model)  # B·A into the kept groups; B restarts at 0
            self.log.append(merge)
            _log.info(
                "lorashear: LHSPG period %d/%d ends at step %d (redundant groups' max norm %.2e); LoRA merged",
                active[-1] + 1,
                n_sel,
                step,
                merge["redundant_max_norm"],
            )


@dataclass
class LoRAShear(PruningMethod):
    name: str = "lorashear"
    targets: tuple[str, ...] = field(default_factory=lambda: tuple(COUPLED_MODULES))
    keep_first_layers: float | int = 0  # the knowledge analysis decides what stays
    keep_last_layers: float | int = 0
    lora_aware: bool = True
    knowledge: Any = field(default_factory=dict)
    lhspg: Any = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # LoRA of the LHSPG phase: keys of recovery=lora
    recovery: Any = field(default_factory=dict)
    seed: int = 0

    sparse: ClassVar[bool] = False
    trains: ClassVar[bool] = True
    has_own_recovery: ClassVar[bool] = True  # part 4 replaces the `recovery` group's stage
    sub_configs: ClassVar[dict[str, type]] = {
        "knowledge": KnowledgeConfig,
        "lhspg": LHSPGConfig,
        "recovery": DynamicRecovery,
        "train": LoraRecovery,
    }
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.targets = lora_targets(self.targets)
        if not isinstance(self.lora_aware, bool):
            raise ConfigError(f"method.lora_aware={self.lora_aware!r} must be true or false")
        self.knowledge = sub_config(KnowledgeConfig, self.knowledge, "method.knowledge")
        self.lhspg = sub_config(LHSPGConfig, self.lhspg, "method.lhspg")
        rec = self.recovery
        rec = plain(rec)
        if isinstance(rec, dict):
            rec = {"seed": self.seed, **rec}
        self.recovery = sub_config(DynamicRecovery, rec, "method.recovery")
        train = dict(plain(self.train))
        for k in ("max_steps", "epochs", "patience"):
            if train.get(k) is not None:
                raise ConfigError(
                    f"method.train.{k} cannot be set: the LHSPG phase runs exactly method.lhspg.warmup_steps + "
                    "periods × period_steps optimizer steps"
                )
        self.trainer = method_trainer(
            train,
            "lorashear",
            self.seed,
            self.targets,
            why="LoRA-aware groups need an adapter on every module coupled to a pruned structure",
            max_steps=self.lhspg.steps,
            epochs=1e6,
        )
        self.history: dict[str, Any] = {}
        self.final_plan: PrunePlan | None = None

    def layers(self, num_layers: int) -> list[int]:
        return prunable_layers(num_layers, self.keep_first_layers, self.keep_last_layers)

    def check(self, data_cfg: Any = None) -> None:
        check_trainer(self.trainer, data_cfg)
        if self.recovery.enabled:
            self.recovery.check(data_cfg)

    # ------------------------------------------------------------------ part 2

    def _knowledge(self, model: nn.Module, arch: Any, plan: PrunePlan, ctx: PruneContext) -> dict:
        from prunelab.data.sources import build_source
        from prunelab.methods.lorashear.knowledge import knowledge_distribution, plot_knowledge

        k = self.knowledge
        source = build_source(ctx.data_cfg)
        split = "validation" if "validation" in getattr(source, "splits", ("validation",)) else "train"
        windows = source.calibration_windows(
            ctx.tokenizer, max(1, k.tokens // k.seq_len), k.seq_len, ctx.seed, split
        )
        report = knowledge_distribution(
            model,
            arch,
            windows.reshape(-1),
            seq_len=k.seq_len,
            ratios=tuple(k.ratios),
            gamma=k.gamma,
            layers=plan.prunable_layers,
            kinds=self.targets,
        )
        run_dir = Path(ctx.run_dir or ctx.out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        out = {**report.to_dict(), "split": split, "tokens": int(windows.numel())}
        (run_dir / "knowledge_distribution.json").write_text(json.dumps(out, indent=2) + "\n")
        png = plot_knowledge(report, run_dir / "knowledge_distribution.png")
        if ctx.tracker is not None and hasattr(ctx.tracker, "image"):
            ctx.tracker.image("lorashear/knowledge_distribution", png)
        return out

    # ------------------------------------------------------------------ part 3

    def _select(self, model: nn.Module, arch: Any, todo: list[Unit], redundant: Masks, want: dict) -> None:
        """Grow each unit's redundant set to ``want[key]`` with its least salient groups."""
        from prunelab.methods.lorashear.lhspg import group_norms, saliency

        for u in todo:
            have = int(redundant[u.key].sum())
            if want[u.key] <= have:
                continue
            if self.lhspg.saliency == "lora_aware":
                s = saliency(model, arch, u)
            else:
                s = group_norms(model, arch, u, effective=True)
            check_scores(
                {u.key: s}, f"lorashear's LHSPG selection ({self.lhspg.saliency} saliency)", TRAIN_HINT
            )
            s = s.masked_fill(redundant[u.key], math.inf)
            redundant[u.key][torch.sort(s, stable=True).indices[: want[u.key] - have]] = True

    def _select_global(
        self, model: nn.Module, arch: Any, todo: list[Unit], redundant: Masks, want: dict
    ) -> None:
        """Grow each kind's redundant set to ``want[kind]`` with the least salient groups of
        that kind across all layers (LHSPG as in the OTO family: one ranking on globally
        normalised scores), never taking a unit below ``lhspg.min_keep`` of its groups."""
        from prunelab.methods.lorashear.lhspg import group_norms, normalised_sum, saliency_terms

        for kind, target in want.items():
            mine = [u for u in todo if u.kind == kind]
            have = sum(int(redundant[u.key].sum()) for u in mine)
            if target <= have:
                continue
            what = f"lorashear's LHSPG selection ({self.lhspg.saliency} saliency of the {kind} groups)"
            if self.lhspg.saliency == "lora_aware":
                terms = [saliency_terms(model, arch, u) for u in mine]
                # checked before the global normalisation, which would spread one unit's NaN to all
                check_scores({u.key: t for u, t in zip(mine, terms, strict=True)}, what, TRAIN_HINT)
                scale = torch.stack([t.max(dim=1).values for t in terms]).max(dim=0).values
                scores = [normalised_sum(t, scale) for t in terms]
            else:
                scores = [group_norms(model, arch, u, effective=True) for u in mine]
                check_scores({u.key: sc for u, sc in zip(mine, scores, strict=True)}, what, TRAIN_HINT)
            owner = torch.cat([torch.full((u.n,), i) for i, u in enumerate(mine)])
            index = torch.cat([torch.arange(u.n) for u in mine])
            flat = torch.cat(
                [s.masked_fill(redundant[u.key], math.inf) for s, u in zip(scores, mine, strict=True)]
            )
            room = [
                u.n - max(1, math.ceil(self.lhspg.min_keep * u.n)) - int(redundant[u.key].sum()) for u in mine
            ]
            need = target - have
            for j in torch.sort(flat, stable=True).indices.tolist():
                if need == 0 or math.isinf(float(flat[j])):
                    break
                i = int(owner[j])
                if room[i] > 0:
                    redundant[mine[i].key][int(index[j])] = True
                    room[i] -= 1
                    need -= 1
            if need:
                raise ConfigError(
                    f"method.lhspg.min_keep={self.lhspg.min_keep} leaves too few {kind} groups to select "
                    f"{target}; lower it or use method.lhspg.scope=unit"
                )

    @staticmethod
    def _residual(model: nn.Module, arch: Any, todo: list[Unit], redundant: Masks, effective: bool) -> float:
        """The largest norm among the redundant groups (over all their coupled slices)."""
        from prunelab.methods.lorashear.lhspg import group_norms

        out = 0.0
        for u in todo:
            if bool(redundant[u.key].any()):
                out = max(out, float(group_norms(model, arch, u, effective)[redundant[u.key]].max()))
        return out

    def prune(self, model: nn.Module, plan: PrunePlan, ctx: PruneContext) -> Masks:
        """Knowledge analysis → re-plan → LoRA warm-up + LHSPG periods; returns the keep masks.
        The model comes back with LoRA merged and the redundant groups at zero (removed by the
        runner). Also measures the dense reference losses the recovery's mixer needs."""
        arch = arch_info(model.config)
        out_dir = Path(ctx.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        history: dict[str, Any] = {"parts": self.parts()}
        unprunable: list[str] = []
        if self.knowledge.enabled:
            history["knowledge"] = self._knowledge(model, arch, plan, ctx)
            unprunable = history["knowledge"]["unprunable"]
            plan = plan_ratio(
                arch, plan.requested, self.targets, plan.prunable_layers, ctx.ratio_tolerance, set(unprunable)
            )
        self.final_plan = plan
        if self.recovery.enabled:  # the dense model's losses: the mixer's degradation reference
            ref = self.recovery.reference_losses(model, ctx.tokenizer, ctx.data_cfg)
            (out_dir / "reference_losses.json").write_text(json.dumps(ref, indent=2) + "\n")
        if self.lhspg.scope == "unit":
            todo = [u for u in units(arch, self.targets) if plan.remove.get(u.key, 0) > 0]
        else:  # every unit the plan may prune competes; the plan fixes only each kind's total
            todo = [
                u
                for u in units(arch, self.targets)
                if u.layer in plan.prunable_layers and u.key not in set(unprunable)
            ]
        periods = LHSPGSchedule(self, arch, todo, plan)
        redundant, starts, ends, log = periods.redundant, periods.starts, periods.ends, periods.log
        tr = self.trainer
        train, val, extra = tr.features_for(ctx.tokenizer, ctx.data_cfg)
        steps = tr.num_steps(len(train))
        merged = tr.fit_features(
            model,
            ctx.tokenizer,
            train,
            val,
            out_dir,
            ctx.tracker,
            extra,
            hooks=periods.hooks(select_from=steps),
        )
        if merged is not model:
            raise RuntimeError("LoRA merge must update the model in place")
        got = {k: int(v.sum()) for k, v in redundant.items()}
        if self.lhspg.scope == "unit":
            short = {k: plan.remove[k] - n for k, n in got.items() if n != plan.remove[k]}
        else:
            done = {kind: sum(n for k, n in got.items() if k.endswith("." + kind)) for kind in periods.totals}
            short = {kind: t - done[kind] for kind, t in periods.totals.items() if done[kind] != t}
        if short:
            raise RuntimeError(f"lorashear ended short of the plan: {short}")
        if self.lhspg.scope == "global":  # the allocation LHSPG chose is the plan now
            plan = replace(plan, remove={k: n for k, n in got.items() if n > 0})
            plan.params_after = plan.params_before - sum(
                n
                * (
                    arch.attn_group_params(int(k.split(".")[0]))
                    if k.endswith(".attn")
                    else arch.mlp_channel_params()
                )
                for k, n in plan.remove.items()
            )
            plan.achieved = 1 - plan.params_after / plan.params_before
            self.final_plan = plan
        # How far from zero the redundant groups ended, in the merged model: 0.0 exactly with
        # LoRA-aware groups; the refill the merge brought back without them.
        residual = self._residual(model, arch, todo, redundant, effective=False)
        history.update(
            unprunable=unprunable,
            plan=plan.to_dict(),
            schedule={"selection_steps": starts, "zero_at_steps": ends},
            events=log,
            steps=steps,
            redundant_max_norm_after_merge=residual,
        )
        self.history = history
        return {k: ~v for k, v in redundant.items()}

    @property
    def recovers(self) -> bool:
        """Its own recovery stage runs (it replaces the `recovery` group's in any case)."""
        return self.recovery.enabled

    def parts(self) -> dict[str, bool]:
        return {
            "lora_aware_groups": self.lora_aware,
            "knowledge_analysis": self.knowledge.enabled,
            "lhspg": self.lhspg.enabled,
            "dynamic_recovery": self.recovery.enabled and self.recovery.dynamic,
        }

    def recover(
        self,
        model: nn.Module,
        tokenizer: Any,
        out_dir: Path,
        tracker: Any = None,
        data_cfg: Any = None,
        prune_dir: Path | None = None,
    ) -> nn.Module:
        """Part 4 on the physically pruned model (the runner's recover stage)."""
        ref = None
        path = Path(prune_dir) / "reference_losses.json" if prune_dir is not None else None
        if path is not None and path.exists():
            ref = json.loads(path.read_text())
        return self.recovery.recover(model, tokenizer, out_dir, tracker, data_cfg, ref)
