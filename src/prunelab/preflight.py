"""Preflight: what can be checked before anything large loads or downloads.

Run by ``dry_run=true`` and at the start of every real run, after the config validated:

- the device exists (``cuda`` on a CPU build, ``cuda:7`` on a 2-GPU machine, ``mps`` off a Mac);
- the output and cache folders can be written;
- every hub id the run names resolves at its revision (the model; the datasets of ``data``,
  the perplexity sets, the recovery and a training method's data), a dataset is not a
  loading-script repository (which ``datasets`` ≥ 4 refuses), and a gated model has a token.

Offline (``HF_HUB_OFFLINE=1``) the hub checks are skipped and listed as not checked, so a dry
run says plainly what it could not verify. Problems are raised together as one ConfigError.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from prunelab.errors import ConfigError

log = logging.getLogger(__name__)
LOCAL_PREFIXES = ("embedded:", "synthetic:", "packaged:")
# The hub datasets lm-eval 0.4's own task configs read for the papers' seven tasks
# (`dataset_path`, `dataset_name`; tests/integration/test_hub_models_tasks.py checks them
# against lm-eval's task registry). Other lm-eval tasks are listed as not checked.
PAPER_TASK_DATA = {
    "boolq": ("aps/super_glue", "boolq"),
    "piqa": ("baber/piqa", None),
    "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": ("allenai/openbookqa", "main"),
}
SCRIPT_OK_REVISIONS = ("refs/convert/parquet",)  # the hub's parquet export of a script repository


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def check_device(name: str) -> str | None:
    """A problem with ``device`` on this machine, or None."""
    import torch

    name = str(name)
    if name in ("auto", "cpu"):
        return None
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return (
                f"device={name!r}: no CUDA device here (torch {torch.__version__}, "
                f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                "use device=cpu or device=auto"
            )
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            return f"device={name!r}: this machine has cuda:0 … cuda:{torch.cuda.device_count() - 1}"
        return None
    if name == "mps":
        if not torch.backends.mps.is_available():
            return "device='mps': Apple's MPS backend is not available on this machine; use device=cpu"
        return None
    return None  # other names are refused by validate()


def write_probe(folder: Path) -> tuple[Path, str | None]:
    """(the nearest existing folder of ``folder``, why it cannot be written or None): a
    temporary file created there and removed at once, so nothing is left behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return existing, "not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".prunelab-write-check-"):
            pass
    except OSError as e:
        return existing, str(e.strerror)
    return existing, None


def check_writable(key: str, folder: str | Path) -> str | None:
    """A problem writing into ``folder`` (created if missing, then left as found), or None."""
    folder = Path(folder).expanduser()
    existing, why = write_probe(folder)
    if why == "not a folder":
        return f"{key}={str(folder)!r}: {existing} is not a folder"
    if why:
        return f"{key}={str(folder)!r} cannot be written ({why}); choose another {key}"
    return None


def _hub_ids(cfg: Any) -> list[tuple[str, str, str, str | None]]:
    """(key, kind, repo id, revision) of every hub repository the run would read."""
    from prunelab.data.sources import load_source_config
    from prunelab.evaluation.suite import perplexity_sets

    out = []
    path = str(cfg.model.path)
    if not path.startswith(LOCAL_PREFIXES) and not Path(path).expanduser().exists():
        out.append(("model.path", "model", path, cfg.model.get("revision")))
    names = {("data", str(cfg.data.name))}
    names |= {(f"eval.perplexity.datasets ({n})", n) for n, _ in perplexity_sets(cfg.eval, cfg.data)}
    if cfg.recovery.name != "none" and cfg.recovery.get("data"):
        names.add(("recovery.data", str(cfg.recovery.data)))
    train = cfg.method.get("train")
    if train is not None and train.get("data"):
        names.add(("method.train.data", str(train.data)))
    recovery = cfg.method.get("recovery")  # LoRAShear's own staged recovery: each stage's sources
    stages = recovery.get("stages") if recovery is not None and hasattr(recovery, "get") else None
    for i, stage in enumerate(stages or []):
        for source in stage.get("sources") or []:
            if ":" not in str(source):  # data config names; "embedded:<source>" is local
                names.add((f"method.recovery.stages[{i}].sources", str(source)))
    for key, name in sorted(names):
        node = cfg.data if name == cfg.data.name else load_source_config(name)
        if node.get("path") and not node.get("local_files"):
            out.append((key, "dataset", str(node.path), node.get("revision")))
    zs = cfg.eval.get("zeroshot")
    if zs is not None and zs.get("include_defaults"):
        for task in zs.tasks:
            if str(task) in PAPER_TASK_DATA:
                out.append((f"eval.zeroshot.tasks ({task})", "dataset", PAPER_TASK_DATA[str(task)][0], None))
    return out


