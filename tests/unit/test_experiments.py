"""Experiment configs compose and validate (dry run, no download); the aggregation of a
fixture sweep gives the expected table."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
from prunelab.aggregate import aggregate, collect
from prunelab.paths import conf_dir
from prunelab.runner import validate

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def sweep_jobs(name: str) -> list[list[str]]:
    """The override lists of every job of ``prunelab -m experiment=<name>``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    if "optuna" in str(cfg.hydra.sweeper.get("_target_", "")):  # search spaces, not grids
        return [
            [f"{k}={v.split('(')[1].split(',')[0].strip()}"]
            for k, v in params.items()
            if v.startswith("choice(")
        ]
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [list(c) for c in itertools.product(*axes)]


TWINS = ("_embedded", "_smollm2")  # the embedded model, and the real model offline


def test_every_paper_table_has_an_embedded_twin():
    hub = [e for e in EXPERIMENTS if not e.endswith(TWINS) and not e.startswith("optuna_")]
    assert {e for e in EXPERIMENTS if e.startswith("optuna_")} == {"optuna_admm_rho", "optuna_loraprune_beta"}
    assert set(hub) >= {"llm_pruner_table1", "loraprune_table", "lorashear_table1", "admm_table", "atp_table"}
    assert all(f"{e}_embedded" in EXPERIMENTS for e in hub)
    assert {e for e in EXPERIMENTS if e.endswith("_smollm2")} == {f"{e}_smollm2" for e in hub}
    for e in EXPERIMENTS:  # each file is headed by the command that runs it
        lines = (conf_dir() / "experiment" / f"{e}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_" and lines[1].startswith(f"# prunelab -m experiment={e}")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_every_experiment_composes_and_validates(name):
    jobs = sweep_jobs(name)
    assert len(jobs) >= 1 if "optuna" in name else len(jobs) >= 2
    for overrides in jobs:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = compose(config_name="config", overrides=[f"experiment={name}", *overrides])
        method, _, plan = validate(cfg, with_plan=False)  # names, keys, data and eval: no download
        assert plan is None and method is not None
        if name.endswith("_smollm2"):  # the real model with its 2-core cut of the protocol
            assert cfg.model.name == "smollm2_135m" and cfg.eval.name == "smollm2"
        elif not name.endswith("_embedded") and not name.startswith("optuna_"):
            assert not str(cfg.model.path).startswith("embedded:")


def _job(root: Path, name: str, cfg: dict, results: dict | None = None, error: dict | None = None) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    if error is not None:
        (d / "error.json").write_text(json.dumps(error))


def _res(ppl: float, accs: tuple[float, float], ratio: float, params: int) -> dict:
    metrics = {
        "perplexity": {"embedded": ppl},
        "zeroshot": {"t1": {"acc": accs[0]}, "t2": {"acc": accs[1]}},
        "cost": {"parameters": params},
    }
    dense = {
        "perplexity": {"embedded": 50.0},
        "zeroshot": {"t1": {"acc": 0.6}, "t2": {"acc": 0.8}},
        "cost": {"parameters": 100},
    }
    return {
        "dense": dense,
        "pruned": metrics,
        "recovered": None,
        "ratio": {"achieved": ratio, "params_after": params},
    }


def test_aggregation_of_a_fixture_sweep(tmp_path):
    base = {"model": {"name": "m"}, "recovery": {"name": "none"}}
    for seed, ppl in ((0, 60.0), (1, 62.0)):
        _job(
            tmp_path,
            f"a{seed}",
            {**base, "ratio": 0.2, "seed": seed, "method": {"name": "llm_pruner", "importance": "element1"}},
            _res(ppl, (0.5, 0.7), 0.2, 80),
        )
    _job(
        tmp_path,
        "b",
        {**base, "ratio": 0.2, "seed": 0, "method": {"name": "llm_pruner", "importance": "l2"}},
        _res(90.0, (0.4, 0.6), 0.2, 80),
    )
    _job(
        tmp_path,
        "c",
        {**base, "ratio": 0.5, "seed": 0, "method": {"name": "llm_pruner", "importance": "element1"}},
        _res(100.0, (0.3, 0.5), 0.5, 50),
    )
    _job(
        tmp_path,
        "d",
        {**base, "ratio": 0.5, "seed": 0, "method": {"name": "llm_pruner", "importance": "l2"}},
        error={"type": "RuntimeError", "message": "boom"},
    )
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")

    res = aggregate([str(tmp_path)], tmp_path / "table")
    md = res["markdown"].splitlines()
    assert md[0] == "| method | ratio (achieved) | params | ppl embedded | t1 (acc) | t2 (acc) | avg |"
    assert md[2] == "| dense | 0 | 100 | 50.00 | 60.0 | 80.0 | 70.0 |"
    assert (
        md[3]
        == "| llm_pruner, importance=element1 (2 seeds) | 20% (20.00%) | 80 | 61.00 ± 1.41 | 50.0 | 70.0 | 60.0 |"
    )
    assert md[4] == "| llm_pruner, importance=l2 | 20% (20.00%) | 80 | 90.00 | 40.0 | 60.0 | 50.0 |"
    assert md[5] == "| llm_pruner, importance=element1 | 50% (50.00%) | 50 | 100.00 | 30.0 | 50.0 | 40.0 |"
    assert md[6].startswith("| llm_pruner, importance=l2 | 50% | FAILED: RuntimeError: boom |")
    assert md[7] == "" and md[8].startswith("Zero-shot columns: t1 acc, t2 acc; avg")
    assert len(md) == 10  # the unfinished job is not a row; two legend lines
    assert "\\toprule" in res["latex"] and "61.00 $\\pm$ 1.41" in res["latex"]
    assert sorted(Path(p).name for p in res["plots"]) == ["acc_vs_ratio.png", "ppl_vs_ratio.png"]
    assert {p.name for p in (tmp_path / "table").iterdir()} >= {"table.md", "table.tex", "table.json"}
    assert len(collect([str(tmp_path)])) == 5


def test_published_numbers_appear_beside_matching_rows(tmp_path):
    cfg = {
        "ratio": 0.2,
        "seed": 0,
        "model": {"name": "m"},
        "recovery": {"name": "none"},
        "method": {"name": "llm_pruner", "importance": "element1"},
    }
    cfg["ratio"] = 0.25  # the paper's code's per-layer ratio behind its "20%"
    _job(tmp_path, "a", cfg, _res(60.0, (0.5, 0.7), 0.2, 80))
    md = aggregate([str(tmp_path)], tmp_path / "t", published="llm_pruner_table1")["markdown"]
    assert "60.0 (paper 56.69)" in md and "70.0 (paper 63.25)" in md  # element1 no tuning; dense
    # this job ran with 0.25 of all parameters, not the paper's per-layer reading: said so
    assert "NOT LIKE WITH LIKE: the paper's ratio_convention is 'per_layer', these runs used 'params'" in md
    with pytest.raises(SystemExit, match=r"not in published\.yaml"):
        aggregate([str(tmp_path)], tmp_path / "t", published="nope")


def test_columns_report_each_papers_metric_and_the_ratio_convention(tmp_path):
    """--published llm_pruner_table1: hellaswag shows acc_norm, boolq acc (the paper's columns);
    the average is the mean of those; the ratio cell gives the per-layer and the all-parameter
    fractions; a protocol that matches the paper's raises no warning."""
    cfg = {
        "ratio": 0.25,
        "ratio_convention": "per_layer",
        "seed": 0,
        "model": {"name": "m"},
        "recovery": {"name": "none"},
        "method": {"name": "llm_pruner", "importance": "element1"},
        "eval": {"perplexity": {"seq_len": 128, "joiner": "\n\n"}, "zeroshot": {"metric": None}},
    }
    zs = {"boolq": {"acc": 0.60, "acc_norm": 0.10}, "hellaswag": {"acc": 0.30, "acc_norm": 0.50}}
    res = _res(20.0, (0.0, 0.0), 0.195, 80)
    res["pruned"]["zeroshot"] = zs
    res["dense"]["zeroshot"] = {
        "boolq": {"acc": 0.7, "acc_norm": 0.2},
        "hellaswag": {"acc": 0.4, "acc_norm": 0.6},
    }
    res["ratio"]["convention"] = {"convention": "per_layer", "achieved": 0.25}
    _job(tmp_path, "a", cfg, res)
    md = aggregate([str(tmp_path)], tmp_path / "t", published="llm_pruner_table1")["markdown"]
    lines = md.splitlines()
    assert (
        lines[0]
        == "| method | ratio (achieved) | params | ppl embedded | boolq (acc) | hellaswag (acc_norm) | avg |"
    )
    assert (
        "| llm_pruner | 25% per_layer (25.00%; 19.50% of all) | 80 | 20.00 | 60.0 | 50.0 | 55.0 (paper 56.69) |"
        in md
    )
    assert "| dense | 0 | 100 | 50.00 | 70.0 | 60.0 | 65.0 (paper 63.25) |" in md
    assert "NOT LIKE WITH LIKE" not in md
    # without --published: the runs' own eval.zeroshot.metric (null = acc everywhere)
    md = aggregate([str(tmp_path)], tmp_path / "t2")["markdown"]
    assert "| boolq (acc) | hellaswag (acc) | avg |" in md and "| 60.0 | 30.0 | 45.0 |" in md


def test_a_mixed_method_sweep_never_merges_configurations(tmp_path):
    """LLM-Pruner element1 and l2 beside Wanda (which has no `importance` key): three rows, not
    'llm_pruner (2 seeds)' averaging two estimators; seeds of one configuration still average."""
    base = {"model": {"name": "m"}, "recovery": {"name": "none"}, "ratio": 0.5}
    runs = [
        ("e1", {"name": "llm_pruner", "importance": "element1"}, 0, 60.0),
        ("e1s1", {"name": "llm_pruner", "importance": "element1"}, 1, 62.0),
        ("l2", {"name": "llm_pruner", "importance": "l2"}, 0, 900.0),
        ("wanda", {"name": "wanda", "sparsity_pattern": "unstructured"}, 0, 70.0),
    ]
    for name, method, seed, ppl in runs:
        _job(tmp_path, name, {**base, "seed": seed, "method": method}, _res(ppl, (0.5, 0.5), 0.5, 50))
    rows = {r["label"]: r for r in aggregate([str(tmp_path)], tmp_path / "t")["summary"]["rows"]}
    assert set(rows) == {"llm_pruner, importance=element1", "llm_pruner, importance=l2", "wanda"}
    assert rows["llm_pruner, importance=element1"]["seeds"] == 2
    assert rows["llm_pruner, importance=element1"]["perplexity"]["embedded"][0] == 61.0
    assert rows["llm_pruner, importance=l2"]["seeds"] == 1
    assert rows["llm_pruner, importance=l2"]["perplexity"]["embedded"][0] == 900.0


def test_jobs_of_different_eval_protocols_are_not_tabled_together(tmp_path):
    cfg = {"model": {"name": "m"}, "recovery": {"name": "none"}, "ratio": 0.5, "seed": 0}
    quick = {"perplexity": {"seq_len": 128, "max_windows": 32}}
    full = {"perplexity": {"seq_len": 128, "max_windows": None}}
    _job(tmp_path, "a", {**cfg, "method": {"name": "wanda"}, "eval": quick}, _res(70.0, (0.5, 0.5), 0.5, 50))
    _job(
        tmp_path, "b", {**cfg, "method": {"name": "sparsegpt"}, "eval": full}, _res(65.0, (0.5, 0.5), 0.5, 50)
    )
    with pytest.raises(
        SystemExit, match=r"2 different eval configs \(they differ in eval\.perplexity\.max_windows\)"
    ):
        aggregate([str(tmp_path)], tmp_path / "t")
