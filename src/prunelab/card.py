"""Model cards: a README.md in every saved checkpoint, so a pruned model explains itself.

The card is written when a run finishes, from its ``results.json``: the base model and the
exact weights it was pruned from, the method and every option, the ratio requested and
achieved (with its convention) and the parameters before and after, the evaluation numbers
with their protocol (window, joiner, metric per task), the recovery, the versions and the
command. Its front matter is the hub's model-card metadata (``base_model``, ``tags``, …), read
back with ``huggingface_hub.ModelCard``; ``push_to_hub`` uploads a run's model with it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from prunelab.tracking.rundir import unique_tmp

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
STAGES = ("dense", "pruned", "recovered")
# a hub repo id: namespace/name, letters, digits, - _ . (the hub's own rule, 96 characters)
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("prunelab", "torch", "transformers", "peft", "lm_eval"):
        try:
            out[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            continue
    return out


def command_line() -> str:
    """The command that made the run: ``prunelab`` with its Hydra overrides when run from the
    CLI, else the Python entry point and its arguments."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
            return " ".join(["prunelab", *overrides])
    except (ImportError, ValueError):
        pass
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "(library call)"


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _metric_rows(results: dict, cfg: dict) -> list[tuple[str, list[str]]]:
    """(label, [dense, pruned, recovered]) for perplexity per dataset and accuracy per task."""
    stages = [results.get(s) or {} for s in STAGES]
    rows: list[tuple[str, list[str]]] = []
    ppl = cfg.get("eval", {}).get("perplexity", {}) or {}
    window = f"{ppl.get('seq_len')}-token windows"
    for name in sorted({k for s in stages for k in (s.get("perplexity") or {})}):
        rows.append(
            (f"perplexity `{name}` ({window})", [_fmt((s.get("perplexity") or {}).get(name)) for s in stages])
        )
    reported = next(
        (s["zeroshot"].get("reported") for s in stages if (s.get("zeroshot") or {}).get("reported")), None
    )
    metrics = (reported or {}).get("metric") or {}
    tasks = sorted({k for s in stages for k in (s.get("zeroshot") or {}) if k not in ("average", "reported")})
    for task in tasks:
        metric = metrics.get(task, "acc") if isinstance(metrics, dict) else str(metrics)
        vals = []
        for s in stages:
            v = ((s.get("zeroshot") or {}).get(task) or {}).get(metric)
            vals.append(_fmt(None if v is None else 100 * v, 1))
        rows.append((f"{task} ({metric}, %)", vals))
    if tasks:
        avg = []
        for s in stages:
            z = s.get("zeroshot") or {}
            v = (z.get("reported") or {}).get("average")
            if v is None:
                v = (z.get("average") or {}).get("acc")
            avg.append(_fmt(None if v is None else 100 * v, 1))
        rows.append(("zero-shot average (%)", avg))
    return rows


