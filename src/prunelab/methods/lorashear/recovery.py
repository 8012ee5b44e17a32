"""LoRAShear's dynamic knowledge recovery (part 4): LoRA fine-tuning in stages — first
pretraining-style text, then instruction data — each over a mixture of sources that is
rebuilt at every validation from how much the pruned model degraded on each source
(``DataMixer``), until validation stops improving (``patience``).

A source is a data config name (``c4``, ``alpaca_cleaned``) or, for the offline corpus,
``embedded:<reference|docstrings|comments>``. The degradation reference is the *dense*
model's loss on each source's validation subset, measured by the method before it prunes
(``reference_losses``) and saved with the prune stage. Each stage trains a fresh LoRA on the
previous stage's merged model; the mixture weights of every update are logged to W&B
(``recovery/<stage>/mixture/<source>``) and written to ``history.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunelab.errors import ConfigError, bad_value
from prunelab.methods.lorashear.mixer import DataMixer
from prunelab.recovery import train_state
from prunelab.recovery.lora import (
    FORMATS,
    Feature,
    LoraRecovery,
    TrainHooks,
    eval_batches,
    group_losses,
    pad_id_of,
)

# The LoRA settings of every stage (keys of recovery=lora), sized for the embedded model.
LORA_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.05,
    "lr": 5e-4,
    "batch_size": 16,
    "micro_batch_size": 8,
    "cutoff_len": 128,
    "eval_every": 10,
    "val_size": 24,  # per source
    "warmup_steps": 5,
    "patience": 3,
    "epochs": 100,  # a stage ends at max_steps or when validation stops improving
}
STAGE_KEYS = ("name", "format", "sources", "max_steps")


def source_node(spec: str, data_cfg: Any = None) -> Any:
    """The data config node of a source spec (``c4``, ``embedded:docstrings``); the run's
    own data node is used when it names the same dataset (its local_files overrides)."""
    from omegaconf import OmegaConf

    from prunelab.data.corpus import SOURCES
    from prunelab.data.sources import available_names, load_source_config

    name, _, part = str(spec).partition(":")
    names = available_names()
    if name not in names:
        raise bad_value("method.recovery.stages.sources", spec, [*names, *(f"embedded:{s}" for s in SOURCES)])
    node = data_cfg if data_cfg is not None and data_cfg.get("name") == name else load_source_config(name)
    if part:
        if name != "embedded" or part not in SOURCES:
            raise bad_value("method.recovery.stages.sources", spec, [f"embedded:{s}" for s in SOURCES])
        node = OmegaConf.merge(node, {"sources": [part]})
    return node


@dataclass
class Stage:
    name: str
    format: str  # text | instruction
    sources: list[str]
    max_steps: int

    def __post_init__(self) -> None:
        key = f"method.recovery.stages[{self.name}]"
        if self.format not in FORMATS:
            raise bad_value(f"{key}.format", self.format, FORMATS)
        if isinstance(self.sources, str) or not self.sources:
            raise ConfigError(f"{key}.sources={self.sources!r} must be a non-empty list of sources")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"{key}.sources={self.sources!r} names a source twice")
        self.sources = [str(s) for s in self.sources]
        if not (isinstance(self.max_steps, int) and self.max_steps > 0):
            raise ConfigError(f"{key}.max_steps={self.max_steps!r} must be a positive integer")


def _default_stages() -> list[dict]:
    embedded = ["embedded:reference", "embedded:docstrings", "embedded:comments"]
    return [
        {"name": "text", "format": "text", "sources": embedded, "max_steps": 70},
        {"name": "instruction", "format": "instruction", "sources": embedded, "max_steps": 30},
    ]


class Mixture:
    """A recovery stage's hooks into the LoRA trainer: each step's examples drawn by the
    mixer's weights (``sample``: a source per example, then the next of that source's
    permutation), the weights rebuilt at every validation from the per-source losses against
    ``reference`` (None: kept, only recorded)."""

    def __init__(
        self,
        mixer: DataMixer,
        spans: dict[str, tuple[int, int]],
        seed: int,
        reference: dict[str, float] | None,
        tracker: Any = None,
        prefix: str = "recovery",
    ) -> None:
        self.mixer, self.spans, self.reference = mixer, spans, reference
        self.tracker, self.prefix = tracker, prefix
        self.g = torch.Generator().manual_seed(seed)
        self.cursors: dict[str, list[int]] = {s: [] for s in mixer.sources}

    def sample(self, step: int, n: int) -> list[int]:
        idx = []
        for s in self.mixer.sample(n, self.g):
            if not self.cursors[s]:  # a fresh permutation of the source whenever it runs out
                lo, hi = self.spans[s]
                self.cursors[s] = (lo + torch.randperm(hi - lo, generator=self.g)).tolist()
            idx.append(self.cursors[s].pop())
        return idx

    def on_validation(self, step: int, per: dict[str, float]) -> None:
        mixer = self.mixer
        if self.reference is not None:
            mixer.update(per, self.reference, step)
        else:
            mixer.history.append({"step": step, "weights": dict(mixer.weights), "losses": dict(per)})
        if self.tracker is not None:
            self.tracker.log({f"{self.prefix}/mixture/{s}": w for s, w in mixer.weights.items()}, step=step)

    def resume_state(self) -> dict[str, Any]:
        m = self.mixer
        return {
            "weights": m.weights,
            "history": m.history,
            "cursors": self.cursors,
            "rng": self.g.get_state(),
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.mixer.weights = dict(state["weights"])
        self.mixer.history[:] = state["history"]
        self.cursors = {s: list(c) for s, c in state["cursors"].items()}
        self.g.set_state(state["rng"])

    def hooks(self) -> TrainHooks:
        m = self.mixer
        key = {
            "sources": m.sources,
            "eta": m.eta,
            "floor": m.floor,
            "initial_weights": m.weights,
            "spans": self.spans,
            "reference": self.reference,
        }
        return TrainHooks(
            on_validation=self.on_validation,
            sample=self.sample,
            state=self.resume_state,
            load_state=self.load_resume_state,
            key=key,
        )


@dataclass
class DynamicRecovery:
    enabled: bool = True  # false: no recovery after pruning (the LHSPG training is all)
    dynamic: bool = True  # false: the ablation — each stage keeps its initial (natural) mixture
    eta: float = 1.0  # how strongly degradation moves the mixture
    floor: float = 0.05  # every source keeps at least this share
    stages: list[dict] = field(default_factory=_default_stages)
    lora: dict[str, Any] = field(default_factory=dict)  # keys of recovery=lora, over LORA_DEFAULTS
    seed: int = 0

    sub_configs: ClassVar[dict[str, type]] = {"lora": LoraRecovery}

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool) or not isinstance(self.dynamic, bool):
            raise ConfigError("method.recovery.enabled and method.recovery.dynamic must be true or false")
        if not isinstance(self.stages, list) or not self.stages:
            raise ConfigError(f"method.recovery.stages={self.stages!r} must be a non-empty list of stages")
        parsed = []
        for i, st in enumerate(self.stages):
            if not isinstance(st, dict) or set(st) - set(STAGE_KEYS) or set(STAGE_KEYS) - set(st):
                raise ConfigError(
                    f"method.recovery.stages[{i}]={st!r} must have exactly the keys {', '.join(STAGE_KEYS)}"
                )
            parsed.append(Stage(**st))
        names = [s.name for s in parsed]
        if len(set(names)) != len(names):
            raise ConfigError(f"method.recovery.stages: stage names {names} must be unique")
        self.parsed = parsed
        for st in parsed:  # the mixer checks eta and floor against the number of sources
            DataMixer(st.sources, eta=self.eta, floor=self.floor)
        lora = dict(self.lora)
        for k in ("name", "data", "format", "max_steps"):
            if k in lora:
                raise ConfigError(
                    f"method.recovery.lora.{k} is set per stage (method.recovery.stages), not here"
                )
        self.trainers = {st.name: self._trainer(st, lora) for st in parsed}

    def _trainer(self, st: Stage, lora: dict) -> LoraRecovery:
        from prunelab.methods import method_trainer

        data = st.sources[0].partition(":")[0]  # the stage's sources come through source_node()
        fixed = {"data": data, "format": st.format, "max_steps": st.max_steps}
        tr = method_trainer(
            {**LORA_DEFAULTS, **lora}, f"lorashear_{st.name}", self.seed, key="method.recovery.lora", **fixed
        )
        tr.log_prefix = f"recovery/{st.name}"
        return tr

    def check(self, data_cfg: Any = None) -> None:
        """Every source resolves and its local files exist (before any model loads)."""
        from prunelab.data.sources import build_source

        for st in self.parsed:
            for spec in st.sources:
                build_source(source_node(spec, data_cfg)).check()

    def stage_data(
        self, stage: Stage, tokenizer: Any, data_cfg: Any = None, val_only: bool = False
    ) -> dict[str, tuple[list[Feature], list[Feature]]]:
        """(train, validation) features of each source of ``stage`` (``val_only``: train [] where
        the source has a validation split)."""
        tr = self.trainers[stage.name]
        out = {}
        for spec in stage.sources:
            train, val, _ = tr.features_for(tokenizer, source_node(spec, data_cfg), val_only)
            if (not train and not val_only) or not val:
                raise ConfigError(
                    f"method.recovery.stages[{stage.name}]: source {spec!r} has no {stage.format} "
                    f"{'training' if not train else 'validation'} features"
                )
            out[spec] = (train, val)
        return out

    @torch.no_grad()
    def reference_losses(self, model: nn.Module, tokenizer: Any, data_cfg: Any = None) -> dict:
        """The (dense) model's loss on each stage's per-source validation subsets."""
        out = {}
        for st in self.parsed:
            data = self.stage_data(st, tokenizer, data_cfg, val_only=True)  # no training split read
            size = self.trainers[st.name].micro_batch_size
            groups = {s: eval_batches(v, pad_id_of(tokenizer), size) for s, (_, v) in data.items()}
            out[st.name] = group_losses(model, groups)[1]
        return out

    def recover(
        self,
        model: nn.Module,
        tokenizer: Any,
        out_dir: Path,
        tracker: Any = None,
        data_cfg: Any = None,
        reference: dict | None = None,
    ) -> nn.Module:
        """Run the stages in order; returns the merged model (LoRA of every stage folded in).

        Each finished stage saves its merged model (``<stage>/model``) and record
        (``<stage>/done.json``) before the next begins; a rerun after a kill loads the last
        finished stage's model and goes on from there (only the latest stage model is kept)."""
        from prunelab.models.loading import load_pretrained, save_model
        from prunelab.models.placement import fresh_folder, is_dispatched, load_kwargs, remove_with

        out_dir = Path(out_dir)
        report: dict[str, Any] = {"stages": [], "config": {**asdict(self), "stages": self.stages}}
        done = []
        for st in self.parsed:  # the finished prefix of the stages
            marker = out_dir / st.name / "done.json"
            if not marker.exists():
                break
            done.append(json.loads(marker.read_text()))
        if done:
            last = out_dir / self.parsed[len(done) - 1].name / "model"
            device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
            if is_dispatched(model):  # loaded by the same device map (offloaded: a fresh folder)
                folder = fresh_folder(out_dir / "offload")
                model = load_pretrained(
                    last, dtype=dtype, **load_kwargs(dict(model.hf_device_map), None, folder)
                )
                remove_with(model, folder)
                model.eval()
            else:
                model = load_pretrained(last, dtype=dtype).to(device).eval()
            report["resumed_stages"] = [d["name"] for d in done]
        report["stages"] += done
        for i, st in enumerate(self.parsed[len(done) :], start=len(done)):
            stage_dir = out_dir / st.name
            model, rec = self._stage(st, model, tokenizer, stage_dir, tracker, data_cfg, reference)
            save_model(model, tokenizer, stage_dir / "model")
            (stage_dir / "done.json").write_text(json.dumps(rec, indent=2) + "\n")
            train_state.clear(stage_dir)  # finished: its training state is not needed again
            if i > 0:  # the previous stage's model is superseded
                import shutil

                shutil.rmtree(out_dir / self.parsed[i - 1].name / "model", ignore_errors=True)
            report["stages"].append(rec)
        report["train_tokens"] = sum(s["train_tokens"] for s in report["stages"])
        report["steps_run"] = sum(s["steps_run"] for s in report["stages"])
        report["time_s"] = sum(s["time_s"] for s in report["stages"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "history.json").write_text(json.dumps(report, indent=2) + "\n")
        return model

    def _stage(
        self,
        st: Stage,
        model: nn.Module,
        tokenizer: Any,
        out_dir: Path,
        tracker: Any,
        data_cfg: Any,
        reference: dict | None,
    ) -> tuple[nn.Module, dict]:
        tr = self.trainers[st.name]
        data = self.stage_data(st, tokenizer, data_cfg)
        train: list[Feature] = []
        spans: dict[str, tuple[int, int]] = {}
        for s, (feats, _) in data.items():
            spans[s] = (len(train), len(train) + len(feats))
            train += feats
        # Initial mixture: the sources' natural shares of training tokens (what plain
        # concatenation would give); dynamic=false keeps it for the whole stage.
        tokens = {s: sum(len(f["input_ids"]) for f in feats) for s, (feats, _) in data.items()}
        total = sum(tokens.values())
        mixer = DataMixer(st.sources, eta=self.eta, floor=self.floor)
        natural = {s: n / total for s, n in tokens.items()}
        k = len(st.sources)
        mixer.weights = {s: self.floor + (1 - self.floor * k) * w for s, w in natural.items()}
        ref = (reference or {}).get(st.name)
        if self.dynamic and ref is None:
            raise RuntimeError(f"lorashear recovery stage {st.name!r}: no dense reference losses")
        mixture = Mixture(mixer, spans, self.seed, ref if self.dynamic else None, tracker, tr.log_prefix)
        val = {s: v for s, (_, v) in data.items()}
        merged = tr.fit_features(
            model,
            tokenizer,
            train,
            val,
            out_dir,
            tracker,
            {"sources": st.sources, "natural_shares": natural, "reference_losses": ref},
            hooks=mixture.hooks(),
        )
        hist = json.loads((out_dir / "history.json").read_text())
        hist["mixture"] = mixer.history
        (out_dir / "history.json").write_text(json.dumps(hist, indent=2) + "\n")
        last = hist["val"][-1]["per_group"] if hist["val"] else {}
        rec = {
            "name": st.name,
            "format": st.format,
            "steps_run": hist["steps_run"],
            "max_steps": st.max_steps,
            "stopped_early_at": hist.get("stopped_early_at"),
            "best_step": hist["best_step"],
            "best_val_loss": hist["best_val_loss"],
            "train_tokens": hist["train_tokens"],
            "time_s": hist["time_s"],
            "final_weights": dict(mixer.weights),
            "degradation_at_end": {s: last[s] - ref[s] for s in last} if ref else None,
        }
        if not math.isfinite(hist["best_val_loss"] or 0.0):
            raise RuntimeError(f"lorashear recovery stage {st.name!r}: validation loss is not finite")
        return merged, rec