def unchecked_tasks(cfg: Any) -> list[str]:
    """lm-eval tasks whose hub data preflight does not know (any task beyond the papers')."""
    zs = cfg.eval.get("zeroshot")
    if zs is None or not zs.get("include_defaults"):
        return []
    from prunelab.evaluation.zeroshot import embedded_task_names

    return [str(t) for t in zs.tasks if str(t) not in PAPER_TASK_DATA and str(t) not in embedded_task_names()]


def check_hub(cfg: Any) -> list[str]:
    """Problems with the hub repositories the run names (the hub is reached)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    api, problems = HfApi(), []
    token = os.environ.get("HF_TOKEN") or _saved_token()
    seen = set()
    for key, kind, repo, revision in _hub_ids(cfg):
        if (kind, repo, revision) in seen:
            continue
        seen.add((kind, repo, revision))
        where = f"{key}={repo!r}" + (f" at revision {revision!r}" if revision else "")
        try:
            info = (api.model_info if kind == "model" else api.dataset_info)(repo, revision=revision)
        except RevisionNotFoundError:
            problems.append(f"{where}: the {kind} repository has no such revision")
            continue
        except GatedRepoError:
            problems.append(_gated(key, repo))
            continue
        except RepositoryNotFoundError:
            hint = " or a local folder: model.path=<folder>" if kind == "model" else ""
            problems.append(f"{where}: no such {kind} on the hub (check the id{hint})")
            continue
        except Exception as e:  # the hub unreachable, a proxy, …: one readable line
            problems.append(
                f"{where}: the hub could not be asked ({type(e).__name__}: {e}); offline: HF_HUB_OFFLINE=1"
            )
            continue
        if kind == "model" and getattr(info, "gated", False) and not token:
            problems.append(_gated(key, repo))
        if kind == "dataset" and revision not in SCRIPT_OK_REVISIONS:
            files = [s.rfilename for s in (info.siblings or [])]
            scripts = [f for f in files if f.endswith(".py") and "/" not in f]
            if scripts:
                problems.append(
                    f"{where}: a loading-script dataset ({scripts[0]}), which datasets >= 4 refuses; read its "
                    "parquet export instead (revision: refs/convert/parquet with data_files, as conf/data/ptb.yaml)"
                )
    return problems


def _saved_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # pragma: no cover - older huggingface_hub
        return None


def _gated(key: str, repo: str) -> str:
    return (
        f"{key}={repo!r} is a gated model: request access on https://huggingface.co/{repo}, then log in "
        "(`hf auth login`) or set HF_TOKEN; or use a local copy: model.path=<folder>"
    )


def preflight(cfg: Any) -> list[str]:
    """Raise one ConfigError with every problem found; return what could not be checked."""
    problems = [p for p in (check_device(cfg.device),) if p]
    for key in ("output_root", "cache_dir"):
        p = check_writable(key, cfg[key])
        if p:
            problems.append(p)
    repo = cfg.get("push_to_hub")
    if repo:
        if hub_offline():
            problems.append(
                f"push_to_hub={repo!r} needs the hub, but HF_HUB_OFFLINE=1 is set; unset it or push_to_hub=null"
            )
        elif not (os.environ.get("HF_TOKEN") or _saved_token()):
            problems.append(
                f"push_to_hub={repo!r} needs a hub token with write access: `hf auth login` or set HF_TOKEN"
            )
    not_checked = []
    if hub_offline():
        ids = [f"{key}={repo!r}" for key, _, repo, _ in _hub_ids(cfg)]
        if ids:
            not_checked.append(
                "offline (HF_HUB_OFFLINE=1): not checked that these resolve on the hub: " + ", ".join(ids)
            )
    else:
        problems += check_hub(cfg)
    other = unchecked_tasks(cfg)
    if other:
        not_checked.append(
            f"the hub data of lm-eval tasks {', '.join(other)} (lm-eval resolves it when the evaluation runs)"
        )
    if problems:
        raise ConfigError("preflight:\n  - " + "\n  - ".join(problems))
    for note in not_checked:
        log.info("preflight: %s", note)
    return not_checked