def model_card(results: dict, stage: str, command: str | None = None) -> str:
    """The README.md of the checkpoint of ``stage`` (``pruned`` or ``recovered``) of a run."""
    cfg = results["config"]
    model, method = cfg["model"], cfg["method"]
    ratio = results["ratio"]
    base = str(model["path"])
    on_hub = not base.startswith((".", "/", "~")) and ":" not in base and base.count("/") == 1
    sparse = results.get("sparsity") is not None
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["prunelab", "pruned", str(method["name"]), "sparse" if sparse else "structured-pruning"]
        + (["lora-recovered"] if stage == "recovered" else []),
    }
    if on_hub:
        meta["base_model"] = base
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    title = f"{base} — {method['name']}, {ratio['requested']:g} {'sparsity' if sparse else 'pruned'}"
    lines += [f"# {title}", ""]
    weights = results.get("model_weights") or base
    lines += [
        f"Pruned from `{base}` (weights `{weights}`) by prunelab with method `{method['name']}`"
        + (", then recovered with LoRA (merged into the weights)." if stage == "recovered" else "."),
        "",
        "## Ratio",
        "",
        f"- meaning: {ratio.get('meaning', 'fraction of all parameters removed')}",
        f"- requested {ratio['requested']:g}, achieved {ratio['achieved']:.4f}",
        f"- parameters: {ratio['params_before']:,} → {ratio['params_after']:,}",
    ]
    if ratio.get("convention"):
        conv = ratio["convention"]
        lines.append(f"- convention: `{conv.get('name', conv) if isinstance(conv, dict) else conv}`")
    if sparse:
        s = results["sparsity"]
        lines.append(
            f"- sparsity pattern `{s.get('pattern')}`, scope `{s.get('scope')}`; the zeros are stored dense "
            "(same shapes as the base model)"
        )
    lines += ["", "## Evaluation", ""]
    rows = _metric_rows(results, cfg)
    if rows:
        lines += ["| | dense | pruned | recovered |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {' | '.join(vals)} |" for label, vals in rows]
        ev = cfg.get("eval", {})
        ppl = ev.get("perplexity", {}) or {}
        zs = ev.get("zeroshot", {}) or {}
        lines += [
            "",
            f"Protocol (`eval={ev.get('name')}`): perplexity on {ppl.get('datasets')} in "
            f"{ppl.get('seq_len')}-token windows (at most {ppl.get('max_windows')} windows; joiner "
            f"{ppl.get('joiner')!r}); zero-shot through lm-eval, {zs.get('num_fewshot') or 0}-shot, "
            f"limit {zs.get('limit')}, metric {zs.get('metric') or 'acc'}.",
        ]
    else:
        lines.append("Not evaluated.")
    lines += ["", "## How it was made", ""]
    rec = results.get("recovery")
    if stage == "recovered" and rec:
        lines.append(
            f"- recovery: LoRA ({cfg.get('recovery', {}).get('name')}), {rec.get('steps_run')} steps, "
            f"{rec.get('train_tokens')} training tokens, best step {rec.get('best_step')}"
        )
    lines += [
        f"- command: `{command or command_line()}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()),
        "",
        "Method options:",
        "",
        "```yaml",
        yaml.safe_dump(
            {"method": method, "ratio": cfg.get("ratio"), "seed": cfg.get("seed")}, sort_keys=False
        ).strip(),
        "```",
        "",
        "## Loading",
        "",
    ]
    lines += _loading(results, stage)
    return "\n".join(lines) + "\n"


def _loading(results: dict, stage: str) -> list[str]:
    shapes = results.get("layer_shapes") or []
    uniform = len({repr(s) for s in shapes}) <= 1
    if uniform:
        return [
            "Every layer has the same shape: a plain transformers checkpoint.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
            "```",
        ]
    # per-layer shapes: how they were written (models/export.py, docs/checkpoints.md)
    if (results.get("config") or {}).get("checkpoint_layout", "padded") == "compact":
        head = [
            "Layers have different shapes (the first and last layers are kept whole), saved at their",
            "pruned size with `modeling_prunelab.py` (`checkpoint_layout=compact`): transformers loads",
            "it with `trust_remote_code=True` (that file runs), prunelab without:",
        ]
        plain = (
            'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", trust_remote_code=True)'
        )
    else:
        head = [
            "Layers have different shapes (the first and last layers are kept whole), saved zero-padded",
            "to one shape (`checkpoint_layout=padded`): a plain transformers checkpoint with the pruned",
            "model's outputs, as large as its largest layer; prunelab slices the padding off:",
        ]
        plain = 'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")'
    return [
        *head,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        plain,
        "",
        "from prunelab.models.loading import load_pretrained",
        'model = load_pretrained("<this folder or repo>")  # the compact pruned model',
        "```",
    ]


def write_cards(results: dict, run_dir: Path, command: str | None = None) -> list[Path]:
    """README.md into each saved checkpoint of the run (``pruned/``, ``recovered/model/``)."""
    written = []
    for stage, folder in (
        ("pruned", Path(run_dir) / "pruned"),
        ("recovered", Path(run_dir) / "recovered" / "model"),
    ):
        if results.get(stage) is None and stage == "recovered":
            continue
        if not (folder / "config.json").exists():
            continue
        path = folder / CARD_NAME
        tmp = unique_tmp(path)
        tmp.write_text(model_card(results, stage, command))
        os.replace(tmp, path)
        written.append(path)
    return written


def check_repo_id(value: Any) -> str | None:
    """``push_to_hub``: null or a hub repo id ``namespace/name``; the message when it is not."""
    if value is None:
        return None
    if not isinstance(value, str) or not REPO_ID.match(value):
        return (
            f"push_to_hub={value!r} is not allowed; allowed: null (never push) or a hub repo id "
            "'namespace/name' (letters, digits, - _ .)"
        )
    return None


def push(folder: Path, repo_id: str, private: bool = True, message: str | None = None) -> str:
    """Upload a checkpoint folder (its card included) to ``repo_id`` on the hub; the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=message or f"prunelab: {Path(folder).name}",
    )
    log.info("pushed %s to %s (%s)", folder, repo_id, info.commit_url)
    return str(info.commit_url)
