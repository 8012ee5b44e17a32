"""``prunelab-aggregate``: run or sweep directories → a paper-style table and plots.

    prunelab-aggregate outputs/runs                                   # every job under it
    prunelab-aggregate outputs/runs --out outputs/tables/llm_pruner --published llm_pruner_table1
    prunelab-aggregate 'outputs/runs/*method=lorashear*' --title "LoRAShear ablation"

Rows are the configurations, named by what varies between the jobs (the method, then the
method's keys that vary among its own jobs, then other varying groups such as recovery);
jobs that differ only in ``seed`` are averaged (mean ± std). Columns: ratio (requested and
achieved), parameters, perplexity per dataset and zero-shot accuracy per task of the final
model (recovered if there is a recovery, else pruned), and the average accuracy; the dense
row comes first. A job whose run directory holds ``error.json`` (a failed multirun job) is
listed as failed. ``--published`` adds the seed paper's numbers (``published.yaml``) next to
the matching rows. Writes ``table.md``, ``table.tex``, ``table.json`` and, when more than
one ratio was run, ``ppl_vs_ratio.png`` and ``acc_vs_ratio.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SKIP_KEYS = ("ratio", "seed", "tags", "sweep_name", "output_root", "cache_dir", "logger", "device")


@dataclass
class Job:
    run_dir: Path
    config: dict
    results: dict | None = None
    error: dict | None = None
    label: str = ""
    flat: dict = field(default_factory=dict)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def collect(paths: list[str]) -> list[Job]:
    """Every job directory (``config.json`` with results.json or error.json) at or one level
    under the given paths (globs allowed)."""
    dirs: list[Path] = []
    for p in paths:
        for match in sorted(glob.glob(p)) or [p]:
            root = Path(match)
            cands = [root] if (root / "config.json").exists() else sorted(root.glob("*/"))
            dirs += [d for d in cands if (d / "config.json").exists()]
    jobs = []
    for d in dict.fromkeys(dirs):  # keep order, drop repeats
        res, err = d / "results.json", d / "error.json"
        if not (res.exists() or err.exists()):
            continue  # unfinished (a rerun resumes it)
        jobs.append(
            Job(
                d,
                json.loads((d / "config.json").read_text()),
                json.loads(res.read_text()) if res.exists() and not err.exists() else None,
                json.loads(err.read_text()) if err.exists() else None,
            )
        )
    if not jobs:
        raise SystemExit(f"no finished or failed prunelab jobs under {paths}")
    _label(jobs)
    return jobs


def _label(jobs: list[Job]) -> None:
    for j in jobs:
        j.flat = {k: v for k, v in flatten(j.config).items() if k.split(".")[0] not in SKIP_KEYS}
    keys = sorted({k for j in jobs for k in j.flat})

    def varies(subset: list[Job], key: str) -> bool:
        # a key some jobs lack (added to prunelab after they ran) does not name rows; seeds are averaged
        if key.rsplit(".", 1)[-1] == "seed" or not all(key in j.flat for j in subset):
            return False
        return len({json.dumps(j.flat.get(key), default=str) for j in subset}) > 1

    by_method: dict[str, list[Job]] = {}
    for j in jobs:
        by_method.setdefault(str(j.flat.get("method.name")), []).append(j)
    other = [k for k in keys if not k.startswith("method.") and varies(jobs, k)]
    # a group's name says it all (recovery.name, model.name) unless a key also varies among
    # the jobs that share the name (recovery=lora with two max_steps)
    named = {k.rsplit(".", 1)[0] for k in other if k.endswith(".name")}

    def within_name(k: str) -> bool:
        g = k.rsplit(".", 1)[0]
        same: dict[str, list[Job]] = {}
        for j in jobs:
            same.setdefault(str(j.flat.get(f"{g}.name")), []).append(j)
        return any(varies(sub, k) for sub in same.values())

    other = [k for k in other if k.endswith(".name") or k.rsplit(".", 1)[0] not in named or within_name(k)]

    def short(v: Any) -> str:
        text = str(v)
        return text if len(text) <= 40 else text[:37] + "..."

    for method, group in by_method.items():
        own = [k for k in keys if k.startswith("method.") and k != "method.name" and varies(group, k)]
        # short values (importance=l2) name every row; switches and long values (ablation
        # flags, stage lists) only the rows that depart from what most of the method's jobs use
        mode = {k: statistics.mode(json.dumps(j.flat.get(k), default=str) for j in group) for k in own}
        always = {
            k
            for k in own
            if all(not isinstance(j.flat.get(k), bool) and len(str(j.flat.get(k))) <= 40 for j in group)
        }
        for j in group:
            parts = [method] + [
                f"{k.removeprefix('method.')}={short(j.flat.get(k))}"
                for k in own
                if k in always or json.dumps(j.flat.get(k), default=str) != mode[k]
            ]
            parts += [f"{k.removesuffix('.name')}={j.flat.get(k)}" for k in other]
            j.label = ", ".join(parts)


def _final(r: dict) -> dict:
    return r["recovered"] or r["pruned"]


def _mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _metric_spec(jobs: list[Job], published: dict | None) -> Any:
    """Which recorded metric each task's column shows: the paper's (``published.yaml``
    protocol) when a table is named, else the runs' own ``eval.zeroshot.metric``."""
    if published and "metric" in published.get("protocol", {}):
        return published["protocol"]["metric"]
    specs = [json.dumps(((j.config.get("eval") or {}).get("zeroshot") or {}).get("metric")) for j in jobs]
    if len(set(specs)) > 1:
        raise SystemExit(
            f"the jobs were averaged under different eval.zeroshot.metric settings ({sorted(set(specs))}); "
            "aggregate them separately or name a table with --published"
        )
    return json.loads(specs[0])


