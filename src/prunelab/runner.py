"""The recipe: validate → plan → dense eval (cached) → prune → recover → evaluate → save.

Reads top to bottom. Every stage writes its output into the run directory before the next
starts (``RunDir``), so rerunning the same config resumes after the last finished stage.
All config problems are collected and raised together before any model loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from prunelab import distributed
from prunelab.errors import ConfigError, bad_value
from prunelab.evaluation.suite import perplexity_sets
from prunelab.methods.base import PruningMethod
from prunelab.models.export import check_layout
from prunelab.numerics import check_weights
from prunelab.recovery import train_state
from prunelab.structure.plan import check_convention, check_keep
from prunelab.tracking.rundir import RunDir, read_json, write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- validation (no model loads)
def check_ratio(ratio: Any, tolerance: Any) -> list[str]:
    """Problems with ``ratio`` / ``ratio_tolerance`` (empty: fine)."""
    problems = []
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        problems.append(
            f"ratio={ratio!r} is outside the allowed range (0, 1): the fraction of all parameters removed"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < 1.0:
        problems.append(f"ratio_tolerance={tolerance!r} must be in [0, 1) (relative to ratio)")
    return problems


def check_rundir(node: Any) -> list[str]:
    """Problems with the ``rundir`` keys (how a run directory is resumed and shared)."""
    from prunelab.tracking.rundir import VERIFY

    if node is None:
        return []
    problems = []
    verify = node.get("verify")
    if verify not in VERIFY:
        problems.append(str(bad_value("rundir.verify", verify, VERIFY)))
    for key in ("lock_wait_s", "lock_stale_s"):
        v = node.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            problems.append(f"rundir.{key}={v!r} must be a number of seconds >= 0")
    return problems


def validate(cfg: DictConfig, with_plan: bool = True):
    """Check every group of the config; return (method, recovery, plan). Raises one ConfigError
    listing every problem found. ``with_plan=False`` (a dry run) stops before reading the model's
    config.json, so hub configs validate without a download (plan: None)."""
    from prunelab.config_types import aliases, check_types
    from prunelab.data.sources import build_source
    from prunelab.evaluation.suite import check_eval_config
    from prunelab.methods import build_dataclass, build_method
    from prunelab.models.loading import check_model_config
    from prunelab.tracking.wandb_logger import check_logger

    problems: list[str] = []
    method = recovery = None

    def attempt(fn):
        try:
            return fn()
        except ConfigError as e:
            problems.append(str(e))
            return None

    # Types first, every key (prunelab.config_types); a node with a mistyped key skips its own
    # checks below, which would only report the same value again (under an interpolated name).
    try:
        typed = check_types(cfg)
    except Exception as e:  # an interpolation that does not resolve (${oc.env:…}, a typo)
        raise ConfigError(f"invalid config: {type(e).__name__}: {e}") from e
    problems += [message for _, message in typed]
    bad = {key for key, _ in typed}
    bad |= {alias for alias, source in aliases(cfg).items() if source in bad}
    # the checks below read values only: resolve the interpolations once, not at every read
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def ok(*keys: str) -> bool:
        return not any(b == k or b.startswith(k + ".") for b in bad for k in keys)

    if ok("ratio", "ratio_tolerance"):
        problems += check_ratio(cfg.ratio, cfg.ratio_tolerance)
    if ok("ratio_convention"):
        attempt(lambda: check_convention(cfg.get("ratio_convention")))
    if ok("checkpoint_layout"):
        attempt(lambda: check_layout(cfg.get("checkpoint_layout", "padded")))
    if ok("method"):
        method = attempt(lambda: build_method(cfg.method))
    for key in ("keep_first_layers", "keep_last_layers"):
        if method is not None and hasattr(method, key):
            attempt(lambda key=key: check_keep(f"method.{key}", getattr(method, key)))
    if method is not None and method.trains and ok("data"):
        attempt(lambda: method.check(cfg.data))  # its training data, before any model loads
    if method is not None and (method.trains or (method.has_own_recovery and method.recovers)):
        # accelerate launch: only the `recovery` group's LoRA trains data-parallel; the others'
        # per-step state would drift apart across processes (docs/performance.md)
        attempt(
            lambda: distributed.refuse(
                f"method={cfg.method.name}",
                "it trains while it prunes, and its per-step state (LoRA-gradient scores, masks, "
                "LHSPG projections or a generator) is not synchronised across processes",
            )
        )
    if ok("model"):
        attempt(lambda: check_model_config(cfg.model))
    if ok("model", "device"):
        from prunelab.models.placement import check_placement

        node = OmegaConf.to_container(cfg.model)
        problems += check_placement(
            node.get("device_map"), node.get("max_memory"), node.get("offload_folder"), cfg.device
        )
        if node.get("device_map") is not None:  # each process would spread its copy over every device
            attempt(
                lambda: distributed.refuse(
                    f"model.device_map={node.get('device_map')!r}",
                    "a device map spreads one model over the machine's devices; several processes "
                    "would each place their own copy on all of them",
                )
            )
    if ok("data"):
        attempt(lambda: build_source(cfg.data).check())
    if ok("eval", "data"):
        attempt(lambda: check_eval_config(cfg.eval, cfg.data))
    if cfg.recovery.name != "none" and ok("recovery"):  # Hydra already refused unknown recovery options
        recovery = attempt(lambda: build_dataclass(cfg.recovery, "recovery"))
        if recovery is not None and ok("data"):
            attempt(lambda: recovery.check(cfg.data))
    from prunelab.card import check_repo_id

    if ok("push_to_hub") and (bad_repo := check_repo_id(cfg.get("push_to_hub"))) is not None:
        problems.append(bad_repo)
    if ok("push_private") and not isinstance(cfg.get("push_private", True), bool):
        problems.append(f"push_private={cfg.get('push_private')!r} is not allowed; allowed: true or false")
    limit = cfg.get("memory_limit_gib")
    if (
        ok("memory_limit_gib")
        and limit is not None
        and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0)
    ):
        problems.append(
            f"memory_limit_gib={limit!r} is not allowed; allowed: null (the device's memory) or GiB > 0"
        )
    if ok("logger"):
        attempt(lambda: check_logger(cfg.logger))
    if ok("rundir"):
        problems += check_rundir(cfg.get("rundir"))
    timeout = cfg.logger.get("init_timeout_s")
    if (
        ok("logger")
        and cfg.logger.name == "wandb"
        and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0)
    ):
        problems.append(f"logger.init_timeout_s={timeout!r} must be a number of seconds > 0")
    if ok("device") and cfg.device != "auto" and not str(cfg.device).startswith(("cpu", "cuda", "mps")):
        problems.append(str(bad_value("device", cfg.device, ("auto", "cpu", "cuda", "cuda:N", "mps"))))
    sparse = method is not None and method.sparse
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
    if ok("model") and cfg.model.get("device_map") is not None:
        problems += dispatch_problems(cfg, method, recovery)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    for key in ("recovery.val_size", "method.train.val_size", "method.recovery.lora.val_size"):
        if OmegaConf.select(cfg, key) == 0 and (key != "recovery.val_size" or recovery is not None):
            # allowed (LoRAPrune's official run merges its last adapter), but never silently
            log.warning("%s=0: no validation, so the best adapter is not chosen: the last one is merged", key)
    if not with_plan:
        return method, recovery, None
    return method, recovery, plan_checked(cfg, method, recovery)


def dispatch_problems(cfg: DictConfig, method: PruningMethod | None, recovery: Any) -> list[str]:
    """What does not run on a model dispatched by accelerate (``model.device_map``): the 2:4
    kernels. Evaluation, every method (the gradient and training ones too: LLM-Pruner's
    Taylor importances, LoRAPrune, LoRAShear, ATP) and LoRA recovery do (docs/performance.md,
    "Large models"; docs/large_models.md)."""
    dm = cfg.model.device_map
    where = f"with model.device_map={OmegaConf.to_container(dm) if isinstance(dm, DictConfig) else dm!r}"
    problems = []
    if cfg.eval.get("semi_structured"):
        problems.append(
            f"eval.semi_structured=true swaps in 2:4 kernels, which do not run on a dispatched model ({where}); "
            "allowed: eval.semi_structured=false, or model.device_map=null"
        )
    return problems


def plan_checked(cfg: DictConfig, method: PruningMethod, recovery: Any) -> Any:
    """The plan, from the model's config.json alone (no weights), and what the config.json rules
    out for this config (``model_problems``): ConfigError before the weights load."""
    from prunelab.models.loading import load_config

    config = load_config(cfg.model)
    arch = plan_arch(method, config)
    if not method.sparse:
        from prunelab.models.export import check_padding

        check_padding(
            arch, getattr(method, "search_kinds", method.targets), cfg.get("checkpoint_layout", "padded")
        )
    plan = make_plan(method, arch, cfg.ratio, cfg.ratio_tolerance, cfg.get("ratio_convention"))
    problems = model_problems(cfg, method, recovery, plan, arch, config)
    if problems:
        raise ConfigError("invalid config for this model:\n  - " + "\n  - ".join(problems))
    from prunelab.memory import check_memory, report

    stages, total, too_big = check_memory(cfg, config, method)
    log.info(
        "estimated peak memory per stage (docs/performance.md, memory model):\n%s", report(stages, total)
    )
    if too_big:
        raise ConfigError(
            "the run does not fit its device's memory (estimated):\n  - " + "\n  - ".join(too_big)
        )
    return plan


def model_problems(
    cfg: DictConfig, method: PruningMethod, recovery: Any, plan: Any, arch: Any, config: Any
) -> list[str]:
    """What the model's config.json rules out: sequences longer than its positions, LoRA ranks
    larger than the layers they adapt (after pruning, for the recovery)."""
    problems = []
    positions = getattr(config, "max_position_embeddings", None)
    where = f"model.path={str(cfg.model.path)!r}"
    lengths = [
        ("eval.perplexity.seq_len", cfg.eval.perplexity.seq_len),
        ("eval.zeroshot.max_length", cfg.eval.zeroshot.max_length if cfg.eval.zeroshot.tasks else None),
        ("eval.cost.seq_len", cfg.eval.cost.seq_len if cfg.eval.cost.enabled else None),
    ]
    if method.needs_calibration:
        own = method.calibration_seq_len is not None
        key = "method.calibration_seq_len" if own else "data.calibration.seq_len"
        lengths.append((key, method.calibration_seq_len if own else cfg.data.calibration.seq_len))
    if recovery is not None:
        lengths.append(("recovery.cutoff_len", recovery.cutoff_len))
    trainer = getattr(method, "trainer", None)
    if trainer is not None:
        lengths.append(("method.train.cutoff_len", trainer.cutoff_len))
    if isinstance(positions, int):
        for key, n in lengths:
            if n is not None and n > positions:
                problems.append(
                    f"{key}={n} is longer than the model's positions ({where}: max_position_embeddings="
                    f"{positions}); allowed: ≤ {positions}"
                )
    device_map = cfg.model.get("device_map")
    if isinstance(device_map, DictConfig):  # an explicit map must place the whole model
        from prunelab.models.placement import check_coverage

        problems += check_coverage(OmegaConf.to_container(device_map), config)
    if trainer is not None:  # adapters on the dense model
        problems += _rank_problems("method.train.r", trainer, arch, {})
    if recovery is not None:  # adapters on the pruned model
        problems += _rank_problems("recovery.r", recovery, arch, getattr(plan, "remove", {}) or {})
    return problems


def _linear_sizes(arch: Any, remove: dict) -> list[tuple[int, str, int]]:
    """(layer, leaf name, min(in, out)) of every block linear, after ``remove`` (structured
    plans); a :class:`LinearArch` (families prunelab has no structure for) is read as is."""
    if not hasattr(arch, "hidden_size"):  # sparse_arch of an unknown family: shapes from the module tree
        return [
            (i, path.rsplit(".", 1)[-1], min(o, n))
            for i in range(arch.num_layers)
            for path, (o, n) in arch.linear_shapes(i).items()
        ]
    hidden = arch.hidden_size - remove.get("hidden", 0)
    out = []
    for i, s in enumerate(arch.layers):
        kv = s.num_key_value_heads - remove.get(f"{i}.attn", 0)
        heads = kv * (s.num_attention_heads // s.num_key_value_heads)
        inter = s.intermediate_size - remove.get(f"{i}.mlp", 0)
        dims = {
            "q_proj": (hidden, heads * arch.head_dim),
            "k_proj": (hidden, kv * arch.head_dim),
            "v_proj": (hidden, kv * arch.head_dim),
            "o_proj": (heads * arch.head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        out += [(i, name, min(d)) for name, d in dims.items()]
    return out


def _rank_problems(key: str, trainer: Any, arch: Any, remove: dict) -> list[str]:
    """A LoRA rank above min(in, out) of a linear it adapts (the shapes after ``remove``)."""
    targets = set(trainer.target_modules)
    sizes = [(n, i, name) for i, name, n in _linear_sizes(arch, remove) if name in targets and n > 0]
    if not sizes:
        return []
    smallest, layer, name = min(sizes)
    if trainer.r > smallest:
        return [
            f"{key}={trainer.r} is larger than the smallest layer it adapts (layer {layer}'s {name}: "
            f"{smallest} features); allowed: ≤ {smallest}"
        ]
    return []


def check(cfg: DictConfig, dry_run: bool = False) -> tuple[Any, Any, Any]:
    """Everything refused before the weights load, the same for a dry run and a real one:
    the config (``validate``), the machine (``preflight``: device, folders, hub ids), then the
    plan and what the model's config.json rules out. A dry run reads config.json only where it
    is local (``local_config``: nothing downloads); plan: None when it did not."""
    from prunelab.models.loading import local_config
    from prunelab.preflight import preflight

    validate(cfg, with_plan=False)  # config errors first: they need nothing from the hub
    preflight(cfg)
    if dry_run and not local_config(cfg.model):
        log.info(
            "dry run: model.path=%r is not on this machine: the plan is checked when the run starts",
            str(cfg.model.path),
        )
        return validate(cfg, with_plan=False)
    checked = validate(cfg)
    _check_eval_texts(cfg, local_only=dry_run)
    return checked


def _check_eval_texts(cfg: DictConfig, local_only: bool) -> None:
    """The perplexity windows against the evaluation texts in the model's own tokens, before the
    weights load (only the tokenizer loads; a dry run reads only texts already on the machine)."""
    if not list(cfg.eval.perplexity.get("datasets") or []):
        return
    from transformers import AutoTokenizer

    from prunelab.evaluation.suite import check_texts
    from prunelab.models.loading import hub_errors, resolve_path, trusts_remote_code

    with hub_errors(cfg.model):
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_path(str(cfg.model.path)),
            revision=cfg.model.revision,
            trust_remote_code=trusts_remote_code(cfg.model),
        )
    problems = check_texts(cfg.eval, cfg.data, tokenizer, local_only)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def plan_arch(method: PruningMethod, config: Any, model: Any = None) -> Any:
    """The architecture a plan reads: the layer-wise methods need only the blocks' linear
    layers (any decoder-only family), the structured ones prunelab's coupled structures
    (``arch_info`` refuses a family it does not know, naming the ones it does)."""
    from prunelab.sparsity.blocks import sparse_arch
    from prunelab.structure import arch_info

    return sparse_arch(config, model) if method.sparse else arch_info(config)


def make_plan(
    method: PruningMethod, arch: Any, ratio: float, tolerance: float = 0.01, convention: str | None = None
) -> Any:
    """Per-layer amounts for ``method`` on ``arch``: a sparsity plan for the layer-wise family
    (ratio = sparsity of the pruned linears), else a removal plan (ratio = fraction of all
    parameters, or as ``convention`` reads it: ``linear``, ``per_layer``). Raises ConfigError
    for ratios the structure cannot meet."""
    from prunelab.structure.plan import check_convention, plan_convention, plan_sparsity

    layers = method.layers(arch.num_layers)
    if method.sparse:
        if check_convention(convention) != "params":
            raise ConfigError(
                f"ratio_convention={convention!r} does not apply to method={method.name}: a layer-wise "
                "method's ratio is already the sparsity of the pruned linear layers; use ratio_convention=null"
            )
        return plan_sparsity(arch, float(ratio), method.pattern, method.scope, method.modules, layers)
    from prunelab.structure.arch import check_kinds

    # the kinds the method really prunes (ATP's head_dim space: qk/vo, not whole heads), checked
    # against what the family can prune exactly, before any model loads
    kinds = tuple(getattr(method, "search_kinds", method.targets))
    check_kinds(arch, kinds + (("train",) if getattr(method, "trains", False) else ()))
    return plan_convention(arch, float(ratio), convention, method.targets, layers, float(tolerance))


# ---------------------------------------------------------------- helpers
def build_calibration(cfg: DictConfig, method: PruningMethod, tokenizer: Any) -> torch.Tensor:
    """The calibration windows a method prunes with: its own size (its paper's) where it sets
    one, else the data config's."""
    from prunelab.data.sources import build_source

    c = cfg.data.calibration
    return build_source(cfg.data).calibration_windows(
        tokenizer,
        method.calibration_samples or c.num_samples,
        method.calibration_seq_len or c.seq_len,
        int(cfg.seed),
        c.split,
    )


def _eval_key(ev: dict) -> dict:
    """The eval config as the dense cache keys it: without the keys that do not change the dense
    numbers, and without num_fewshot while it is null (keys made before it existed stay valid)."""
    ev = {k: v for k, v in ev.items() if k not in ("dense", "semi_structured")}
    zs = ev.get("zeroshot")
    if isinstance(zs, dict):  # metric: which recorded metric is averaged, recomputed on reading
        ev["zeroshot"] = {
            k: v for k, v in zs.items() if k != "metric" and not (k == "num_fewshot" and v is None)
        }
    ppl = ev.get("perplexity")
    if isinstance(ppl, dict) and ppl.get("joiner") is None:
        ev["perplexity"] = {k: v for k, v in ppl.items() if k != "joiner"}
    return ev


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _offload_folder_goes_with(model: Any, placed: dict | None) -> None:
    """A dispatched model's offload folder is removed when the model is freed."""
    if placed:
        from prunelab.models.placement import remove_with

        remove_with(model, placed["offload_folder"])


def _run_device(cfg: DictConfig) -> torch.device:
    """``device``, or with a device map the map's main device (where its inputs go)."""
    dm = cfg.model.get("device_map")
    if dm is None:  # under a launcher: this process's own GPU (its local rank)
        return distributed.device(pick_device(str(cfg.device)))
    from prunelab.models.placement import main_device

    return main_device(OmegaConf.to_container(dm) if isinstance(dm, DictConfig) else dm)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys that never change results: they neither name run directories nor block resuming.
VOLATILE_KEYS = (
    "logger",
    "device",
    "tags",
    "sweep_name",
    "output_root",
    "cache_dir",
    "dry_run",
    "rundir",
    "push_to_hub",
    "push_private",
    "memory_limit_gib",
)
# keys that change where or how work happens, never its result: not part of a run's identity
VOLATILE_DOTTED = (
    "method.activations",  # calibration batches in memory or on disk
    "method.activation_budget_mb",
    "recovery.gradient_checkpointing",  # activations recomputed instead of held
    "method.train.gradient_checkpointing",
    "method.recovery.lora.gradient_checkpointing",  # LoRAShear's own recovery stages
    "recovery.checkpoint_every",  # how often the training state is saved for a resume
    "method.train.checkpoint_every",
    "method.recovery.lora.checkpoint_every",
    "model.device_map",  # where the weights live (accelerate), not what they compute
    "model.max_memory",
    "model.offload_folder",
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
    """Identifies the weights: file names, sizes and mtimes of a local folder; else ``<hub id>@<commit>``,
    the commit sha the revision resolves to (as ``from_pretrained`` resolves it), so a branch that moves
    keys new numbers. When the commit cannot be known (offline, never downloaded): ``<hub id>@<revision>``,
    with a warning."""
    return weights_identity(cfg)[0]


def weights_identity(cfg: DictConfig) -> tuple[str, list | None, bool]:
    """(``model_fingerprint``, the local folder's ``[name, size, mtime_ns]`` rows or None for a hub
    id, whether the fingerprint is exact: False for a hub revision whose commit is unknown here)."""
    from prunelab.models.loading import hub_commit, resolve_path

    path = Path(resolve_path(str(cfg.path)))
    if path.is_dir():
        files = [
            [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()
        ]
        return _hash([tuple(row) for row in files]), files, True
    revision = cfg.get("revision")
    commit = hub_commit(str(cfg.path), None if revision is None else str(revision))
    if commit is None:
        log.warning(
            "model.path=%r: the commit of %s is unknown here (offline and not in the local hub cache); numbers "
            "from this unpinned revision are cached under the branch name (%s@%s) and would be served again "
            "after the repository changes; pin it: model.revision=<commit sha>",
            str(cfg.path),
            "the default branch" if revision is None else f"revision {revision!r}",
            cfg.path,
            revision,
        )
        return f"{cfg.path}@{revision}", None, False
    return f"{cfg.path}@{commit}", None, True


def data_fingerprints(cfg: DictConfig) -> dict[str, str]:
    """``{eval set: <hub id>@<commit>}`` for the hub texts the evaluation reads (not local files,
    not the embedded corpus): a dataset branch that moves keys new dense numbers, as the model's
    does. Unknown commit (offline, never downloaded): ``<id>@<revision>``."""
    from prunelab.evaluation.suite import source_for
    from prunelab.models.loading import hub_commit

    out = {}
    for name, _split in perplexity_sets(cfg.eval, cfg.data):
        src = source_for(name, cfg.data)
        path, revision = getattr(src, "path", None), getattr(src, "revision", None)
        if path is None or _split in (getattr(src, "local_files", None) or {}):
            continue
        commit = hub_commit(str(path), revision, "dataset")
        out[name] = f"{path}@{commit or revision}"
    return out


def _load_kwargs(cfg: DictConfig) -> dict:
    """Pruned and recovered models load like the dense one (dtype, attention kernel)."""
    from prunelab.models.loading import DTYPES, trusts_remote_code

    return {
        "dtype": DTYPES[cfg.model.dtype],
        "attn_implementation": cfg.model.attn_implementation,
        "trust_remote_code": trusts_remote_code(cfg.model),
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
    # job_type: what the job does, to filter a sweep's runs (prune only, or prune + recovery)
    job_type = "prune" if cfg.recovery.name == "none" else "prune+recover"
    return WandbTracker(
        cfg.logger,
        run_dir,
        resolved,
        name=run_dir.name,
        group=group,
        tags=run_tags(cfg),
        key=key,
        job_type=job_type,
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


# ---------------------------------------------------------------- the shared prune step
@dataclass
class Pruned:
    """What one application of a method leaves: keep-masks, the plan it met, the new shapes,
    and what results.json records of it (training history, sparsity)."""

    masks: dict[str, torch.Tensor]
    plan: Any  # PrunePlan | SparsityPlan: the method's final plan where it re-planned
    arch: Any  # ArchInfo of the pruned model (LinearArch for a family prunelab has no structure for)
    record: dict[str, Any]
    # parameters of masked-only groups (ATP's shared head-dimension channels): zeroed in place,
    # still stored in the model, counted as removed by the ratio
    masked_params: int = 0

    @property
    def params_after(self) -> int:
        """Parameters left: those stored minus the masked-only ones (zeros by construction)."""
        return self.arch.total_params() - self.masked_params


def apply_method(method: PruningMethod, model: Any, plan: Any, ctx: Any) -> Pruned:
    """Prune ``model`` in place with ``method`` (the CLI's prune stage and ``prunelab.prune``
    both run exactly this): structured methods are removed physically, sparse ones zeroed."""
    from prunelab.models.placement import is_dispatched, materialized
    from prunelab.structure import apply_masks, arch_info, masked_params, prune_physically

    # A dispatched model (model.device_map): the layer-wise engine materializes one block at a
    # time itself; weight-only scores (l1/l2/random) and the physical removal, which edits every
    # module at once (the hidden size runs through all of them), see the whole model
    # materialized on the CPU, every change written back into accelerate's offload store.
    dispatched = is_dispatched(model)

    def whole(write_back: bool = True) -> Any:
        return materialized(model, "cpu", write_back) if dispatched else contextlib.nullcontext()

    weights_only = not method.sparse and not method.needs_calibration and not method.trains
    with whole() if weights_only else contextlib.nullcontext():
        masks = method.prune(model, plan, ctx)
    check_weights(
        model,
        f"the model pruned by method={method.name}",
        "the dense weights were finite, so the method's update produced them (a solver that "
        "diverged or overflowed at this dtype); try model.dtype=float32 or report it with the config",
    )
    record = method.record()
    if method.sparse:
        from prunelab.sparsity.checkpoint import mark_config

        with whole(write_back=False):
            record["sparsity"] = _sparsity_record(model, masks, plan, method)
        mark_config(model, {k: record["sparsity"][k] for k in ("method", "pattern", "scope", "sparsity")})
        new_arch = plan_arch(method, model.config, model)
        masked = 0
    else:
        masked = masked_params(arch_info(model.config), masks)
        with whole():
            apply_masks(model, masks)
            new_arch = prune_physically(model, masks)
    return Pruned(masks, method.final_plan or plan, new_arch, record, masked)


def ratio_record(plan: Any, params_after: int, sparsity: dict | None, params_masked: int = 0) -> dict:
    """results.json → ratio: requested and achieved, in the meaning of the method's family.
    ``params_masked``: parameters of masked-only groups (zeroed in place, still stored), which
    ``params_after`` already leaves out; recorded beside the stored count when there are any."""
    if sparsity is not None:
        return {
            "meaning": "sparsity of the pruned linear layers",
            "requested": plan.requested,
            "achieved": sparsity["sparsity"],
            "zero_fraction_of_all_params": sparsity["zero_fraction"],
            "params_before": plan.params_before,
            "params_after": params_after,
        }
    record = {
        "meaning": "fraction of all parameters removed",
        "requested": plan.requested,
        "achieved": 1 - params_after / plan.params_before,
        "params_before": plan.params_before,
        "params_after": params_after,
    }
    if params_masked:  # part of the removal is a mask: both counts, and what the stored model holds
        record.update(
            params_masked=params_masked,
            params_stored=params_after + params_masked,
            achieved_physically=1 - (params_after + params_masked) / plan.params_before,
            masked_note="params_after and achieved count masked-only groups (zeroed in place, still stored) "
            "as removed; params_stored / achieved_physically are the stored model's",
        )
    if getattr(plan, "convention", None):  # a paper's convention: its numbers beside prunelab's
        record["convention"] = dict(plan.convention)
        base = plan.convention.get("params_base")
        if base:  # linear: what the method achieved (it may have re-planned), not the first plan
            record["convention"]["achieved"] = (plan.params_before - params_after) / base
    return record


def choose_recovery(cfg: DictConfig, method: PruningMethod, recovery: Any) -> tuple[Any, bool, str | None]:
    """(the `recovery` group's trainer or None, whether the method's own recovery runs, why the
    group's stage is skipped). A method with its own recovery (LoRAShear) replaces the group's
    stage; a method whose training is the recovery (LoRAPrune, ATP) skips it unless
    ``method.then_recover``."""
    own = method.has_own_recovery and method.recovers
    why = None
    if recovery is not None and method.has_own_recovery:
        why = (
            f"method={cfg.method.name} runs its own recovery (method.recovery, "
            f"{'enabled' if own else 'disabled'}); recovery={cfg.recovery.name} not used"
        )
    elif recovery is not None and method.trains and not method.then_recover:
        why = (
            f"method={cfg.method.name} fine-tunes while it prunes (its LoRA training is the recovery); "
            f"recovery={cfg.recovery.name} skipped (method.then_recover=true runs it too)"
        )
    if why:
        log.info(why)
        recovery = None
    return recovery, own, why


# ---------------------------------------------------------------- the recipe's state
@dataclass
class Job:
    """One run's state, handed from stage to stage. Stages read what earlier ones left and
    record what they did in the run directory (``rd``) before returning."""

    cfg: DictConfig
    method: PruningMethod
    recovery: Any  # LoraRecovery of the `recovery` group, or None
    own_recovery: bool  # the method's own recovery stage runs (LoRAShear)
    skipped_recovery: str | None
    plan: Any
    rd: RunDir
    resolved: dict
    tracker: Any
    device: torch.device
    group: str | None
    t_start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float | None] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    # models this process already holds, by checkpoint dir: later stages use them instead of
    # loading the checkpoint again (only a resumed run loads from disk)
    held: dict[Path, tuple] = field(default_factory=dict)
    dense_pair: tuple | None = None
    _masks: dict = field(default_factory=dict)
    # what the stages leave
    dense: dict | None = None
    prune_rec: dict | None = None
    pruned: dict | None = None
    recover_rec: dict | None = None
    recovered: dict | None = None
    final_dir: Path | None = None
    lock: Any = None  # RunLock of the run directory, released when the run ends
    stage: str = "start"  # the stage under way: what error.json names

    @property
    def sparse(self) -> bool:
        return self.method.sparse

    @property
    def offload(self) -> bool:
        """method.offload: the dense model stays in CPU memory; pruning moves one block at a
        time to the device and evaluation moves the whole model there. Not with a device map:
        accelerate places (and offloads) the model then."""
        return self.method.offload and self.device.type != "cpu" and self.device_map is None

    @property
    def device_map(self) -> Any:
        """model.device_map as plain data (None: the whole model on ``device``)."""
        dm = self.cfg.model.get("device_map")
        return OmegaConf.to_container(dm) if isinstance(dm, DictConfig) else dm

    def placement(self) -> dict | None:
        """``from_pretrained``'s device-map keywords for one model load (a fresh offload folder
        each time: accelerate would reuse another model's offloaded weights); None without a map."""
        if self.device_map is None:
            return None
        from prunelab.models.placement import fresh_folder, load_kwargs

        mm = self.cfg.model.get("max_memory")
        mm = OmegaConf.to_container(mm) if isinstance(mm, DictConfig) else mm
        root = self.cfg.model.get("offload_folder") or self.rd.root / "offload"
        return load_kwargs(self.device_map, mm, fresh_folder(root))

    def place(self, model: Any) -> Any:
        """``model`` where the run computes: on ``device``, or left where accelerate put it."""
        from prunelab.models.placement import place

        return place(model, self.device)

    @property
    def cache(self) -> Path:
        return Path(self.cfg.cache_dir)

    @property
    def pruned_dir(self) -> Path:
        return self.rd.root / "pruned"

    def dense_model(self) -> tuple:
        if self.dense_pair is None:
            from prunelab.models.loading import load_model

            placed = self.placement()
            self.dense_pair = load_model(
                self.cfg.model, "cpu" if self.offload else self.device, placement=placed
            )
            _offload_folder_goes_with(self.dense_pair[0], placed)
        return self.dense_pair

    def stage_model(self, model_dir: Path, take: bool = False) -> tuple:
        if model_dir in self.held:
            return self.held.pop(model_dir) if take else self.held[model_dir]
        from transformers import AutoTokenizer

        from prunelab.models.loading import load_pretrained

        placed = self.placement()
        model = self.place(load_pretrained(model_dir, **_load_kwargs(self.cfg), **(placed or {})))
        _offload_folder_goes_with(model, placed)
        return model, AutoTokenizer.from_pretrained(model_dir)

    def masks(self) -> dict:
        """The run's masks, read once (eval, recovery and results all need them)."""
        if not self._masks:
            from prunelab.sparsity.checkpoint import load_masks

            self._masks.update(load_masks(self.rd.root / "masks.safetensors"))
        return self._masks


# What each stage reads of the others' output in the run directory (dense_eval writes only the
# shared cache): redoing a stage invalidates every stage downstream of it.
DEPENDS = {"eval": ("prune",), "recover": ("prune",), "eval_recovered": ("recover",)}
# The files a stage leaves for later stages and results.json: hashed when it finishes and
# checked when a rerun resumes it (absent ones are not recorded: not every method writes all).
STAGE_OUTPUTS = {
    "prune": (
        "pruned",
        "masks.safetensors",
        "prune_train/history.json",
        "prune_train/reference_losses.json",
    ),
    "recover": ("recovered/model", "recovered/history.json"),
}
# Where a stage keeps partial work it resumes from (training checkpoints): not outputs, but
# deleted with the stage's record when an upstream stage is redone (it was done on old inputs).
STAGE_WORK = {"recover": ("recovered",)}


def start(cfg: DictConfig, run_dir: Path, group: str | None = None) -> Job:
    """Validate (every problem at once, before any model loads), preflight (device, folders,
    hub ids), take the run directory's lock and open it."""
    from prunelab.tracking.lock import RunLock

    method, recovery, plan = check(cfg)
    recovery, own, why = choose_recovery(cfg, method, recovery)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    identity = run_identity(resolved)
    weights, weights_files, exact = weights_identity(cfg.model)
    rcfg = cfg.get("rundir") or {}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, rcfg.get("lock_wait_s", 0), rcfg.get("lock_stale_s", 900)).acquire()
    rd = None
    try:
        rd = RunDir(
            run_dir,
            identity,
            weights=weights,
            weights_files=weights_files,
            weights_resolved=exact,
            verify=rcfg.get("verify", "hash"),
            depends=DEPENDS,
            outputs=STAGE_OUTPUTS,
            work=STAGE_WORK,
        )
        # this attempt's outcome is not known yet: an older results.json or error.json is not it
        (rd.root / "results.json").unlink(missing_ok=True)
        (rd.root / "error.json").unlink(missing_ok=True)
        torch.manual_seed(int(cfg.seed))
        job = Job(
            cfg=cfg,
            method=method,
            recovery=recovery,
            own_recovery=own,
            skipped_recovery=why,
            plan=plan,
            rd=rd,
            resolved=resolved,
            tracker=_tracker(cfg, rd.root, resolved, group, key=_hash(identity)),
            device=_run_device(cfg),
            group=group,
            lock=lock,
        )
    except BaseException as e:
        if rd is not None:
            write_error(rd.root, "start", e)
        else:  # refused to open (another config, other weights): its records are not this run's
            _mark_handled(e)
        lock.release()
        raise
    log.info(
        "run dir %s | plan: %.4f of %d parameters (requested %.4f)",
        rd.root,
        plan.achieved,
        plan.params_before,
        plan.requested,
    )
    return job


# ---------------------------------------------------------------- the stages
def _finite_metrics(metrics: dict) -> bool:
    """Whether every perplexity of an evaluation is finite (a dense cache written before
    non-finite metrics were errors may hold a NaN: it is measured again, and refused)."""
    return all(math.isfinite(v) for v in (metrics.get("perplexity") or {}).values())


def dense_eval(job: Job) -> None:
    """1. The dense model's metrics, cached across runs per (model, weights, eval) config."""
    cfg, resolved = job.cfg, job.resolved
    if not cfg.eval.dense:
        return
    key = _hash(
        {
            # where the weights live never changes the numbers (and keys made before these existed stay valid)
            "model": {k: v for k, v in resolved["model"].items() if f"model.{k}" not in VOLATILE_DOTTED},
            "weights": model_fingerprint(cfg.model),
            "eval": _eval_key(resolved["eval"]),
            # eval sets named like the run's data are read through its node (local_files)
            "data": resolved["data"]
            if any(n == cfg.data.name for n, _ in perplexity_sets(cfg.eval, cfg.data))
            else None,
            # hub eval texts at the commit their revision resolves to (absent: none from the hub,
            # so keys made before this existed stay valid)
            **({"data_commits": commits} if (commits := data_fingerprints(cfg)) else {}),
        }
    )
    path = job.cache / "dense" / f"{cfg.model.name}-{key}.json"
    job.dense = read_json(path)  # None: not cached, or a damaged file (recomputed)
    if job.dense is not None and not _finite_metrics(job.dense):
        job.dense = None  # cached before non-finite metrics were errors: measured again (and refused)
    if job.dense is not None:
        if job.dense.get("zeroshot"):  # the cache key leaves eval.zeroshot.metric out
            from prunelab.data.sources import plain
            from prunelab.evaluation.zeroshot import reported_average

            zs = job.dense["zeroshot"]
            zs["reported"] = reported_average(zs, plain(cfg.eval.zeroshot.get("metric")))
        if job.dense.get("cost"):  # speed from another process, maybe another machine or load
            job.dense["cost"]["paired_with_pruned"] = False
        job.resumed.append("dense_eval")
        log.info("dense evaluation: cached (%s)", path)
    else:
        from prunelab.evaluation.suite import evaluate

        log.info("dense evaluation")
        t = time.perf_counter()
        m, tok = job.dense_model()
        job.dense = evaluate(job.place(m), tok, cfg.eval, job.cache, "dense", cfg.data)
        if job.offload:
            m.to("cpu")
        write_json(path, job.dense)
        job.timings["dense_eval"] = time.perf_counter() - t
    job.tracker.summary({"dense": job.dense})


def prune(job: Job) -> None:
    """2. Prune (physically, or zeroed for sparse methods) and save model + masks."""
    cfg, method = job.cfg, job.method
    rec = job.rd.done("prune")
    if rec is not None:
        job.resumed.append("prune")
        log.info("prune: finished earlier, resuming from %s", job.pruned_dir)
    else:
        from safetensors.torch import save_file

        from prunelab.methods import PruneContext
        from prunelab.models.loading import save_model

        log.info("prune: %s (ratio %s)", cfg.method.name, cfg.ratio)
        t = time.perf_counter()
        m, tok = job.dense_model()
        calib = build_calibration(cfg, method, tok) if method.needs_calibration else None
        t_method = time.perf_counter()  # the method alone, without loading or calibration data
        ctx = PruneContext(
            tok,
            calib,
            int(cfg.seed),
            job.device,
            data_cfg=cfg.data,
            out_dir=job.rd.root / "prune_train",
            tracker=job.tracker,
            run_dir=job.rd.root,
            ratio_tolerance=float(cfg.ratio_tolerance),
        )
        done = apply_method(method, m, job.plan, ctx)
        method_time = time.perf_counter() - t_method
        save_model(m, tok, job.pruned_dir, layout=cfg.get("checkpoint_layout", "padded"))
        if method.sparse:
            from prunelab.sparsity.checkpoint import save_masks

            save_masks(done.masks, job.rd.root / "masks.safetensors")
        else:
            save_file(
                {k: v.to(torch.uint8) for k, v in done.masks.items()}, str(job.rd.root / "masks.safetensors")
            )
        job.held[job.pruned_dir] = (job.place(m), tok)
        job.dense_pair = None  # pruned in place: it is the pruned model now
        rec = job.rd.finish(
            "prune",
            {
                "plan": done.plan.to_dict(),
                "params_after": done.params_after,
                **({"params_masked": done.masked_params} if done.masked_params else {}),
                "layer_shapes": [s.to_dict() for s in done.arch.layers],
                "time_s": time.perf_counter() - t,
                "method_time_s": method_time,
                **done.record,
                # where accelerate placed the model (model.device_map), module prefix -> device
                **({"device_map": {k: str(v) for k, v in m.hf_device_map.items()}} if job.device_map else {}),
            },
        )
        train_state.clear(job.rd.root / "prune_train")  # the stage is done: no resuming inside it
        log.info(
            "prune: %d → %d parameters in %.1f s (method %.1f s)",
            job.plan.params_before,
            rec["params_after"],
            rec["time_s"],
            method_time,
        )
    job.prune_rec = rec
    job.timings["prune"] = rec["time_s"]
    job.timings["prune_method"] = rec.get("method_time_s")


def _evaluate(job: Job, stage: str, model_dir: Path, label: str) -> dict:
    rec = job.rd.done(stage)
    if rec is not None:
        job.resumed.append(stage)
        return rec
    from prunelab.evaluation.suite import evaluate

    cfg = job.cfg
    log.info("evaluate the %s model (%s)", label, model_dir)
    t = time.perf_counter()
    final, tok = job.stage_model(model_dir)
    if job.sparse and cfg.eval.get("semi_structured"):
        from prunelab.sparsity.semi_structured import semi_structured

        with semi_structured(final, list(job.masks())) as kernels:
            if not kernels["used"]:
                log.warning("eval.semi_structured: %s", kernels["reason"])
            metrics = evaluate(final.eval(), tok, cfg.eval, job.cache, label, cfg.data)
        metrics["semi_structured"] = kernels
    else:
        metrics = evaluate(final.eval(), tok, cfg.eval, job.cache, label, cfg.data)
    return job.rd.finish(stage, {"metrics": metrics, "time_s": time.perf_counter() - t})


def evaluate_pruned(job: Job) -> None:
    """3. Evaluate the pruned model, before any recovery."""
    rec = _evaluate(job, "eval", job.pruned_dir, "pruned")
    job.pruned = rec["metrics"]
    job.timings["eval"] = rec["time_s"]
    job.final_dir = job.pruned_dir


def recover(job: Job) -> None:
    """4. Recover with LoRA (the `recovery` group's or the method's own), merged back into a
    dense model of the pruned shape."""
    cfg = job.cfg
    out = job.rd.root / "recovered"
    rec = job.rd.done("recover") if job.recovery is not None or job.own_recovery else None
    if distributed.num_processes() > 1:
        # the other processes wait in `follow` for this: train with the main one, or end
        together = job.recovery is not None and not job.own_recovery and rec is None
        distributed.broadcast({"recover": together})
        job.held.pop(job.pruned_dir, None)  # every process trains the checkpoint as saved
    if job.recovery is None and not job.own_recovery:
        return
    if rec is not None:
        job.resumed.append("recover")
    else:
        from prunelab.models.loading import save_model

        t = time.perf_counter()
        pruned, tok = job.stage_model(job.pruned_dir, take=True)  # LoRA merges into it in place
        if job.own_recovery:
            log.info("recover: %s's own recovery (method.recovery)", cfg.method.name)
            merged = job.method.recover(
                pruned, tok, out, job.tracker, cfg.data, prune_dir=job.rd.root / "prune_train"
            )
        else:
            log.info("recover: LoRA on %s", job.recovery.data)
            merged = job.recovery.recover(
                pruned,
                tok,
                out,
                tracker=job.tracker,
                data_cfg=cfg.data,
                keep_masks=job.masks() if job.sparse else None,  # LoRA must not refill pruned weights
            )
        save_model(merged, tok, out / "model", layout=cfg.get("checkpoint_layout", "padded"))
        if not job.own_recovery:  # the adapter applies to pruned/ as saved (padded there: padded too)
            from prunelab.models.export import export_adapter

            export_adapter(out / "adapter", job.pruned_dir)
        job.held[out / "model"] = (merged, tok)
        after = {}
        if job.sparse:  # measured on the merged weights, recorded with the stage
            from prunelab.sparsity.checkpoint import sparsity_summary

            s = sparsity_summary(merged, job.masks())
            after = {"sparsity_after": {k: s[k] for k in ("achieved", "zero_fraction")}}
        rec = job.rd.finish("recover", {"time_s": time.perf_counter() - t, **after})
        train_state.clear(out)
        log.info("recover: done in %.1f s", rec["time_s"])
    job.recover_rec = rec
    job.timings["recover"] = rec["time_s"]
    job.final_dir = out / "model"


def evaluate_recovered(job: Job) -> None:
    """5. Evaluate the recovered model (when a recovery ran)."""
    if job.recover_rec is None:
        return
    rec = _evaluate(job, "eval_recovered", job.final_dir, "recovered")
    job.recovered = rec["metrics"]
    job.timings["eval_recovered"] = rec["time_s"]


STAGES = (dense_eval, prune, evaluate_pruned, recover, evaluate_recovered)


def _mark_handled(e: BaseException) -> None:
    """The CLI's multirun handler writes error.json for failures the runner has not handled."""
    with contextlib.suppress(AttributeError):
        e.prunelab_handled = True  # type: ignore[attr-defined]


def write_error(run_dir: Path, stage: str, e: BaseException) -> None:
    """error.json: the stage that failed, the exception (type, message, traceback) and when."""
    import traceback

    _mark_handled(e)

    write_json(
        Path(run_dir) / "error.json",
        {
            "stage": stage,
            "type": type(e).__name__,
            "message": str(e),
            "traceback": "".join(traceback.format_exception(e)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def follow(cfg: DictConfig, run_dir: Path) -> None:
    """A process other than the main one under ``accelerate launch``: it writes nothing. It
    validates, waits while the main process evaluates and prunes, then, when the recover
    stage runs, loads the pruned checkpoint the main process saved and trains the LoRA
    recovery with it (data-parallel; the main process saves the result and evaluates)."""
    method, recovery, _ = validate(cfg)
    recovery, _, _ = choose_recovery(cfg, method, recovery)
    order = distributed.broadcast(None)  # sent by the main process's recover stage
    if not order["recover"]:
        return
    from transformers import AutoTokenizer

    from prunelab.models.loading import load_pretrained
    from prunelab.sparsity.checkpoint import load_masks

    root = Path(run_dir)
    torch.manual_seed(int(cfg.seed))
    device = distributed.device(pick_device(str(cfg.device)))
    model = load_pretrained(root / "pruned", **_load_kwargs(cfg)).to(device)
    tok = AutoTokenizer.from_pretrained(root / "pruned")
    keep = load_masks(root / "masks.safetensors") if method.sparse else None
    log.info("recover: LoRA on %s (process %d)", recovery.data, distributed.rank())
    recovery.recover(model, tok, root / "recovered", tracker=None, data_cfg=cfg.data, keep_masks=keep)


def run(cfg: DictConfig, run_dir: Path, group: str | None = None) -> dict | None:
    """The whole recipe: every stage in order, then results.json. Rerunning resumes. A failure
    leaves error.json (and no results.json) in the run directory. Under ``accelerate launch``
    only the main process runs the recipe; the others ``follow`` it (None)."""
    if not distributed.is_main():
        follow(cfg, run_dir)
        return None
    job = start(cfg, run_dir, group)
    try:
        for stage in STAGES:
            job.stage = stage.__name__
            stage(job)
        job.stage = "results"
        return finish(job)
    except BaseException as e:
        (job.rd.root / "results.json").unlink(missing_ok=True)
        write_error(job.rd.root, job.stage, e)
        try:
            job.tracker.finish(exit_code=1)
        except Exception:  # the original failure is the one to report
            log.exception("W&B: finishing the failed run failed too")
        raise
    finally:
        job.lock.release()


# ---------------------------------------------------------------- results
def collect(job: Job) -> dict:
    """results.json: everything the stages recorded, in one document."""
    rec, cfg = job.prune_rec, job.cfg
    sparsity = rec.get("sparsity")
    if sparsity is not None and job.recovered is not None:
        after = job.recover_rec.get("sparsity_after")
        if after is None:  # a recover stage finished before this field existed
            from prunelab.sparsity.checkpoint import sparsity_summary

            s = sparsity_summary(job.stage_model(job.final_dir)[0], job.masks())
            after = {k: s[k] for k in ("achieved", "zero_fraction")}
        sparsity = {**sparsity, "after_recovery": after}
    history = job.rd.root / "recovered" / "history.json"
    return {
        "config": job.resolved,
        "run_dir": str(job.rd.root),
        "model_dir": str(job.final_dir),
        "model_weights": model_fingerprint(cfg.model),  # hub id@commit sha, or a local folder's fingerprint
        "ratio": ratio_record(
            job.plan, rec["params_after"], rec.get("sparsity"), rec.get("params_masked", 0)
        ),
        "sparsity": sparsity,
        "plan": rec["plan"],
        "layer_shapes": rec["layer_shapes"],
        "dense": job.dense,
        "pruned": job.pruned,
        "recovered": job.recovered,
        "recovery": json.loads(history.read_text())
        if job.recover_rec is not None and history.exists()
        else None,
        "recovery_skipped": job.skipped_recovery,
        "training": _training_record(job.rd.root / "prune_train", rec),
        "timings_s": job.timings,
        "resumed_stages": job.resumed,
        # the library versions of this process; and per resumed stage, those that differed when it ran
        "environment": job.rd.env,
        "environment_mismatch": job.rd.env_mismatch,
        "tracking": {
            "logger": cfg.logger.name,
            "group": job.group,
            "tags": run_tags(cfg),
            "run_id": job.tracker.run_id,
        },
    }


def finish(job: Job) -> dict:
    job.timings["total"] = time.perf_counter() - job.t_start
    results = collect(job)
    from prunelab.card import push, write_cards

    write_cards(results, job.rd.root)  # a README.md model card in every saved checkpoint
    rows = summary_rows(results)
    for line in summary_text(rows).splitlines():
        log.info("%s", line)
    log.info("results: %s", job.rd.root / "results.json")
    job.tracker.summary(
        {
            "pruned": job.pruned,
            "recovered": job.recovered,
            "ratio": results["ratio"],
            "timings_s": job.timings,
        }
    )
    job.tracker.table("summary", rows)
    job.tracker.table("plan", plan_rows(results))
    if job.cfg.logger.get("log_model"):
        name = re.sub(r"[^\w.-]", "_", job.rd.root.name)[:100]  # W&B artifact names: [\w.-]
        job.tracker.artifact(f"{name}-model", job.final_dir)
    job.tracker.finish()
    if job.cfg.get("push_to_hub"):  # a failed upload loses nothing: a rerun resumes every stage and retries
        results["pushed"] = push(job.final_dir, job.cfg.push_to_hub, bool(job.cfg.get("push_private", True)))
    # last: results.json exists only for a run that got through everything
    write_json(job.rd.root / "results.json", results)
    (job.rd.root / "error.json").unlink(missing_ok=True)
    return results


def _headline(metrics: dict | None) -> tuple[float | None, float | None]:
    """(first perplexity, mean zero-shot accuracy) of an evaluation, None where absent."""
    if not metrics:
        return None, None
    ppl = next(iter(metrics.get("perplexity", {}).values()), None)
    zs = metrics.get("zeroshot") or {}
    if "reported" in zs:  # the average of eval.zeroshot.metric (acc unless a paper's protocol says otherwise)
        return ppl, zs["reported"]["average"]
    return ppl, zs.get("average", {}).get("acc")


def summary_rows(results: dict) -> list[dict]:
    """dense → pruned → recovered: ratio, parameters, perplexity, accuracy, time."""
    r, t = results["ratio"], results["timings_s"]
    rows = []
    for stage, params, ratio, secs in (
        ("dense", r["params_before"], 0.0, t.get("dense_eval")),
        ("pruned", r["params_after"], r["achieved"], t.get("prune")),
        ("recovered", r["params_after"], r["achieved"], t.get("recover")),
    ):
        if results.get(stage) is None:
            continue
        ppl, acc = _headline(results[stage])
        rows.append(
            {"stage": stage, "ratio": ratio, "params": params, "ppl": ppl, "acc": acc, "time_s": secs}
        )
    return rows


def summary_text(rows: list[dict]) -> str:
    def f(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    lines = [f"{'stage':<10} {'ratio':>7} {'params':>13} {'ppl':>10} {'acc':>7} {'time s':>8}"]
    for x in rows:
        lines.append(
            f"{x['stage']:<10} {x['ratio']:>7.4f} {x['params']:>13,} {f(x['ppl'], '10.2f')} "
            f"{f(x['acc'], '7.4f')} {f(x['time_s'], '8.1f')}"
        )
    return "\n".join(lines)


def plan_rows(results: dict) -> list[dict]:
    """What was removed where: one row per pruned unit (structured) or linear (sparse)."""
    sparsity = results.get("sparsity")
    if sparsity:
        return [
            {"where": name, **{k: v for k, v in rep.items() if isinstance(v, (int, float, str))}}
            for name, rep in sparsity.get("per_layer", {}).items()
        ]
    return [{"where": unit, "removed": n} for unit, n in results["plan"].get("remove", {}).items()]
