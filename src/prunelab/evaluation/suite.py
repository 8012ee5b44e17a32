"""The evaluation suite a run applies to the dense and to the pruned model: perplexity on
each configured text, zero-shot accuracy through lm-eval, and cost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from prunelab.evaluation.perplexity import perplexity


def perplexity_sets(cfg: Any, data_cfg: Any = None) -> list[tuple[str, str]]:
    """``eval.perplexity.datasets`` entries ``name`` or ``name:split`` (default split: test),
    plus the run's own data (its test split) when that data config declares
    ``in_domain_eval: true`` — a domain run (ATP, data=embedded_domain) reports in-domain and
    general perplexity side by side."""
    out = []
    for entry in cfg.perplexity.datasets:
        name, _, split = str(entry).partition(":")
        out.append((name, split or "test"))
    if data_cfg is not None and data_cfg.get("in_domain_eval") and data_cfg.name not in {n for n, _ in out}:
        out.append((str(data_cfg.name), "test"))
    return out


def source_for(name: str, data_cfg: Any = None):
    """The text source for an eval dataset: the run's own ``data`` node when the names match
    (so ``data.local_files`` overrides reach the evaluation too), else ``conf/data/<name>.yaml``."""
    from prunelab.data.sources import build_source, load_source_config

    if data_cfg is not None and data_cfg.name == name:
        return build_source(data_cfg)
    return build_source(load_source_config(name))


def check_eval_config(cfg: Any, data_cfg: Any = None) -> None:
    from prunelab.errors import ConfigError
    from prunelab.evaluation.zeroshot import check_tasks

    if not isinstance(cfg.get("semi_structured", False), bool):
        raise ConfigError(f"eval.semi_structured={cfg.semi_structured!r} must be true or false")

    for name, _split in perplexity_sets(cfg, data_cfg):
        source_for(name, data_cfg).check()
    if cfg.zeroshot.tasks:
        from prunelab.data.sources import plain
        from prunelab.evaluation.zeroshot import shots_of

        check_tasks(list(cfg.zeroshot.tasks), include_defaults=bool(cfg.zeroshot.include_defaults))
        shots = plain(cfg.zeroshot.get("num_fewshot"))
        for task in cfg.zeroshot.tasks:
            shots_of(shots, str(task))
        if isinstance(shots, dict) and set(shots) - set(cfg.zeroshot.tasks):
            extra = sorted(set(shots) - set(cfg.zeroshot.tasks))
            raise ConfigError(f"eval.zeroshot.num_fewshot names {extra}, not in eval.zeroshot.tasks")


def evaluate(
    model: nn.Module, tokenizer, cfg: Any, cache_dir: Path, label: str, data_cfg: Any = None
) -> dict:
    """{"perplexity": {dataset: ppl}, "zeroshot": {task: {acc, acc_norm, ...}}, "cost": {...}, "time_s": {...}}"""
    out: dict[str, Any] = {"perplexity": {}, "zeroshot": {}, "cost": {}, "time_s": {}}
    t = time.perf_counter()
    for name, split in perplexity_sets(cfg, data_cfg):
        ids = source_for(name, data_cfg).token_ids(tokenizer, split)
        out["perplexity"][name] = perplexity(
            model,
            ids,
            cfg.perplexity.seq_len,
            batch_size=cfg.perplexity.batch_size,
            max_windows=cfg.perplexity.max_windows,
            progress=f"perplexity {name} [{label}]",
        )
    out["time_s"]["perplexity"] = time.perf_counter() - t
    if cfg.zeroshot.tasks:
        from prunelab.data.sources import plain
        from prunelab.evaluation.zeroshot import build_embedded_tasks, evaluate_zeroshot

        t = time.perf_counter()
        include = None
        if not cfg.zeroshot.include_defaults:
            include = build_embedded_tasks(
                cache_dir / "tasks", seed=cfg.zeroshot.seed, num_examples=cfg.zeroshot.num_examples
            )
        out["zeroshot"] = evaluate_zeroshot(
            model,
            tokenizer,
            list(cfg.zeroshot.tasks),
            include_path=include,
            include_defaults=bool(cfg.zeroshot.include_defaults),
            limit=cfg.zeroshot.limit,
            batch_size=cfg.zeroshot.batch_size,
            max_length=cfg.zeroshot.max_length,
            num_fewshot=plain(cfg.zeroshot.get("num_fewshot")),
        )
        out["time_s"]["zeroshot"] = time.perf_counter() - t
    if cfg.cost.enabled:
        from prunelab.evaluation.cost import measure_cost

        t = time.perf_counter()
        out["cost"] = measure_cost(
            model,
            seq_len=cfg.cost.seq_len,
            batch_size=cfg.cost.batch_size,
            decode_tokens=cfg.cost.decode_tokens,
            repeats=cfg.cost.repeats,
        )
        out["time_s"]["cost"] = time.perf_counter() - t
    return out