def _protocol(jobs: list[Job]) -> dict:
    """The perplexity protocol and ratio convention the jobs ran with (each set of values seen)."""
    seen: dict[str, set] = {"seq_len": set(), "joiner": set(), "ratio_convention": set()}
    for j in jobs:
        ppl = (j.config.get("eval") or {}).get("perplexity") or {}
        seen["seq_len"].add(ppl.get("seq_len"))
        seen["joiner"].add(json.dumps(ppl.get("joiner")))
        seen["ratio_convention"].add(j.config.get("ratio_convention") or "params")
    return {k: sorted(v, key=str) for k, v in seen.items()}


def _check_one_protocol(jobs: list[Job]) -> None:
    """One table, one evaluation protocol: jobs evaluated under different eval configs (a
    quick-eval sweep beside a full-eval one) would put numbers side by side that do not
    compare, under one dense row."""
    evals = {}
    for j in jobs:
        ev = {k: v for k, v in flatten(j.config.get("eval") or {}, "eval").items() if v is not None}
        ev.pop("eval.dense", None)
        evals.setdefault(json.dumps(ev, sort_keys=True, default=str), []).append(j)
    if len(evals) > 1:
        variants = [json.loads(k) for k in evals]
        keys = sorted({k for v in variants for k in v if len({json.dumps(w.get(k)) for w in variants}) > 1})
        raise SystemExit(
            f"the jobs were evaluated under {len(evals)} different eval configs (they differ in {', '.join(keys)}); "
            "their numbers do not compare in one table: aggregate each protocol's jobs separately"
        )


