"""The evaluation suite a run applies to the dense and to the pruned model: perplexity on
each configured text, zero-shot accuracy through lm-eval, and cost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from prunelab.errors import NonFiniteError
from prunelab.evaluation.perplexity import perplexity
from prunelab.evaluation.zeroshot import reported_average
from prunelab.numerics import DTYPE_HINT, check_value, watch_outputs


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


def source_for(name: str, data_cfg: Any = None, joiner: str | None = None):
    """The text source for an eval dataset: the run's own ``data`` node when the names match
    (so ``data.local_files`` overrides reach the evaluation too), else ``conf/data/<name>.yaml``.
    ``joiner`` replaces the data config's own row joiner (hub texts; the embedded corpus keeps
    its document separator)."""
    from prunelab.data.sources import HubText, build_source, load_source_config

    source = build_source(
        data_cfg if data_cfg is not None and data_cfg.name == name else load_source_config(name)
    )
    if joiner is not None and isinstance(source, HubText):
        source.joiner = joiner
    return source


def check_texts(cfg: Any, data_cfg: Any, tokenizer: Any, local_only: bool = False) -> list[str]:
    """Problems with ``eval.perplexity.seq_len`` against the evaluation texts themselves: each
    text must hold at least one window in this tokenizer's tokens. Run before the weights load
    (the tokenizer and the texts are cheap); ``local_only`` (a dry run): only the texts that are
    on this machine without a download (the embedded corpus)."""
    from prunelab.data.sources import EmbeddedText

    seq_len = int(cfg.perplexity.seq_len)
    problems = []
    for name, split in perplexity_sets(cfg, data_cfg):
        source = source_for(name, data_cfg, joiner_of(cfg.perplexity.get("joiner"), name))
        if local_only and not isinstance(source, EmbeddedText):
            continue
        n = int(source.token_ids(tokenizer, split).numel())
        if n < seq_len:
            problems.append(
                f"eval.perplexity.seq_len={seq_len} is longer than the text of {name}:{split} "
                f"({n} tokens with this model's tokenizer): not one window; allowed: at most {n}"
            )
    return problems


def joiner_of(spec: Any, name: str) -> str | None:
    """The row joiner of eval dataset ``name`` under ``eval.perplexity.joiner``: null = the data
    config's own (``data.joiner``), a string for every hub text, or ``{dataset: joiner}``."""
    from prunelab.data.sources import plain

    spec = plain(spec)
    if isinstance(spec, dict):
        return spec.get(name)
    return spec


def check_joiner(spec: Any, names: list[str]) -> None:
    from prunelab.data.sources import plain
    from prunelab.errors import ConfigError

    spec = plain(spec)
    allowed = "null (each data config's own data.joiner), a string such as '\\n\\n', or {dataset: string}"
    if spec is None or isinstance(spec, str):
        return
    if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
        raise ConfigError(f"eval.perplexity.joiner={spec!r} is not allowed; allowed: {allowed}")
    extra = sorted(set(spec) - set(names))
    if extra:
        raise ConfigError(
            f"eval.perplexity.joiner names {extra}, not among the perplexity datasets {names}; allowed: {allowed}"
        )


def check_eval_config(cfg: Any, data_cfg: Any = None) -> None:
    from prunelab.data.corpus import SPLITS
    from prunelab.errors import ConfigError, bad_value
    from prunelab.evaluation.zeroshot import check_tasks

    if not isinstance(cfg.get("semi_structured", False), bool):
        raise ConfigError(f"eval.semi_structured={cfg.semi_structured!r} must be true or false")

    sets = perplexity_sets(cfg, data_cfg)
    if not sets and not cfg.zeroshot.tasks and not cfg.cost.enabled:
        raise ConfigError(
            "eval: nothing to evaluate (eval.perplexity.datasets=[], eval.zeroshot.tasks=[], "
            "eval.cost.enabled=false); allowed: at least one of them"
        )
    check_joiner(cfg.perplexity.get("joiner"), [n for n, _ in sets])
    for name, split in sets:
        source = source_for(name, data_cfg)
        source.check()
        splits = list(getattr(source, "splits", None) or SPLITS)
        if split not in splits:
            raise bad_value("eval.perplexity.datasets", f"{name}:{split}", [f"{name}:{s}" for s in splits])
    if cfg.zeroshot.tasks:
        from prunelab.data.sources import plain
        from prunelab.evaluation.zeroshot import check_metric, shots_of

        check_tasks(list(cfg.zeroshot.tasks), include_defaults=bool(cfg.zeroshot.include_defaults))
        check_metric(plain(cfg.zeroshot.get("metric")), list(cfg.zeroshot.tasks))
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
        joiner = joiner_of(cfg.perplexity.get("joiner"), name)
        ids = source_for(name, data_cfg, joiner).token_ids(tokenizer, split)
        ppl = perplexity(
            model,
            ids,
            cfg.perplexity.seq_len,
            batch_size=cfg.perplexity.batch_size,
            max_windows=cfg.perplexity.max_windows,
            progress=f"perplexity {name} [{label}]",
        )
        # the weights were checked when the model was made: this is the forward pass itself
        out["perplexity"][name] = check_value(
            ppl, f"evaluation of the {label} model: the perplexity on {name}:{split}", DTYPE_HINT
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
        # accuracy from NaN log-likelihoods is a number but no measurement: watch the logits
        with watch_outputs(model.get_output_embeddings()) as nonfinite:
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
            if nonfinite():
                raise NonFiniteError(
                    f"evaluation of the {label} model: its logits held NaN or inf during the zero-shot tasks "
                    f"{list(cfg.zeroshot.tasks)}, so their accuracies are not measurements; {DTYPE_HINT}"
                )
        out["zeroshot"]["reported"] = reported_average(out["zeroshot"], plain(cfg.zeroshot.get("metric")))
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
