"""The results tables of the README, each row an ordinary prunelab run (the same run
directories as the CLI, so a rerun resumes and only missing rows are computed). On the
embedded model by default; ``--model smollm2_135m`` runs the same tables on the real model
with its 2-core budget (``BUDGETS`` below: eval=smollm2, recovery=lora_smollm2 and the same
training tokens for the training methods).

    python experiments/embedded_results.py baselines                   # structured magnitude vs random
    python experiments/embedded_results.py baselines --model tiny_llama_gqa
    python experiments/embedded_results.py llm_pruner                  # estimators, ± LoRA recovery
    python experiments/embedded_results.py layerwise                   # ADMM/SparseGPT/Wanda/magnitude
    python experiments/embedded_results.py loraprune                   # LoRAPrune vs LLM-Pruner + LoRA
    python experiments/embedded_results.py lorashear                   # LoRAShear vs both + its ablations
    python experiments/embedded_results.py atp                         # ATP vs two-stage, domain data
    python experiments/embedded_results.py llm_pruner --model smollm2_135m --ratios 0.2 0.5

Random rows are mean ± std over seeds 0, 1, 2; ``--seeds 0 1 2`` does the same for any row. Tables are printed as markdown and written
to <output-root>/results_<table>_<model>.md (+ .json with every number).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir

import prunelab.cli  # registers the run-dir resolver; _run_dir_name names the run dirs
from prunelab.paths import conf_dir
from prunelab.runner import run

TASKS = ("prunelab_ending", "prunelab_cloze", "prunelab_order")
SEEDS = (0, 1, 2)
DEFAULT_SEED = 0  # conf/config.yaml's


def text_only(steps: int) -> str:
    """LoRAShear's recovery as one plain-text stage of ``steps`` steps: its whole recovery
    budget (the instruction stage's steps included), so only the format changes."""
    return (
        "method.recovery.stages=[{name:text,format:text,"
        f"sources:[embedded:reference,embedded:docstrings,embedded:comments],max_steps:{steps}}}]"
    )


# the row's marker: with_budget replaces it by text_only(<the job's method's recovery steps>)
TEXT_ONLY = "method.recovery.stages=<text only>"

# table -> rows: (label, overrides, several seeds?)
TABLES: dict[str, list[tuple[str, list[str], bool]]] = {
    "baselines": [
        (
            "structured magnitude",
            ["method=structured", "method.importance=magnitude", "recovery=none"],
            False,
        ),
        ("structured random", ["method=structured", "method.importance=random", "recovery=none"], True),
    ],
    "llm_pruner": [
        ("l2", ["method=llm_pruner", "method.importance=l2", "recovery=none"], False),
        ("random", ["method=llm_pruner", "method.importance=random", "recovery=none"], True),
        ("vector", ["method=llm_pruner", "method.importance=vector", "recovery=none"], False),
        ("element2", ["method=llm_pruner", "method.importance=element2", "recovery=none"], False),
        ("element1", ["method=llm_pruner", "method.importance=element1", "recovery=none"], False),
        ("element1 + LoRA", ["method=llm_pruner", "method.importance=element1"], False),
        ("element2 + LoRA", ["method=llm_pruner", "method.importance=element2"], False),
        # the papers' recovery format (Alpaca prompts, loss on answers, lr 1e-4) at the same step budget
        (
            "element1 + LoRA (instruction format)",
            [
                "method=llm_pruner",
                "method.importance=element1",
                "recovery=lora",
                "recovery.max_steps=150",
                "recovery.batch_size=16",
                # the validation and warm-up this row was measured with (recovery=lora's before issue 18)
                "recovery.val_size=200",
                "recovery.eval_every=50",
                "recovery.warmup_steps=10",
            ],
            False,
        ),
    ],
    # equal training tokens: LoRAPrune's own fine-tuning = recovery=lora_embedded (150 × 16 × 128)
    "loraprune": [
        ("LLM-Pruner element1 + LoRA", ["method=llm_pruner", "method.importance=element1"], False),
        ("LoRAPrune (lora_grad)", ["method=loraprune"], False),
        ("LoRAPrune (taylor)", ["method=loraprune", "method.importance=taylor"], False),
        ("LoRAPrune (magnitude)", ["method=loraprune", "method.importance=magnitude"], False),
    ],
    # equal training tokens (at most): LHSPG 50 steps + recovery ≤ 100 steps, vs 150 steps
    "lorashear": [
        ("LLM-Pruner element1 + LoRA", ["method=llm_pruner", "method.importance=element1"], False),
        ("LoRAPrune (lora_grad)", ["method=loraprune"], False),
        ("LoRAShear", ["method=lorashear"], False),
        ("LoRAShear, per-unit selection", ["method=lorashear", "method.lhspg.scope=unit"], False),
        ("LoRAShear, text-only recovery", ["method=lorashear", TEXT_ONLY], False),
        ("− LoRA-aware groups", ["method=lorashear", "method.lora_aware=false"], False),
        ("− knowledge analysis", ["method=lorashear", "method.knowledge.enabled=false"], False),
        ("− LHSPG (one-shot)", ["method=lorashear", "method.lhspg.enabled=false"], False),
        ("− dynamic mixture", ["method=lorashear", "method.recovery.dynamic=false"], False),
    ],
}


# The layer-wise table (the ADMM/Wanda papers' layout): methods as rows, sparsity settings as
# columns; ratio = sparsity of the linear layers.
LAYERWISE_METHODS = [
    ("magnitude", ["method=magnitude", "recovery=none"]),
    ("Wanda", ["method=wanda", "recovery=none"]),
    ("SparseGPT", ["method=sparsegpt", "recovery=none"]),
    ("ADMM", ["method=admm", "recovery=none"]),
    ("Wanda + LoRA", ["method=wanda"]),
    ("ADMM + LoRA", ["method=admm"]),
]
# the real model: perplexity only (the Wanda / ADMM papers' tables; zero-shot is 40% of an
# evaluation's time), no LoRA rows (10 recoveries would not fit 2 cores), ADMM's scope both ways
_PPL_ONLY = ["recovery=none", "eval.zeroshot.tasks=[]"]
LAYERWISE_REAL = [
    ("magnitude", ["method=magnitude", *_PPL_ONLY]),
    ("Wanda", ["method=wanda", *_PPL_ONLY]),
    ("SparseGPT", ["method=sparsegpt", *_PPL_ONLY]),
    ("ADMM (row scope)", ["method=admm", *_PPL_ONLY]),
    ("ADMM (layer scope)", ["method=admm", "method.scope=layer", *_PPL_ONLY]),
]
LAYERWISE_SETTINGS = [
    ("50%", ["ratio=0.5"]),
    ("60%", ["ratio=0.6"]),
    ("70%", ["ratio=0.7"]),
    ("2:4", ["ratio=0.5", "method.sparsity_pattern=2:4"]),
    ("4:8", ["ratio=0.5", "method.sparsity_pattern=4:8"]),
]


# ATP's comparison (one- vs two-stage on the same domain data and tokens): in-domain
# (reference source) and general perplexity, zero-shot, % of dense recovered.
ATP_DOMAIN = ["data=embedded_domain"]
ATP_METHODS = [
    (
        "LLM-Pruner element1 + LoRA (two-stage)",
        ["method=llm_pruner", "method.importance=element1", "recovery.data=embedded_domain"],
    ),
    ("ATP (one stage)", ["method=atp"]),
    # the paper's attention space: shared head-dimension channels, masked in place (issue 18.3a)
    ("ATP (one stage, head_dim attention)", ["method=atp", "method.attention_space=head_dim"]),
]


def atp_table(model: str, output_root: str, ratios: list[float]) -> None:
    def avg(m: dict) -> float:
        return 100 * statistics.mean(m["zeroshot"][t]["acc"] for t in TASKS)

    rows, dense = [], None
    for ratio in ratios:
        for label, overrides in ATP_METHODS:
            r = job([f"model={model}", f"ratio={ratio}", *ATP_DOMAIN, *overrides], output_root)
            dense = r["dense"]
            rows.append((label, ratio, r))
    dp = dense["perplexity"]
    lines = [
        f"| {model} | ratio (achieved) | train tokens | ppl in-domain | ppl general | avg acc "
        "| % dense: in-domain ppl | % dense: general ppl | % dense: acc |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | 0 | | {dp['embedded_domain']:.2f} | {dp['embedded']:.2f} | {avg(dense):.1f} | 100 | 100 | 100 |",
    ]
    for label, ratio, r in rows:
        final = r["recovered"] or r["pruned"]
        fp = final["perplexity"]
        tokens = (r.get("recovery") or {}).get("train_tokens", 0) + (
            (r.get("training") or {}).get("history") or {}
        ).get("train_tokens", 0)
        lines.append(
            f"| {label} | {ratio:.0%} ({r['ratio']['achieved']:.2%}) | {tokens:,} | {fp['embedded_domain']:.2f} | "
            f"{fp['embedded']:.2f} | {avg(final):.1f} | {100 * dp['embedded_domain'] / fp['embedded_domain']:.1f} | "
            f"{100 * dp['embedded'] / fp['embedded']:.1f} | {100 * avg(final) / avg(dense):.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(output_root) / f"results_atp_{model}.md"
    out.write_text(table + "\n")


def layerwise_table(model: str, output_root: str, only: list[str] | None = None) -> None:
    cells: dict[tuple[str, str], dict] = {}
    methods = LAYERWISE_REAL if model in BUDGETS else LAYERWISE_METHODS
    settings = [(n, e) for n, e in LAYERWISE_SETTINGS if not only or n in only]
    for setting, extra in settings:  # a setting's column across methods first: partial runs compare
        for label, overrides in methods:
            cells[label, setting] = job([f"model={model}", *overrides, *extra], output_root)
    dense = next(iter(cells.values()))["dense"]
    names = [s for s, _ in settings]

    def final(r: dict) -> dict:
        return r["recovered"] or r["pruned"]

    def avg(m: dict) -> str:
        if not m.get("zeroshot"):
            return "—"
        return f"{100 * statistics.mean(m['zeroshot'][t]['acc'] for t in TASKS):.1f}"

    lines = [
        f"| {model}: perplexity | "
        + " | ".join(names)
        + " | avg acc 50% | avg acc 2:4 | prune time 50% (s) |",
        "|---|" + "---|" * (len(names) + 3),
        "| dense | "
        + " | ".join(f"{dense['perplexity']['embedded']:.2f}" for _ in names)
        + f" | {avg(dense)} | {avg(dense)} | |",
    ]
    none = {"zeroshot": None}
    for label, _ in methods:
        row = [f"{final(cells[label, s])['perplexity']['embedded']:.2f}" for s in names]
        r50, r24 = cells.get((label, "50%")), cells.get((label, "2:4"))
        lines.append(
            f"| {label} | " + " | ".join(row) + f" | {avg(final(r50) if r50 else none)} | "
            f"{avg(final(r24) if r24 else none)} | "
            + (f"{r50['timings_s']['prune_method']:.2f} |" if r50 else "|")
        )
    table = "\n".join(lines)
    print(table)
    out = Path(output_root) / f"results_layerwise_{model}.md"
    out.write_text(table + "\n")
    summary = {
        f"{label} @ {setting}": {
            "ppl_pruned": r["pruned"]["perplexity"]["embedded"],
            "ppl_final": final(r)["perplexity"]["embedded"],
            "avg_acc": avg(final(r)),  # "—" without zero-shot
            "sparsity": r["ratio"]["achieved"],
            "zero_fraction_of_all_params": r["ratio"]["zero_fraction_of_all_params"],
            "sparsity_after_recovery": (r["sparsity"].get("after_recovery") or {}).get("achieved"),
            "prune_method_s": r["timings_s"]["prune_method"],
            "prune_stage_s": r["timings_s"]["prune"],
        }
        for (label, setting), r in cells.items()
    }
    out.with_suffix(".json").write_text(json.dumps({"dense": dense, "cells": summary}, indent=2))


# Per-model budgets: on SmolLM2-135M every job evaluates with eval=smollm2 and recovers with
# recovery=lora_smollm2 (40 steps × 8 × 128 tokens), and the training methods run their
# `_smollm2` variants (conf/method/*_smollm2.yaml: the same training tokens). A row's own keys
# win, except `force` (the instruction-format row keeps its recipe, at this step budget).
BUDGETS: dict[str, dict] = {
    "smollm2_135m": {
        "*": ["eval=smollm2", "recovery=lora_smollm2"],
        "force": ["recovery.max_steps=40", "recovery.batch_size=8"],
        "methods": {m: f"{m}_smollm2" for m in ("loraprune", "lorashear", "atp")},
    },
}


def with_budget(overrides: list[str]) -> list[str]:
    """The job's overrides with its model's budget added underneath."""
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "tiny_llama")
    budget = BUDGETS.get(model, {})
    merged = {o.split("=", 1)[0]: o for o in budget.get("*", [])}
    merged.update({o.split("=", 1)[0]: o for o in overrides})
    method = merged.get("method", "method=llm_pruner").split("=", 1)[1]
    if method in budget.get("methods", {}):
        merged["method"] = f"method={budget['methods'][method]}"
    if merged.get("recovery", "recovery=lora") != "recovery=none" and "recovery" in {
        o.split("=", 1)[0] for o in overrides
    }:
        merged.update({o.split("=", 1)[0]: o for o in budget.get("force", [])})
    key = TEXT_ONLY.split("=", 1)[0]
    # the text-only ablation trains as many steps as the job's method recovers for (embedded 100, SmolLM2 24)
    if merged.get(key) == TEXT_ONLY:
        from prunelab.api import compose as compose_run

        rest = [o for k, o in merged.items() if k != key]
        merged[key] = text_only(sum(int(st.max_steps) for st in compose_run(rest).method.recovery.stages))
    return list(merged.values())


def job(overrides: list[str], output_root: str) -> dict:
    overrides = with_budget(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(
            config_name="config", overrides=[*overrides, f"output_root={output_root}", "logger=none"]
        )
    return run(cfg, Path(output_root) / "runs" / prunelab.cli._run_dir_name(",".join(sorted(overrides))))


def seeded_jobs(base: list[str], seeded: bool, seeds: list[int] | None) -> list[list[str]]:
    """One override list per seed: ``seeds`` if given, else SEEDS for random rows and the
    config's seed for the rest. A row that ran before without a seed override keeps its run
    directory (no ``seed=`` in its name) for the default seed."""
    seeds = seeds or (list(SEEDS) if seeded else [DEFAULT_SEED])
    return [[*base, *([f"seed={s}"] if seeded or s != DEFAULT_SEED else [])] for s in seeds]


def stats(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(results: list[dict]) -> dict:
    final = [r["recovered"] or r["pruned"] for r in results]
    out = {
        "ppl_pruned": stats([r["pruned"]["perplexity"]["embedded"] for r in results]),
        "ppl": stats([m["perplexity"]["embedded"] for m in final]),
        "avg": stats([statistics.mean(m["zeroshot"][t]["acc"] for t in TASKS) for m in final]),
        "params": final[0]["cost"]["parameters"],
        "achieved": results[0]["ratio"]["achieved"],
        "recovered": results[0]["recovered"] is not None,
        "trained": results[0].get("training") is not None,
        # every token LoRA trained on: while pruning (LoRAPrune, LoRAShear) and in recovery
        "train_tokens": sum(
            (r.get("recovery") or {}).get("train_tokens", 0)
            + ((r.get("training") or {}).get("history") or {}).get("train_tokens", 0)
            for r in results[:1]
        ),
    }
    for t in TASKS:
        out[t] = stats([m["zeroshot"][t]["acc"] for m in final])
    return out


def fmt(ms: tuple[float, float], digits: int = 2, scale: float = 1.0) -> str:
    mean, std = ms
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=sorted([*TABLES, "layerwise", "atp"]))
    p.add_argument("--model", default="tiny_llama")
    p.add_argument("--output-root", default="outputs")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument(
        "--only", nargs="+", help="rows whose label starts with one of these (layerwise: settings)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run every chosen row with these seeds (calibration windows, training order) and "
        f"report mean ± std; default: {' '.join(map(str, SEEDS))} for random rows, the config's seed for the rest",
    )
    args = p.parse_args()
    if args.table == "layerwise":
        layerwise_table(args.model, args.output_root, args.only)
        return
    if args.table == "atp":  # the paper's headline ratio 40%, and 20%, 50%
        atp_table(args.model, args.output_root, [0.2, 0.4, 0.5] if args.ratios == [0.2, 0.5] else args.ratios)
        return
    rows, dense = [], None
    for ratio in args.ratios:
        for label, overrides, seeded in TABLES[args.table]:
            if args.only and label not in args.only:
                continue
            base = [f"model={args.model}", f"ratio={ratio}", *overrides]
            results = [job(o, args.output_root) for o in seeded_jobs(base, seeded, args.seeds)]
            dense = results[0]["dense"]
            n = len(results)
            rows.append((label + (f" ({n} seeds)" if n > 1 else ""), ratio, summarise(results)))

    dense_avg = statistics.mean(dense["zeroshot"][t]["acc"] for t in TASKS)
    tok = args.table == "lorashear"  # equal-token comparisons show the tokens
    lines = [
        f"| {args.model} | ratio (achieved) | params |{' train tokens |' if tok else ''} ppl pruned | ppl final "
        "| ending | cloze | order | avg acc |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if tok else ""),
        f"| dense | 0 | {dense['cost']['parameters']:,} |{' |' if tok else ''} {dense['perplexity']['embedded']:.2f} | | "
        + " | ".join(f"{100 * dense['zeroshot'][t]['acc']:.1f}" for t in TASKS)
        + f" | {100 * dense_avg:.1f} |",
    ]
    for label, ratio, r in rows:
        final = (
            fmt(r["ppl"])
            if r["recovered"]
            else ("(trained while pruning)" if r["trained"] else "(no recovery)")
        )
        lines.append(
            f"| {label} | {ratio:.0%} ({r['achieved']:.2%}) | {r['params']:,} |"
            + (f" {r['train_tokens']:,} |" if tok else "")
            + f" {fmt(r['ppl_pruned'])} | {final} | "
            + " | ".join(fmt(r[t], 1, 100) for t in TASKS)
            + f" | {fmt(r['avg'], 1, 100)} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.output_root) / f"results_{args.table}_{args.model}.md"
    out.write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"dense": dense, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