def summarise(jobs: list[Job], metric: Any = None) -> dict:
    """{"dense": metrics, "rows": [...]} — one row per configuration and ratio; jobs that
    differ only in seed are averaged. ``metric``: ``eval.zeroshot.metric``-style spec of the
    metric each task reports (default acc)."""
    from prunelab.evaluation.zeroshot import NOT_TASKS, metric_of

    _check_one_protocol(jobs)

    def signature(j: Job) -> str:
        # Every key of the job names its row (seeds alone are averaged). A key a job lacks
        # counts as null, as in run directories: a key added later with a null default does
        # not split old and new jobs, but Wanda's lack of `importance` never merges two
        # LLM-Pruner estimators into one row.
        return json.dumps(
            {k: v for k, v in sorted(j.flat.items()) if k.rsplit(".", 1)[-1] != "seed" and v is not None},
            default=str,
        )

    by_config: dict[tuple[float, str], list[Job]] = {}
    for j in jobs:
        by_config.setdefault((float(j.config.get("ratio", 0)), signature(j)), []).append(j)
    groups: dict[tuple[str, float], list[Job]] = {}
    for (ratio, _), group in by_config.items():
        label, n = group[0].label, 2
        while (label, ratio) in groups:  # same name, different config (keys the label omits)
            label, n = f"{group[0].label} [config {n}]", n + 1
        groups[label, ratio] = group
    dense = next((j.results["dense"] for j in jobs if j.results and j.results.get("dense")), None)
    rows = []
    for (label, ratio), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ok = [j for j in group if j.results is not None]
        row: dict[str, Any] = {
            "label": label,
            "ratio": ratio,
            "jobs": len(group),
            "failed": [{"run_dir": str(j.run_dir), **(j.error or {})} for j in group if j.error],
            "config": ok[0].flat if ok else group[0].flat,
        }
        if ok:
            finals = [_final(j.results) for j in ok]
            row["achieved"] = ok[0].results["ratio"]["achieved"]
            row["params"] = ok[0].results["ratio"]["params_after"]
            row["perplexity"] = {
                name: _mean_std([f["perplexity"][name] for f in finals]) for name in finals[0]["perplexity"]
            }
            row["convention"] = ok[0].results["ratio"].get("convention")
            tasks = sorted(t for t in (finals[0].get("zeroshot") or {}) if t not in NOT_TASKS)

            def score(f: dict, t: str) -> float:
                m = metric_of(metric, t)
                if m not in f["zeroshot"][t]:
                    raise SystemExit(f"task {t!r} recorded no {m!r} (it has {sorted(f['zeroshot'][t])})")
                return 100 * f["zeroshot"][t][m]

            row["zeroshot"] = {t: _mean_std([score(f, t) for f in finals]) for t in tasks}
            if tasks:
                row["avg_acc"] = _mean_std([statistics.mean(score(f, t) for t in tasks) for f in finals])
            row["seeds"] = len(ok)
        rows.append(row)
    metrics = {t: metric_of(metric, t) for r in rows for t in r.get("zeroshot", {})}
    return {"dense": dense, "rows": rows, "metric": metrics, "protocol": _protocol(jobs)}


def _published(name: str | None) -> dict | None:
    if not name:
        return None
    import yaml

    table = yaml.safe_load((Path(__file__).parent / "published.yaml").read_text())
    if name not in table:
        raise SystemExit(f"--published {name!r} is not in published.yaml; allowed: {', '.join(table)}")
    return table[name]


def _published_for(pub: dict | None, row: dict | None) -> dict | None:
    """The published row that matches a measured row (dense: row None)."""
    if pub is None:
        return None
    for p in pub["rows"]:
        if row is None:
            if p.get("dense"):
                return p
            continue
        if p.get("dense") or ("ratio" in p and abs(p["ratio"] - row["ratio"]) > 1e-9):
            continue
        if "ratio" not in p and "ratio" in pub and abs(pub["ratio"] - row["ratio"]) > 1e-9:
            continue
        if all(str(row["config"].get(k)) == str(v) for k, v in p.get("match", {}).items()):
            return p
    return None


