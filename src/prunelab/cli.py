"""The ``prunelab`` command: Hydra composes conf/ and hands the config to the runner.

prunelab                                            # default experiment
prunelab method.importance=random ratio=0.5
prunelab -m ratio=0.2,0.5 method.importance=random,magnitude
prunelab --cfg job                                  # print the composed config
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from prunelab.errors import ConfigError, NonFiniteError
from prunelab.paths import conf_dir
from prunelab.runner import VOLATILE_DOTTED, VOLATILE_KEYS, run_identity

log = logging.getLogger(__name__)


MAX_DIR_NAME = 200  # file systems allow 255 bytes per name; long ablation override lists exceed it


def _run_dir_name(override_dirname: str) -> str:
    # One directory per distinct set of overrides: the same command resumes the same run.
    # Hydra escapes ':' in values (method.sparsity_pattern=2\:4); the directory keeps the plain value.
    name = override_dirname.replace("\\:", ":").replace("/", "_") or "default"
    if len(name.encode()) > MAX_DIR_NAME:  # a readable prefix + a hash of the whole: still one dir per config
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[: MAX_DIR_NAME - 14].decode(errors="ignore") + f"..{digest}"
    return name


if not OmegaConf.has_resolver("run_dir_name"):
    OmegaConf.register_new_resolver("run_dir_name", _run_dir_name)


def sweep_group(cfg: DictConfig) -> str | None:
    """W&B group: ``sweep_name`` if set; in a multirun, the swept keys plus a hash of the fixed
    overrides (``sweep:method.importance,ratio@1a2b3c``), the same for every job of the sweep."""
    if cfg.sweep_name:
        return str(cfg.sweep_name)
    hc = HydraConfig.get()
    if hc.mode.name != "MULTIRUN":
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # The sweep's own overrides (with their comma lists) are in multirun.yaml; a job only sees its values.
    spec = Path(hc.sweep.dir) / "multirun.yaml"
    overrides = list(hc.overrides.task)
    if spec.exists():
        overrides = list(OmegaConf.load(spec).hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = {o.key_or_group for o in parsed if o.is_sweep_override()}
    params = hc.sweeper.get("params") or {}  # an experiment's sweep (hydra.sweeper.params)
    keys = sorted(keys | {str(k).lstrip("+~") for k in params})
    # Sweeps over the same keys but with other fixed overrides (another model, say) get their own group.
    fixed = sorted(
        o.input_line
        for o in parsed
        if not o.is_sweep_override()
        and o.key_or_group.split(".")[0] not in VOLATILE_KEYS
        and o.key_or_group not in VOLATILE_DOTTED
        and o.key_or_group not in keys  # a sweeper's per-trial value (Optuna) is not a fixed override
    )
    suffix = f"@{hashlib.sha1(repr(fixed).encode()).hexdigest()[:6]}" if fixed else ""
    return ("sweep:" + ",".join(keys) if keys else "sweep") + suffix


FAILED: list[str] = []  # jobs of this multirun that failed (the sweep goes on without them)


def _record_failure(run_dir: Path, cfg: DictConfig, e: BaseException) -> None:
    """error.json in the job's run directory (and its config, if the job failed before
    writing one): what the aggregation reports for this job. Not when the runner handled it
    already, nor when another process holds the directory (its run is not this one)."""
    import json

    from prunelab import distributed
    from prunelab.runner import write_error
    from prunelab.tracking.lock import RunDirLocked

    if getattr(e, "prunelab_handled", False) or isinstance(e, RunDirLocked) or not distributed.is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.json").exists():
        try:
            resolved = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an unresolvable config: keep it as written
            resolved = OmegaConf.to_container(cfg, resolve=False)
        config = run_identity(resolved)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    write_error(run_dir, "validate", e)  # before the run directory was opened


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from prunelab.runner import run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from prunelab.progress import quiet_libraries

    quiet_libraries()  # no library progress bars in a log file
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    if cfg.get("dry_run"):  # validate only: no model loads, nothing downloads
        from prunelab.runner import check

        try:  # what a real run refuses before its weights load (offline: says what it could not check)
            check(cfg, dry_run=True)
        except ConfigError as e:
            log.error("%s", e)
            if multirun:
                FAILED.append(run_dir.name)
                return None
            sys.exit(2)
        log.info("dry run: the config of %s is valid", run_dir.name)
        return 0.0 if multirun else None  # a placeholder for sweepers that need a number (Optuna)
    try:
        results = run(cfg, run_dir, group=sweep_group(cfg))
    except Exception as e:  # a multirun records the failure and goes on with the other jobs
        if not multirun:
            if isinstance(e, ConfigError):
                log.error("%s", e)
                sys.exit(2)
            if isinstance(e, NonFiniteError):  # the message says where and what to do: no traceback
                log.error("%s", e)
                sys.exit(1)
            raise
        log.exception("job %s failed; the sweep continues (error.json in its run directory)", run_dir.name)
        _record_failure(run_dir, cfg, e)
        FAILED.append(run_dir.name)
        return float("nan")  # a sweeper (Optuna) marks the trial failed and goes on
    if results is None:  # accelerate launch: a process other than the main one (it writes nothing)
        return None
    (run_dir / "error.json").unlink(missing_ok=True)  # a rerun that succeeds clears an old failure
    final = results["recovered"] or results["pruned"]
    ppl = final["perplexity"]
    return float(next(iter(ppl.values()))) if ppl else None  # a metric for sweepers


def main() -> None:
    if os.environ.get("RANK", "0") != "0" and os.environ.get("WORLD_SIZE", "1") != "1":
        # accelerate launch: Hydra's own files (.hydra/, the log) in the run directory are the
        # main process's; the others log to their console only
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _main()
    if FAILED:  # every other job ran; the sweep as a whole did not succeed
        log.error("%d job(s) of the multirun failed: %s", len(FAILED), ", ".join(FAILED))
        sys.exit(1)


if __name__ == "__main__":
    main()
