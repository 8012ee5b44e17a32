"""End to end on the embedded model: the default run, resume after a kill, a multirun."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunelab.models.embedded import asset_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (asset_dir("tiny_llama") / "model.safetensors").exists(), reason="embedded weights not built"
    ),
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
FAST_EVAL = ["eval.zeroshot.num_examples=40", "eval.cost.repeats=1", "eval.cost.decode_tokens=4"]
FAST_RECOVERY = ["recovery.max_steps=20", "recovery.val_size=40", "recovery.eval_every=10"]


def prunelab(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prunelab.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def sweep(tmp_path: Path, *overrides: str) -> list[dict]:
    """``prunelab -m <overrides>`` (quick eval, no W&B) in tmp_path; every job's results.json."""
    p = prunelab("-m", *overrides, "eval=quick", "logger=none", f"output_root={tmp_path}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/results.json")]


def one_run(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    """``prunelab <overrides>`` (quick eval, W&B offline) in tmp_path; (run dir, results.json)."""
    p = prunelab(*overrides, "eval=quick", f"output_root={tmp_path}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_default_run_end_to_end(tmp_path):
    p = prunelab("logger=none", f"output_root={tmp_path}", *FAST_EVAL, *FAST_RECOVERY, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    r = json.loads((run_dir / "results.json").read_text())
    assert r["config"]["method"]["name"] == "llm_pruner" and r["config"]["ratio"] == 0.2
    assert (
        r["config"]["method"]["importance"] == "element1"
        and r["config"]["recovery"]["name"] == "lora_embedded"
    )
    assert abs(r["ratio"]["achieved"] - 0.2) <= 0.01 * 0.2
    dense, pruned, recovered = r["dense"], r["pruned"], r["recovered"]
    assert math.isfinite(pruned["perplexity"]["embedded"]) and math.isfinite(
        recovered["perplexity"]["embedded"]
    )
    assert pruned["perplexity"]["embedded"] > dense["perplexity"]["embedded"]
    assert recovered["cost"]["parameters"] == pruned["cost"]["parameters"]  # LoRA merged back, no growth
    assert r["recovery"]["steps"] == 20 and r["recovery"]["merge_max_abs_diff"] <= 1e-4
    for res in (dense, pruned, recovered):
        assert set(res["zeroshot"]) >= {"prunelab_ending", "prunelab_cloze", "prunelab_order"}
        assert 0 <= res["zeroshot"]["prunelab_order"]["acc"] <= 1
        assert res["cost"]["parameters"] > 0 and res["cost"]["macs"] > 0
    assert pruned["cost"]["parameters"] == r["ratio"]["params_after"] < dense["cost"]["parameters"]
    assert pruned["cost"]["macs"] < dense["cost"]["macs"]
    assert {"prune", "eval", "recover", "eval_recovered", "total"} <= set(r["timings_s"])
    # the saved model is safetensors + config, loadable in one call
    from prunelab.models.loading import load_pretrained

    model = load_pretrained(r["model_dir"])
    assert sum(p.numel() for p in model.parameters()) == r["ratio"]["params_after"]


def test_kill_mid_stage_then_rerun_resumes(tmp_path):
    args = ["logger=none", f"output_root={tmp_path}", "ratio=0.3", "recovery=none", *FAST_EVAL]
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunelab.cli", *args],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # the run dir is named by the overrides that change results (logger, output_root excluded)
    run_dir = tmp_path / "runs" / ",".join(sorted(["ratio=0.3", "recovery=none", *FAST_EVAL]))
    deadline = time.time() + 300
    while not (run_dir / "stages" / "prune.json").exists():
        assert proc.poll() is None, "run ended before the prune stage finished"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through the evaluation stage
    proc.wait()
    assert not (run_dir / "results.json").exists() and not (run_dir / "stages" / "eval.json").exists()
    weights = run_dir / "pruned" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    p = prunelab(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((run_dir / "results.json").read_text())
    assert "prune" in r["resumed_stages"] and "eval" not in r["resumed_stages"]
    assert weights.stat().st_mtime_ns == mtime  # not pruned again
    # a third run resumes everything
    p = prunelab(*args, cwd=tmp_path)
    assert p.returncode == 0
    r = json.loads((run_dir / "results.json").read_text())
    assert {"dense_eval", "prune", "eval"} <= set(r["resumed_stages"])


def test_multirun_importances_by_ratio_one_wandb_group(tmp_path):
    importances = ["element1", "element2", "vector", "l2", "random"]
    p = prunelab(
        "-m",
        f"method.importance={','.join(importances)}",
        "ratio=0.2,0.5",
        "recovery=none",
        "eval=quick",
        "logger=wandb",
        f"output_root={tmp_path}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(d for d in (tmp_path / "runs").iterdir() if (d / "results.json").exists())
    assert len(runs) == 10
    results = [json.loads((d / "results.json").read_text()) for d in runs]
    assert {(r["config"]["method"]["importance"], r["config"]["ratio"]) for r in results} == {
        (i, r) for i in importances for r in (0.2, 0.5)
    }
    assert all(math.isfinite(r["pruned"]["perplexity"]["embedded"]) for r in results)
    # one W&B run per job, all in one group named by the swept keys
    (group,) = {r["tracking"]["group"] for r in results}
    assert group.startswith("sweep:method.importance,ratio@")  # + a hash of the fixed overrides
    assert len({r["tracking"]["run_id"] for r in results}) == 10
    for d, r in zip(runs, results, strict=True):
        assert list((d / "wandb").glob("offline-run-*"))
        assert f"ratio:{r['config']['ratio']}" in r["tracking"]["tags"]


def test_multirun_ratio_by_importance_magnitude_random(tmp_path):
    """The foundation's sweep, verbatim: magnitude (= l1) and random scores at 20% and 50%."""
    results = sweep(tmp_path, "ratio=0.2,0.5", "method.importance=random,magnitude", "recovery=none")
    assert len(results) == 4
    ppl = {
        (r["config"]["method"]["importance"], r["config"]["ratio"]): r["pruned"]["perplexity"]["embedded"]
        for r in results
    }
    dense = results[0]["dense"]["perplexity"]["embedded"]
    assert all(math.isfinite(v) and v > dense for v in ppl.values())
    assert ppl[("random", 0.5)] > ppl[("random", 0.2)] and ppl[("magnitude", 0.5)] > ppl[("magnitude", 0.2)]


def test_multirun_layerwise_methods_by_pattern(tmp_path):
    """Issue 4's sweep: the four layer-wise methods × unstructured / 2:4 at 50% sparsity."""
    methods = ["admm", "sparsegpt", "wanda", "magnitude"]
    results = sweep(
        tmp_path,
        f"method={','.join(methods)}",
        "method.sparsity_pattern=unstructured,2:4",
        "ratio=0.5",
        "method.calibration_samples=32",
        "recovery=none",
    )
    assert len(results) == 8
    assert any(":" in r["run_dir"] and "\\" not in r["run_dir"] for r in results)  # 2:4, unescaped
    dense = results[0]["dense"]["perplexity"]["embedded"]
    for r in results:
        assert r["ratio"]["achieved"] == 0.5 and r["ratio"]["params_after"] == r["ratio"]["params_before"]
        assert 0.3 < r["ratio"]["zero_fraction_of_all_params"] < 0.5  # embeddings and norms stay dense
        assert r["sparsity"]["pattern"] == r["config"]["method"]["sparsity_pattern"]
        assert all(v["sparsity"] == 0.5 for v in r["sparsity"]["per_layer"].values())
        assert r["timings_s"]["prune_method"] > 0
        assert (
            math.isfinite(r["pruned"]["perplexity"]["embedded"])
            and r["pruned"]["perplexity"]["embedded"] > dense
        )
    # the saved checkpoint is the sparse model and loads with plain from_pretrained
    from transformers import AutoModelForCausalLM

    r = next(r for r in results if r["config"]["method"]["name"] == "admm")
    model = AutoModelForCausalLM.from_pretrained(r["model_dir"])
    w = model.model.layers[3].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == 0.5


def test_layerwise_with_lora_recovery_stays_sparse(tmp_path):
    p = prunelab(
        "method=wanda",
        "method.sparsity_pattern=2:4",
        "ratio=0.5",
        "method.calibration_samples=16",
        "eval=quick",
        *FAST_RECOVERY,
        "logger=none",
        f"output_root={tmp_path}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/results.json")]
    assert r["sparsity"]["after_recovery"]["achieved"] == 0.5
    assert r["recovery"]["remask"]["weights_zeroed"] > 0
    assert math.isfinite(r["recovered"]["perplexity"]["embedded"])


def test_multirun_loraprune_importances(tmp_path):
    """Issue 5's sweep: LoRAPrune's estimator ablation as one multirun (short training)."""
    results = sweep(
        tmp_path,
        "method=loraprune",
        "method.importance=lora_grad,taylor,magnitude",
        "ratio=0.5",
        "method.train.max_steps=20",
        "method.train.eval_every=10",
        "method.train.val_size=20",
        "method.prune_freq=2",
    )
    assert {r["config"]["method"]["importance"] for r in results} == {"lora_grad", "taylor", "magnitude"}
    for r in results:
        assert abs(r["ratio"]["achieved"] - 0.5) <= 0.01 * 0.5
        assert r["recovered"] is None and "skipped" in r["recovery_skipped"]
        steps = r["training"]["prune_steps"]
        assert steps[-1]["fraction"] == 1.0 and r["training"]["history"]["steps"] == 20
        assert math.isfinite(r["pruned"]["perplexity"]["embedded"])


LS_FAST = [
    "method=lorashear",
    "ratio=0.2",
    "method.knowledge.tokens=1024",
    "method.lhspg.warmup_steps=2",
    "method.lhspg.periods=2",
    "method.lhspg.period_steps=3",
    "method.train.val_size=20",
    "method.train.eval_every=4",
    "method.recovery.stages.0.max_steps=4",
    "method.recovery.stages.1.max_steps=2",
    "method.recovery.lora.eval_every=2",
    "method.recovery.lora.val_size=8",
]


def test_lorashear_run_plot_in_run_dir_and_wandb(tmp_path):
    """Issue 6: `prunelab method=lorashear ratio=0.2` (short schedule), W&B offline."""
    run_dir, r = one_run(tmp_path, *LS_FAST)
    assert abs(r["ratio"]["achieved"] - 0.2) <= 0.01 * 0.2
    t = r["training"]
    assert t["parts"] == dict.fromkeys(
        ("lora_aware_groups", "knowledge_analysis", "lhspg", "dynamic_recovery"), True
    )
    assert t["redundant_max_norm_after_merge"] == 0.0 and len(t["knowledge"]["unprunable"]) == 4
    assert r["plan"]["remove"] == t["plan"]["remove"]  # the re-planned counts are the ones recorded
    assert all(r["plan"]["remove"].get(k, 0) == 0 for k in t["knowledge"]["unprunable"])
    assert (run_dir / "knowledge_distribution.png").exists()
    assert list(run_dir.glob("wandb/*/files/media/images/lorashear/knowledge_distribution*.png"))
    assert "own recovery" in r["recovery_skipped"]
    stages = r["recovery"]["stages"]
    assert [s["name"] for s in stages] == ["text", "instruction"] and [s["steps_run"] for s in stages] == [
        4,
        2,
    ]
    assert math.isfinite(r["recovered"]["perplexity"]["embedded"])
    from prunelab.models.loading import load_pretrained

    assert sum(p.numel() for p in load_pretrained(r["model_dir"]).parameters()) == r["ratio"]["params_after"]


def test_lorashear_ablation_multirun(tmp_path):
    """Each part switched off by config, one job per switch."""
    results = sweep(
        tmp_path,
        *LS_FAST,
        "method.recovery.enabled=false",
        "method.lora_aware=true,false",
    )
    by = {r["config"]["method"]["lora_aware"]: r for r in results}
    assert set(by) == {True, False}
    assert by[True]["training"]["redundant_max_norm_after_merge"] == 0.0
    assert by[False]["training"]["redundant_max_norm_after_merge"] > 0  # the merge refilled them
    for r in results:
        assert r["recovered"] is None and abs(r["ratio"]["achieved"] - 0.2) <= 0.01 * 0.2


def test_atp_domain_run_logs_and_plots_decisions(tmp_path):
    """Issue 7: `prunelab method=atp ratio=0.4 data=embedded_domain` (short), W&B offline."""
    atp = ["method=atp", "ratio=0.4", "data=embedded_domain", "method.freeze_patience=3"]
    train = ["method.train.max_steps=24", "method.train.eval_every=12", "method.train.val_size=16"]
    run_dir, r = one_run(tmp_path, *atp, *train)
    assert abs(r["ratio"]["achieved"] - 0.4) <= 0.01 * 0.4
    assert r["plan"]["remove"] == r["training"]["plan"]["remove"]  # ATP's own allocation is recorded
    assert set(r["pruned"]["perplexity"]) == {"embedded", "embedded_domain"}  # general and in-domain
    assert r["recovered"] is None and "skipped" in r["recovery_skipped"]
    t = r["training"]
    assert t["frozen_at"] is not None and t["removal_max_abs_logit_change"] < 1e-2
    assert t["history"]["config"]["data"] == "embedded_domain"  # tuned on the domain
    assert (run_dir / "atp_decisions.png").exists() and json.loads(
        (run_dir / "atp_decisions.json").read_text()
    )
    assert list(run_dir.glob("wandb/*/files/media/images/atp/decisions*.png"))


def test_multirun_with_a_failing_job_completes_the_others(tmp_path):
    """Issue 8: one job fails (an impossible ratio), the others finish, the aggregate marks it."""
    p = prunelab(
        "-m",
        "method=structured",
        "recovery=none",
        "ratio=0.2,0.97,0.5",
        "eval=quick",
        "logger=none",
        f"output_root={tmp_path}",
        cwd=tmp_path,
    )
    assert p.returncode == 1  # the sweep as a whole failed ...
    runs = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    ok = [d for d in runs if (d / "results.json").exists()]
    failed = [d for d in runs if (d / "error.json").exists()]
    assert len(ok) == 2 and len(failed) == 1 and "ratio=0.97" in failed[0].name  # ... the others ran
    err = json.loads((failed[0] / "error.json").read_text())
    assert err["type"] == "ConfigError" and "ratio=0.97" in err["message"]
    from prunelab.aggregate import aggregate

    md = aggregate([str(tmp_path / "runs")], tmp_path / "table")["markdown"]
    assert "FAILED: ConfigError" in md and md.count("| structured") == 3


def test_interrupted_multirun_rerun_skips_finished_jobs(tmp_path):
    args = ["-m", "method=structured", "recovery=none", "ratio=0.2,0.5", "eval=quick", "logger=none"]
    args.append(f"output_root={tmp_path}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunelab.cli", *args],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("*ratio=0.2*/results.json")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the first job done, the second under way
    proc.wait()
    (first,) = (tmp_path / "runs").glob("*ratio=0.2*")
    weights = first / "pruned" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    p = prunelab(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r1 = json.loads((first / "results.json").read_text())
    assert {"prune", "eval"} <= set(r1["resumed_stages"]) and weights.stat().st_mtime_ns == mtime
    (second,) = (tmp_path / "runs").glob("*ratio=0.5*")
    assert (second / "results.json").exists()


@pytest.mark.parametrize(
    "launcher",
    [["hydra/launcher=local_parallel"], ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]],
)
def test_multirun_through_the_joblib_and_submitit_launchers(tmp_path, launcher):
    """Issue 8: the local variants of the parallel / cluster launchers run a two-job sweep."""
    results = sweep(tmp_path, *launcher, "method=structured", "recovery=none", "ratio=0.2,0.5")
    assert sorted(r["config"]["ratio"] for r in results) == [0.2, 0.5]
    assert all(math.isfinite(r["pruned"]["perplexity"]["embedded"]) for r in results)


def test_optuna_sweep_minimises_the_returned_perplexity(tmp_path):
    p = prunelab(
        "-m",
        "experiment=optuna_admm_rho",
        "hydra.sweeper.n_trials=2",
        "eval=quick",
        "logger=none",
        f"output_root={tmp_path}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    runs = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/results.json")]
    assert len(runs) == 2 and len({r["config"]["method"]["rho"] for r in runs}) == 2
    # one group for the search, named by the searched keys
    assert {r["tracking"]["group"] for r in runs} == {runs[0]["tracking"]["group"]}
    assert runs[0]["tracking"]["group"].startswith("sweep:method.iterations,method.rho@")
    best = min(r["pruned"]["perplexity"]["embedded"] for r in runs)
    assert f"Best value: {best}" in p.stdout + p.stderr


def test_bench_command_writes_table_json_and_readme_section(tmp_path):
    """Issue 9: one command benchmarks methods on the embedded model and fills the README."""
    from prunelab.bench import README_END, README_START

    readme = tmp_path / "README.md"
    readme.write_text(
        f"x\n{README_START.format(model='tiny_llama')}\n{README_END.format(model='tiny_llama')}\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "prunelab.bench",
        "--methods",
        "structured",
        "wanda",
        "--ratios",
        "0.2",
        "0.5",
    ]
    cmd += ["--repeats", "1", "--seq-len", "32", "--batch-size", "1", "--decode-tokens", "2"]
    cmd += ["--out", str(tmp_path / "bench"), "--readme", str(readme)]
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    root = tmp_path / "bench" / "tiny_llama"
    rows = json.loads((root / "bench.json").read_text())["rows"]
    assert sorted((r["method"], r["ratio"]) for r in rows) == [
        ("structured", 0.2),
        ("structured", 0.5),
        ("wanda", 0.2),
        ("wanda", 0.5),
    ]
    for r in rows:
        assert r["prune_s"] > 0 and r["floor_s"] > 0 and r["peak_rss_mb"] > 0
        if r["method"] == "structured":  # the ratio is of all parameters
            assert abs(r["params_ratio"] - (1 - r["ratio"])) <= 0.01 * r["ratio"]
            assert r["macs_ratio"] < 1
        else:  # sparse: shapes (and parameter counts) unchanged
            assert r["params_ratio"] == 1.0 and r["calibration_used"] and r["floor"] == "forward"
    assert (root / "speedup_vs_ratio.png").stat().st_size > 0
    table = (root / "bench.md").read_text()
    assert table in readme.read_text() and "| wanda (unstructured) | 0.5 |" in table
    # a rerun reuses every finished job
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count("finished earlier") == 4
