"""The first rows of the embedded results table: the structured baseline (magnitude and
random scores) at 20% and 50% of all parameters, random as mean ± std over 3 seeds.

    python experiments/embedded_baselines.py                      # tiny_llama
    python experiments/embedded_baselines.py --model tiny_llama_gqa

Each job is an ordinary prunelab run (same run directories as the CLI, so reruns resume);
the table is printed as markdown and written next to the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir

import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
from prunelab.paths import conf_dir
from prunelab.runner import run

TASKS = ("prunelab_ending", "prunelab_cloze", "prunelab_order")


def job(overrides: list[str], output_root: str) -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, f"output_root={output_root}"])
    name = ",".join(sorted(o for o in overrides if not o.startswith(("logger", "output_root"))))
    return run(cfg, Path(output_root) / "runs" / name)


def row(results: list[dict]) -> dict:
    """Mean and std over seeds of perplexity and accuracies (std 0 for one seed)."""

    def stats(vals):
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    m = [r["pruned"] for r in results]
    out = {"ppl": stats([x["perplexity"]["embedded"] for x in m])}
    for t in TASKS:
        out[t] = stats([x["zeroshot"][t]["acc"] for x in m])
    out["avg"] = stats([statistics.mean(x["zeroshot"][t]["acc"] for t in TASKS) for x in m])
    out["params"] = m[0]["cost"]["parameters"]
    out["achieved"] = results[0]["ratio"]["achieved"]
    return out


def fmt(mean_std, digits=2, pct=False):
    mean, std = mean_std
    k = 100 if pct else 1
    return f"{k * mean:.{digits}f}" + (f" ± {k * std:.{digits}f}" if std else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny_llama")
    p.add_argument("--output-root", default="outputs")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    base = [f"model={args.model}", "logger=none"]
    rows = []
    dense = None
    for ratio in args.ratios:
        mag = job([*base, f"ratio={ratio}", "method.importance=magnitude"], args.output_root)
        dense = mag["dense"]
        rows.append(("magnitude", ratio, row([mag])))
        rnd = [
            job([*base, f"ratio={ratio}", "method.importance=random", f"seed={s}"], args.output_root)
            for s in args.seeds
        ]
        rows.append((f"random ({len(args.seeds)} seeds)", ratio, row(rnd)))

    dense_avg = statistics.mean(dense["zeroshot"][t]["acc"] for t in TASKS)
    lines = [
        f"| {args.model} | ratio (achieved) | params | ppl (test, 128) | ending | cloze | order | avg acc |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | 0 | {dense['cost']['parameters']:,} | {dense['perplexity']['embedded']:.2f} | "
        + " | ".join(f"{100 * dense['zeroshot'][t]['acc']:.1f}" for t in TASKS)
        + f" | {100 * dense_avg:.1f} |",
    ]
    for name, ratio, r in rows:
        lines.append(
            f"| structured {name} | {ratio:.0%} ({r['achieved']:.2%}) | {r['params']:,} | {fmt(r['ppl'])} | "
            + " | ".join(fmt(r[t], 1, pct=True) for t in TASKS)
            + f" | {fmt(r['avg'], 1, pct=True)} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.output_root) / f"embedded_baselines_{args.model}.md"
    out.write_text(table + "\n")
    (out.with_suffix(".json")).write_text(json.dumps({"dense": dense, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