def _ratio_cell(r: dict) -> str:
    """Requested (achieved) in the run's convention, and the fraction of all parameters."""
    c = r.get("convention")
    if c:
        return f"{r['ratio']:.0%} {c['convention']} ({c['achieved']:.2%}; {r['achieved']:.2%} of all)"
    return f"{r['ratio']:.0%} ({r['achieved']:.2%})"


def legend(summary: dict, published: dict | None = None) -> list[str]:
    """What each column is: the metric per task, the perplexity protocol and ratio convention
    of the runs, and where a named paper table's protocol differs from theirs."""
    metric, prot = summary.get("metric", {}), summary.get("protocol", {})
    lines = []
    if metric:
        lines.append(
            "Zero-shot columns: "
            + ", ".join(f"{t} {m}" for t, m in sorted(metric.items()))
            + "; avg = their unweighted mean (%)."
        )
    if prot:
        joiners = ", ".join("data config's own" if j == "null" else j for j in prot["joiner"])
        lines.append(
            f"Perplexity: non-overlapping windows of {', '.join(map(str, prot['seq_len']))} tokens, rows joined "
            f"by {joiners}. Ratio convention: {', '.join(prot['ratio_convention'])}."
        )
    if published:
        lines.append(f"Published: {published['source']}.")
        want = published.get("protocol", {})
        for key, ours in (
            ("seq_len", prot.get("seq_len")),
            ("joiner", [json.loads(j) for j in prot.get("joiner", [])]),
            ("ratio_convention", prot.get("ratio_convention")),
        ):
            if key in want and ours is not None and ours != [want[key]]:
                lines.append(
                    f"NOT LIKE WITH LIKE: the paper's {key} is {want[key]!r}, these runs used "
                    f"{', '.join(repr(o) if o is not None else 'each data config' + chr(39) + 's own' for o in ours)}."
                )
    return lines


def _fmt(ms: tuple[float, float] | None, digits: int = 2) -> str:
    if ms is None:
        return "–"
    mean, std = ms
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def render(summary: dict, published: dict | None = None, title: str = "") -> tuple[str, str]:
    """(markdown, LaTeX) of the summary; published numbers in "(paper …)" cells."""
    dense, rows = summary["dense"], summary["rows"]
    datasets = sorted(
        {d for r in rows for d in r.get("perplexity", {})} | set((dense or {}).get("perplexity", {}))
    )
    tasks = sorted({t for r in rows for t in r.get("zeroshot", {})})
    metric = summary.get("metric", {})
    head = [
        "method",
        "ratio (achieved)",
        "params",
        *[f"ppl {d}" for d in datasets],
        *[f"{t} ({metric.get(t, 'acc')})" for t in tasks],
        "avg",
    ]
    body: list[list[str]] = []

    def pub_cell(p: dict | None, key: str) -> str:
        return f" (paper {p[key]:.2f})" if p and key in p else ""

    if dense:
        p = _published_for(published, None)
        zs = dense.get("zeroshot") or {}
        have = tasks and all(t in zs and metric.get(t, "acc") in zs[t] for t in tasks)
        avg = statistics.mean(100 * zs[t][metric.get(t, "acc")] for t in tasks) if have else None
        body.append(
            ["dense", "0", f"{dense['cost']['parameters']:,}" if dense.get("cost") else "–"]
            + [
                f"{dense['perplexity'][d]:.2f}{pub_cell(p, d)}" if d in dense["perplexity"] else "–"
                for d in datasets
            ]
            + [f"{100 * zs[t][metric.get(t, 'acc')]:.1f}" if t in zs else "–" for t in tasks]
            + [(f"{avg:.1f}" if avg is not None else "–") + pub_cell(p, "avg_acc")]
        )
    for r in rows:
        if "perplexity" not in r:  # every job of this row failed
            err = r["failed"][0]
            body.append(
                [
                    r["label"],
                    f"{r['ratio']:.0%}",
                    f"FAILED: {err.get('type')}: {str(err.get('message'))[:80]}",
                ]
                + [""] * (len(head) - 3)
            )
            continue
        p = _published_for(published, r)
        seeds = f" ({r['seeds']} seeds)" if r["seeds"] > 1 else ""
        failed = f" ({len(r['failed'])} failed)" if r["failed"] else ""
        body.append(
            [r["label"] + seeds + failed, _ratio_cell(r), f"{r['params']:,}"]
            + [_fmt(r["perplexity"].get(d)) + pub_cell(p, d) for d in datasets]
            + [_fmt(r["zeroshot"].get(t), 1) for t in tasks]
            + [_fmt(r.get("avg_acc"), 1) + pub_cell(p, "avg_acc")]
        )
    md = [f"**{title}**", ""] if title else []
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(b) + " |" for b in body
    ]
    md += ["", *legend(summary, published)]

    def tex(s: str) -> str:
        return (
            s.replace("\\", r"\textbackslash{}")
            .replace("%", r"\%")
            .replace("_", r"\_")
            .replace("±", r"$\pm$")
        )

    cols = "l" + "r" * (len(head) - 1)
    latex = [
        r"\begin{tabular}{" + cols + "}",
        r"\toprule",
        " & ".join(tex(h) for h in head) + r" \\",
        r"\midrule",
    ]
    latex += [" & ".join(tex(c) for c in b) + r" \\" for b in body]
    latex += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(md) + "\n", "\n".join(latex) + "\n"


