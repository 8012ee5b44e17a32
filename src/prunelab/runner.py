"""The recipe: validate → plan → dense eval (cached) → prune → recover → evaluate → save.

Reads top to bottom. Every stage writes its output into the run directory before the next
starts (``RunDir``), so rerunning the same config resumes after the last finished stage.
All config problems are collected and raised together before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from prunelab.errors import ConfigError, bad_value
from prunelab.evaluation.suite import perplexity_sets
from prunelab.tracking.rundir import RunDir, write_json

log = logging.getLogger("prunelab")
LOGGERS = ("wandb", "none")


# ---------------------------------------------------------------- validation (no model loads)
def validate(cfg: DictConfig, with_plan: bool = True):
    """Check every group of the config; return (method, recovery, plan). Raises one ConfigError
    listing every problem found. ``with_plan=False`` (a dry run) stops before reading the model's
    config.json, so hub configs validate without a download (plan: None)."""
    from prunelab.data.sources import build_source
    from prunelab.evaluation.suite import check_eval_config
    from prunelab.methods import build_dataclass, build_method
    from prunelab.models.loading import check_model_config, load_config
    from prunelab.structure import arch_info
    from prunelab.structure.plan import plan_ratio, plan_sparsity

    problems: list[str] = []
    method = None

    def attempt(fn):
        try:
            return fn()
        except ConfigError as e:
            problems.append(str(e))
            return None

    if not isinstance(cfg.ratio, (int, float)) or not 0.0 < float(cfg.ratio) < 1.0:
        problems.append(
            f"ratio={cfg.ratio!r} is outside the allowed range (0, 1): the fraction of all parameters removed"
        )
    if not 0.0 <= float(cfg.ratio_tolerance) < 1.0:
        problems.append(f"ratio_tolerance={cfg.ratio_tolerance!r} must be in [0, 1) (relative to ratio)")
    method = attempt(lambda: build_method(cfg.method))
    if method is not None and getattr(method, "trains", False):
        attempt(lambda: method.check(cfg.data))  # its training data, before any model loads
    attempt(lambda: check_model_config(cfg.model))
    attempt(lambda: build_source(cfg.data).check())
    attempt(lambda: check_eval_config(cfg.eval, cfg.data))
    recovery = None
    if cfg.recovery.name != "none":  # Hydra already refused unknown recovery options
        recovery = attempt(lambda: build_dataclass(cfg.recovery, "recovery"))
        if recovery is not None:
            attempt(recovery.check)
    if cfg.logger.name not in LOGGERS:
        problems.append(str(bad_value("logger", cfg.logger.name, LOGGERS)))
    if cfg.device != "auto" and not str(cfg.device).startswith(("cpu", "cuda", "mps")):
        problems.append(str(bad_value("device", cfg.device, ("auto", "cpu", "cuda", "cuda:N", "mps"))))
    sparse = bool(getattr(method, "sparse", False))
    if (
        cfg.eval.get("semi_structured")
        and method is not None
        and (not sparse or str(method.pattern) != "2:4")
    ):
        problems.append(
            f"eval.semi_structured=true needs 2:4 sparsity from a layer-wise method (admm, sparsegpt, wanda, "
            f'magnitude with method.sparsity_pattern="2:4"); this run is method={cfg.method.name}'
            + (f" with sparsity_pattern={method.pattern}" if sparse else "")
        )
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    if not with_plan:
        return method, recovery, None
    # Architecture from config.json alone: the plan fails here, before the weights load.
    arch = arch_info(load_config(cfg.model))
    layers = method.layers(arch.num_layers)
    if sparse:  # element-wise: ratio = sparsity of the pruned linear layers
        plan = plan_sparsity(arch, float(cfg.ratio), method.pattern, method.scope, method.modules, layers)
    else:
        plan = plan_ratio(arch, float(cfg.ratio), method.targets, layers, float(cfg.ratio_tolerance))
    return method, recovery, plan


# ---------------------------------------------------------------- helpers
def build_calibration(cfg: DictConfig, method: Any, tokenizer: Any) -> torch.Tensor:
    """The calibration windows a method prunes with: its own size (its paper's) where it sets
    one, else the data config's."""
    from prunelab.data.sources import build_source

    c = cfg.data.calibration
    return build_source(cfg.data).calibration_windows(
        tokenizer,
        getattr(method, "calibration_samples", None) or c.num_samples,
        getattr(method, "calibration_seq_len", None) or c.seq_len,
        int(cfg.seed),
        c.split,
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys that never change results: they neither name run directories nor block resuming.
VOLATILE_KEYS = ("logger", "device", "tags", "sweep_name", "output_root", "cache_dir", "dry_run")
# keys that change where or how work happens, never its result: not part of a run's identity
VOLATILE_DOTTED = (
    "method.activations",  # calibration batches in memory or on disk
    "method.activation_budget_mb",
    "recovery.gradient_checkpointing",  # activations recomputed instead of held
    "method.train.gradient_checkpointing",
    "method.recovery.lora.gradient_checkpointing",  # LoRAShear's own recovery stages
)


def run_identity(resolved: dict) -> dict:
    """The resolved config minus the keys that cannot change results: what a run dir is."""
    identity = {k: v for k, v in resolved.items() if k not in VOLATILE_KEYS}
    for dotted in VOLATILE_DOTTED:
        *parents, leaf = dotted.split(".")
        node: Any = identity
        for key in parents:  # copy the path down, so `resolved` itself is left alone
            if not isinstance(node, dict) or not isinstance(node.get(key), dict):
                node = None
                break
            node[key] = dict(node[key])
            node = node[key]
        if isinstance(node, dict):
            node.pop(leaf, None)
    return identity


def model_fingerprint(cfg: DictConfig) -> str:
    """Identifies the weights: file names, sizes and mtimes of a local folder; else the hub id@revision."""
    from prunelab.models.loading import resolve_path

    path = Path(resolve_path(str(cfg.path)))
    if path.is_dir():
        return _hash(
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file()]
        )
    return f"{cfg.path}@{cfg.revision}"


def _load_kwargs(cfg: DictConfig) -> dict:
    """Pruned and recovered models load like the dense one (dtype, attention kernel)."""
    from prunelab.models.loading import DTYPES

    return {
        "dtype": DTYPES[cfg.model.dtype],
        "attn_implementation": cfg.model.attn_implementation,
        "trust_remote_code": bool(cfg.model.trust_remote_code),
    }


def run_tags(cfg: DictConfig) -> list[str]:
    imp = cfg.method.get("importance")
    tags = [
        f"method:{cfg.method.name}",
        f"model:{cfg.model.name}",
        f"ratio:{cfg.ratio}",
        f"data:{cfg.data.name}",
    ]
    pattern = cfg.method.get("sparsity_pattern")
    tags += [f"importance:{imp}"] if imp else []
    tags += [f"sparsity:{pattern}"] if pattern else []
    return tags + list(cfg.tags)


def _tracker(cfg: DictConfig, run_dir: Path, resolved: dict, group: str | None, key: str):
    from prunelab.tracking.wandb_logger import NullTracker, WandbTracker

    if cfg.logger.name == "none":
        return NullTracker()
    return WandbTracker(
        cfg.logger, run_dir, resolved, name=run_dir.name, group=group, tags=run_tags(cfg), key=key
    )


def _training_record(train_dir: Path, prune_rec: dict) -> dict | None:
    """For methods that train while pruning: their schedule and the trainer's history.json."""
    if "training" not in prune_rec:
        return None
    history = train_dir / "history.json"
    return {**prune_rec["training"], "history": json.loads(history.read_text()) if history.exists() else None}


def _sparsity_record(model, masks: dict, plan, method) -> dict:
    """What a layer-wise method did, from its masks and the weights; refuses to go on if the
    masks miss the plan's exact count (a solver bug, never a rounding choice)."""
    from prunelab.sparsity.checkpoint import sparsity_summary

    kept = sum(int(k.sum()) for k in masks.values())
    targeted = sum(k.numel() for k in masks.values())
    if targeted != plan.params_targeted or targeted - kept != plan.params_zeroed:
        raise RuntimeError(
            f"{method.name} zeroed {targeted - kept} of {targeted} weights; the plan asks {plan.params_zeroed} "
            f"of {plan.params_targeted}"
        )
    summary = sparsity_summary(model, masks)
    return {
        "method": method.name,
        "pattern": str(method.pattern),
        "scope": method.scope,
        "sparsity": 1 - kept / targeted,  # from the masks: exactly the plan
        "zero_fraction": summary["zero_fraction"],  # zeros among ALL parameters, from the weights
        "weights_zero_fraction_of_pruned_linears": summary["achieved"],
        "per_layer": {name: method.report.get(name, {}) for name in masks},
    }


# ---------------------------------------------------------------- the recipe
def run(cfg: DictConfig, run_dir: Path, group: str | None = None) -> dict:
    t_start = time.perf_counter()
    method, recovery, plan = validate(cfg)
    skipped_recovery = None
    # a method with a recover() (LoRAShear) brings its own stage in place of the `recovery`
    # group's; .recovers says whether it runs
    has_own = callable(getattr(method, "recover", None))
    own_recovery = has_own and bool(method.recovers)
    if recovery is not None and has_own:
        skipped_recovery = (
            f"method={cfg.method.name} runs its own recovery (method.recovery, "
            f"{'enabled' if own_recovery else 'disabled'}); recovery={cfg.recovery.name} not used"
        )
        log.info(skipped_recovery)
        recovery = None
    elif recovery is not None and getattr(method, "trains", False) and not method.then_recover:
        skipped_recovery = (
            f"method={cfg.method.name} fine-tunes while it prunes (its LoRA training is the recovery); "
            f"recovery={cfg.recovery.name} skipped (method.then_recover=true runs it too)"
        )
        log.info(skipped_recovery)
        recovery = None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    identity = run_identity(resolved)
    rd = RunDir(run_dir, identity)
    torch.manual_seed(int(cfg.seed))
    tracker = _tracker(cfg, rd.root, resolved, group, key=_hash(identity))
    device = pick_device(str(cfg.device))
    cache = Path(cfg.cache_dir)
    timings: dict[str, float] = {}
    resumed: list[str] = []
    log.info(
        "run dir %s | plan: %.4f of %d parameters (requested %.4f)",
        rd.root,
        plan.achieved,
        plan.params_before,
        plan.requested,
    )

    model = tokenizer = None
    sparse = bool(getattr(plan, "sparse", False))
    # method.offload: the dense model stays in CPU memory; pruning moves one block at a time
    # to the device and evaluation moves the whole model there.
    offload = bool(getattr(method, "offload", False)) and device.type != "cpu"
    # Models this process already holds, by checkpoint dir: later stages use them instead of
    # loading the checkpoint again (only a resumed run loads from disk).
    held: dict[Path, tuple] = {}

    def stage_model(model_dir: Path, take: bool = False):
        if model_dir in held:
            return held.pop(model_dir) if take else held[model_dir]
        from transformers import AutoTokenizer

        from prunelab.models.loading import load_pretrained

        return load_pretrained(model_dir, **_load_kwargs(cfg)).to(device), AutoTokenizer.from_pretrained(
            model_dir
        )

    def dense_model():
        nonlocal model, tokenizer
        if model is None:
            from prunelab.models.loading import load_model

            model, tokenizer = load_model(cfg.model, "cpu" if offload else device)
        return model, tokenizer

    run_masks: dict = {}

    def masks_of_run():  # read once: eval, recovery and results all need them
        if not run_masks:
            from prunelab.sparsity.checkpoint import load_masks

            run_masks.update(load_masks(rd.root / "masks.safetensors"))
        return run_masks

    try:
        # 1. dense evaluation, cached across runs per (model, eval) config
        dense_key = _hash(
            {
                "model": resolved["model"],
                "weights": model_fingerprint(cfg.model),
                "eval": {k: v for k, v in resolved["eval"].items() if k not in ("dense", "semi_structured")},
                # eval sets named like the run's data are read through its node (local_files)
                "data": resolved["data"]
                if any(n == cfg.data.name for n, _ in perplexity_sets(cfg.eval, cfg.data))
                else None,
            }
        )
        dense_file = cache / "dense" / f"{cfg.model.name}-{dense_key}.json"
        dense = None
        if cfg.eval.dense:
            if dense_file.exists():
                dense = json.loads(dense_file.read_text())
                resumed.append("dense_eval")
                log.info("dense evaluation: cached (%s)", dense_file)
            else:
                from prunelab.evaluation.suite import evaluate

                log.info("dense evaluation")
                t = time.perf_counter()
                m, tok = dense_model()
                dense = evaluate(m.to(device), tok, cfg.eval, cache, "dense", cfg.data)
                if offload:
                    m.to("cpu")
                write_json(dense_file, dense)
                timings["dense_eval"] = time.perf_counter() - t
            tracker.summary({"dense": dense})

        # 2. prune
        pruned_dir = rd.root / "pruned"
        rec = rd.done("prune")
        if rec is None:
            from safetensors.torch import save_file

            from prunelab.methods import PruneContext
            from prunelab.models.loading import save_model
            from prunelab.structure import apply_masks, arch_info, prune_physically

            log.info("prune: %s", cfg.method.name)
            t = time.perf_counter()
            m, tok = dense_model()
            calib = (
                build_calibration(cfg, method, tok) if getattr(method, "needs_calibration", False) else None
            )
            t_method = time.perf_counter()  # the method alone, without loading or calibration data
            ctx = PruneContext(
                tok,
                calib,
                int(cfg.seed),
                device,
                data_cfg=cfg.data,
                out_dir=rd.root / "prune_train",
                tracker=tracker,
                run_dir=rd.root,
                ratio_tolerance=float(cfg.ratio_tolerance),
            )
            masks = method.prune(m, plan, ctx)
            used_plan = getattr(method, "final_plan", None) or plan  # re-planned after seeing the model
            method_time = time.perf_counter() - t_method
            extra = {"training": method.history} if getattr(method, "trains", False) else {}
            if sparse:
                from prunelab.sparsity.checkpoint import mark_config, save_masks

                extra["sparsity"] = _sparsity_record(m, masks, plan, method)
                mark_config(m, {k: extra["sparsity"][k] for k in ("method", "pattern", "scope", "sparsity")})
                new_arch = arch_info(m.config)
                save_model(m, tok, pruned_dir)
                save_masks(masks, rd.root / "masks.safetensors")
            else:
                apply_masks(m, masks)
                new_arch = prune_physically(m, masks)
                save_model(m, tok, pruned_dir)
                save_file(
                    {k: v.to(torch.uint8) for k, v in masks.items()}, str(rd.root / "masks.safetensors")
                )
            held[pruned_dir] = (m.to(device), tok)
            rec = rd.finish(
                "prune",
                {
                    "plan": used_plan.to_dict(),
                    "params_after": new_arch.total_params(),
                    "layer_shapes": [s.to_dict() for s in new_arch.layers],
                    "time_s": time.perf_counter() - t,
                    "method_time_s": method_time,
                    **extra,
                },
            )
        else:
            resumed.append("prune")
            log.info("prune: finished earlier, resuming from %s", pruned_dir)
        timings["prune"] = rec["time_s"]
        timings["prune_method"] = rec.get("method_time_s")

        def evaluate_stage(stage: str, model_dir: Path, label: str) -> dict:
            rec_e = rd.done(stage)
            if rec_e is not None:
                resumed.append(stage)
                return rec_e
            from prunelab.evaluation.suite import evaluate

            log.info("evaluate the %s model (%s)", label, model_dir)
            t = time.perf_counter()
            final, tok = stage_model(model_dir)
            if sparse and cfg.eval.get("semi_structured"):
                from prunelab.sparsity.semi_structured import semi_structured

                with semi_structured(final, list(masks_of_run())) as kernels:
                    if not kernels["used"]:
                        log.warning("eval.semi_structured: %s", kernels["reason"])
                    metrics = evaluate(final.eval(), tok, cfg.eval, cache, label, cfg.data)
                metrics["semi_structured"] = kernels
            else:
                metrics = evaluate(final.eval(), tok, cfg.eval, cache, label, cfg.data)
            return rd.finish(stage, {"metrics": metrics, "time_s": time.perf_counter() - t})

        # 3. evaluate the pruned model (before any recovery)
        rec_eval = evaluate_stage("eval", pruned_dir, "pruned")
        timings["eval"] = rec_eval["time_s"]

        # 4. recover with LoRA, merged back into a dense model of the pruned shape
        final_dir, recovered, recovery_info = pruned_dir, None, None
        if recovery is not None or own_recovery:
            recovered_dir = rd.root / "recovered"
            rec_recover = rd.done("recover")
            if rec_recover is None:
                from prunelab.models.loading import save_model

                t = time.perf_counter()
                pruned, tok = stage_model(pruned_dir, take=True)  # LoRA merges into it in place
                if own_recovery:
                    log.info("recover: %s's own recovery (method.recovery)", cfg.method.name)
                    merged = method.recover(
                        pruned, tok, recovered_dir, tracker, cfg.data, prune_dir=rd.root / "prune_train"
                    )
                else:
                    log.info("recover: LoRA on %s", recovery.data)
                    merged = recovery.recover(
                        pruned,
                        tok,
                        recovered_dir,
                        tracker=tracker,
                        data_cfg=cfg.data,
                        keep_masks=masks_of_run() if sparse else None,  # LoRA must not refill pruned weights
                    )
                save_model(merged, tok, recovered_dir / "model")
                held[recovered_dir / "model"] = (merged, tok)
                after = {}
                if sparse:  # measured on the merged weights, recorded with the stage
                    from prunelab.sparsity.checkpoint import sparsity_summary

                    s = sparsity_summary(merged, masks_of_run())
                    after = {"sparsity_after": {k: s[k] for k in ("achieved", "zero_fraction")}}
                rec_recover = rd.finish("recover", {"time_s": time.perf_counter() - t, **after})
            else:
                resumed.append("recover")
            timings["recover"] = rec_recover["time_s"]
            final_dir = recovered_dir / "model"
            history = recovered_dir / "history.json"
            recovery_info = json.loads(history.read_text()) if history.exists() else None
            rec_eval_rec = evaluate_stage("eval_recovered", final_dir, "recovered")
            timings["eval_recovered"] = rec_eval_rec["time_s"]
            recovered = rec_eval_rec["metrics"]

        timings["total"] = time.perf_counter() - t_start

        # 5. results
        if sparse:
            ratio = {
                "meaning": "sparsity of the pruned linear layers",
                "requested": plan.requested,
                "achieved": rec["sparsity"]["sparsity"],
                "zero_fraction_of_all_params": rec["sparsity"]["zero_fraction"],
                "params_before": plan.params_before,
                "params_after": rec["params_after"],
            }
            sparsity = rec["sparsity"]
            if recovered is not None:
                after = rec_recover.get("sparsity_after")
                if after is None:  # a recover stage finished before this field existed
                    from prunelab.sparsity.checkpoint import sparsity_summary

                    s = sparsity_summary(stage_model(final_dir)[0], masks_of_run())
                    after = {k: s[k] for k in ("achieved", "zero_fraction")}
                sparsity = {**sparsity, "after_recovery": after}
        else:
            ratio = {
                "meaning": "fraction of all parameters removed",
                "requested": plan.requested,
                "achieved": 1 - rec["params_after"] / plan.params_before,
                "params_before": plan.params_before,
                "params_after": rec["params_after"],
            }
            sparsity = None
        results = {
            "config": resolved,
            "run_dir": str(rd.root),
            "model_dir": str(final_dir),
            "ratio": ratio,
            "sparsity": sparsity,
            "plan": rec["plan"],
            "layer_shapes": rec["layer_shapes"],
            "dense": dense,
            "pruned": rec_eval["metrics"],
            "recovered": recovered,
            "recovery": recovery_info,
            "recovery_skipped": skipped_recovery,
            "training": _training_record(rd.root / "prune_train", rec),
            "timings_s": timings,
            "resumed_stages": resumed,
            "tracking": {
                "logger": cfg.logger.name,
                "group": group,
                "tags": run_tags(cfg),
                "run_id": tracker.run_id,
            },
        }
        write_json(rd.root / "results.json", results)
        log.info("results: %s", rd.root / "results.json")
        tracker.summary(
            {
                "pruned": rec_eval["metrics"],
                "recovered": recovered,
                "ratio": results["ratio"],
                "timings_s": timings,
            }
        )
        tracker.finish()
        return results
    except BaseException:
        tracker.finish(exit_code=1)
        raise