def plot(summary: dict, out: Path) -> list[Path]:
    """Perplexity and average accuracy vs ratio, one line per configuration (PNG)."""
    rows = [r for r in summary["rows"] if "perplexity" in r]
    if len({r["ratio"] for r in rows}) < 2:
        return []
    from prunelab.plotting import pyplot, save_figure

    plt = pyplot()

    labels = list(dict.fromkeys(r["label"] for r in rows))
    dense = summary["dense"]
    written = []
    for metric, ylabel, fname in (
        ("ppl", "perplexity", "ppl_vs_ratio.png"),
        ("acc", "avg accuracy (%)", "acc_vs_ratio.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for lab in labels:
            pts = sorted((r["ratio"], r) for r in rows if r["label"] == lab)
            if metric == "ppl":
                ys = [next(iter(r["perplexity"].values()))[0] for _, r in pts]
            else:
                if not all("avg_acc" in r for _, r in pts):
                    continue
                ys = [r["avg_acc"][0] for _, r in pts]
            ax.plot([x for x, _ in pts], ys, marker="o", label=lab)
        if dense and metric == "ppl":
            ax.axhline(next(iter(dense["perplexity"].values())), color="k", linestyle=":", label="dense")
        ax.set_xlabel("ratio")
        ax.set_ylabel(ylabel + (f" ({next(iter(rows[0]['perplexity']))})" if metric == "ppl" else ""))
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        written.append(save_figure(fig, out / fname))
    return written


def aggregate(paths: list[str], out: Path, published: str | None = None, title: str = "") -> dict:
    jobs = collect(paths)
    pub = _published(published)
    summary = summarise(jobs, _metric_spec(jobs, pub))
    md, latex = render(summary, pub, title)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md)
    (out / "table.tex").write_text(latex)
    (out / "table.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plots = plot(summary, out)
    return {"summary": summary, "markdown": md, "latex": latex, "plots": [str(p) for p in plots]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run directories, sweep directories or globs")
    p.add_argument("--out", default="outputs/tables/latest", help="folder for table.{md,tex,json} and plots")
    p.add_argument("--published", default=None, help="a table of published.yaml shown beside the rows")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    res = aggregate(args.paths, Path(args.out), args.published, args.title)
    print(res["markdown"])
    failed = [f for r in res["summary"]["rows"] for f in r["failed"]]
    if failed:
        print(f"{len(failed)} failed job(s): " + ", ".join(f["run_dir"] for f in failed))


if __name__ == "__main__":
    main()
