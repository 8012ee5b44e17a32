"""The benchmark's pieces on tiny in-memory models: floors, interleaved speed, tables, README."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunelab import bench
from prunelab.errors import ConfigError
from prunelab.evaluation.cost import compare_speed
from prunelab.structure import apply_masks, arch_info, prune_physically
from tests.conftest import make_model


def _row(method="structured", ratio=0.5, **kw):
    row = {
        "spec": {"model": "m", "seq_len": 8, "batch_size": 1, "decode_tokens": 2, "repeats": 1},
        "method": method,
        "ratio": ratio,
        "sparse": False,
        "pattern": "structured",
        "floor": "forward",
        "calibration": [4, 16],
        "prune_s": 0.5,
        "floor_s": 0.25,
        "cost_x_floor": 2.0,
        "peak_rss_mb": 500.0,
        "peak_rss_over_start_mb": 10.0,
        "params_ratio": 0.5,
        "macs_ratio": 0.48,
        "prefill_speedup": 1.9,
        "decode_speedup": 1.2,
        "dense": {"prefill_tokens_per_s": 100.0, "decode_ms_per_token": 3.0},
        "pruned": {"prefill_tokens_per_s": 190.0, "decode_ms_per_token": 2.5},
    }
    row.update(kw)
    return row


ENV = {"device": "cpu", "cpu": "x", "torch_threads": 2, "torch": "2"}
SETTINGS = {"model": "m", "seq_len": 8, "batch_size": 1, "decode_tokens": 2, "repeats": 1}


def test_floors_time_a_forward_and_a_backward_and_leave_no_gradients():
    model = make_model("llama", 2, layers=2)
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = bench.floors(model, calib, 4, bench.PeakMemory(torch.device("cpu")))
    assert out["floor_forward_s"] > 0 and out["floor_forward_backward_s"] > 0
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_peak_memory_sees_an_allocation_after_a_reset():
    mem = bench.PeakMemory(torch.device("cpu"))
    mem.reset()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    x += 1
    got = mem.read()
    del x
    if not mem.resettable:  # no /proc/self/clear_refs (macOS): the lifetime peak is all there is
        pytest.skip("peak RSS cannot be reset on this platform")
    assert got["peak_rss_over_start_mb"] >= 48


def test_compare_speed_reports_both_models_and_pruning_speeds_up_prefill():
    dense = make_model("llama", 4, heads=4, layers=2, hidden=256, inter=1024)
    pruned = copy.deepcopy(dense)
    arch = arch_info(pruned.config)
    masks = {}
    for i in range(2):  # drop 3 of 4 heads and 3/4 of the MLP channels of every layer
        masks[f"{i}.attn"] = torch.tensor([True, False, False, False])
        masks[f"{i}.mlp"] = torch.arange(1024) < 256
    apply_masks(pruned, masks, arch)
    prune_physically(pruned, masks)
    out = compare_speed(
        {"dense": dense, "pruned": pruned}, seq_len=64, batch_size=4, decode_tokens=2, repeats=3
    )
    assert set(out) == {"dense", "pruned"}
    for v in out.values():
        assert v["prefill_tokens_per_s"] > 0 and v["decode_ms_per_token"] > 0
    # ~1/4 of the decoder MACs: a clear margin even on a busy machine
    assert out["pruned"]["prefill_tokens_per_s"] > out["dense"]["prefill_tokens_per_s"]


def test_markdown_table_rows_passes_and_failures():
    rows = [
        _row(),
        _row(
            "loraprune",
            floor="forward+backward",
            cost_x_floor=150.0,
            calibration_passes=150.0,
            cost_x_floor_per_pass=1.0,
        ),
        _row("wanda", sparse=True, pattern="unstructured", overrides=["method.batch_size=4"]),
        {"method": "admm", "ratio": 0.5, "error": "ConfigError: bad"},
        _row("sparsegpt", sparse=True, pattern="2:4", peak_gpu_mb=900.0, peak_gpu_over_start_mb=120.0),
    ]
    rows[0]["dense"]["prefill_spread"], rows[0]["pruned"]["prefill_spread"] = 0.12, 0.31
    rows[1]["dense"]["prefill_spread"], rows[1]["pruned"]["prefill_spread"] = 0.2, 0.1
    md = bench.markdown(rows, ENV, SETTINGS)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 5  # header + one line per row
    assert {line.count("|") for line in lines} == {15}  # every row as wide as the header
    # spread: the larger of dense and pruned, flagged above NOISY_SPREAD; "–" where not recorded
    assert lines[1].endswith("| 0.31 ⚠ |") and lines[2].endswith("| 0.20 |")
    assert lines[3].endswith("| – |")
    assert "| GPU 900 (+120) |" in md and "| 500 (+10) |" in md  # GPU peak where measured, else RSS
    assert "**1.90×**" in md and "150.0 = 150 passes × 1.00" in md
    assert "wanda (unstructured) `method.batch_size=4`" in md
    assert "FAILED: ConfigError: bad" in md
    # methods in the bench's order: structured before loraprune before wanda
    assert md.index("| structured") < md.index("| loraprune") < md.index("| wanda")


def test_write_readme_replaces_only_its_section(tmp_path):
    readme = tmp_path / "README.md"
    start, end = bench.README_START.format(model="m"), bench.README_END.format(model="m")
    readme.write_text(f"# top\n{start}\nold table\n{end}\n## after\n")
    bench.write_readme(readme, "m", "| new |\n")
    assert readme.read_text() == f"# top\n{start}\n| new |\n{end}\n## after\n"
    with pytest.raises(SystemExit, match="no section for other"):
        bench.write_readme(readme, "other", "x")


def test_bench_refuses_an_unknown_method_before_running_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--methods", "nope", "--out", str(tmp_path)])
    assert "'nope' is not a method config; allowed:" in capsys.readouterr().err
    assert not (tmp_path / "tiny_llama").exists()


def test_table_only_rebuilds_the_readme_from_finished_jobs_and_runs_none(tmp_path, capsys):
    settings = {"model": "tiny_llama", "seq_len": 256, "batch_size": 4, "decode_tokens": 32, "repeats": 5}
    jobs = tmp_path / "tiny_llama" / "jobs"
    jobs.mkdir(parents=True)
    done = _row("wanda", spec={**settings, "threads": 1}, sparse=True, pattern="unstructured")
    (jobs / "wanda-0.5-x.json").write_text(json.dumps(done))
    other = _row("magnitude", spec={**settings, "seq_len": 64, "threads": 1})  # other settings
    (jobs / "magnitude-0.5-y.json").write_text(json.dumps(other))
    readme = tmp_path / "perf.md"
    start, end = bench.README_START.format(model="tiny_llama"), bench.README_END.format(model="tiny_llama")
    readme.write_text(f"{start}\nold\n{end}\n")
    # every method at 50% is missing: a run without --table-only would start all of them
    args = ["--threads", "1", "--out", str(tmp_path), "--readme", str(readme), "--table-only"]
    assert bench.main(args) == 0
    assert sorted(f.name for f in jobs.iterdir()) == ["magnitude-0.5-y.json", "wanda-0.5-x.json"]
    assert "[bench] wanda ratio=0.5 ..." not in capsys.readouterr().out
    table = readme.read_text()
    assert "| wanda (unstructured) | 0.5 |" in table and "| magnitude" not in table
    with pytest.raises(SystemExit, match="--table-only: no finished job of tiny_llama"):
        bench.main(["--threads", "2", "--out", str(tmp_path), "--table-only"])


def test_plot_writes_a_png(tmp_path):
    rows = [_row(ratio=0.2, prefill_speedup=1.2), _row(ratio=0.5)]
    assert bench.plot(rows, tmp_path / "s.png", "m").stat().st_size > 0
    json.dumps(rows)  # rows are what bench.json holds


def test_synthetic_model_is_built_once_and_loads_through_the_model_config(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from prunelab.models import synthetic
    from prunelab.models.loading import check_model_config, load_model

    monkeypatch.setenv("PRUNELAB_SYNTHETIC_DIR", str(tmp_path))
    monkeypatch.setitem(
        synthetic.SPECS, "llama_tiny", synthetic.SyntheticSpec(64, 2, 4, 2, 128, vocab_size=4096)
    )
    cfg = OmegaConf.create(
        {
            "name": "t",
            "path": "synthetic:llama_tiny",
            "revision": None,
            "dtype": "float32",
            "attn_implementation": "sdpa",
            "trust_remote_code": False,
        }
    )
    check_model_config(cfg)  # names are checked without building anything
    assert not (tmp_path / "llama_tiny").exists()
    model, tok = load_model(cfg)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 4096
    assert (
        sum(p.numel() for p in model.parameters())
        == 4096 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    )  # tied embedding, GQA k/v, MLP, two norms per layer, final norm
    ids = tok("def f(): return 1", return_tensors="pt").input_ids
    assert int(ids.max()) < 4096 and torch.isfinite(model(input_ids=ids).logits).all()
    stamp = (tmp_path / "llama_tiny" / "model.safetensors").stat().st_mtime_ns
    load_model(cfg)
    assert (tmp_path / "llama_tiny" / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    bad = OmegaConf.merge(cfg, {"path": "synthetic:nope"})
    with pytest.raises(ConfigError, match=r"model\.path='synthetic:nope'.*allowed"):
        check_model_config(bad)


def test_cost_says_where_and_when_speed_was_measured():
    from prunelab.evaluation.cost import measure_cost
    from tests.conftest import make_model

    out = measure_cost(make_model(), seq_len=8, decode_tokens=2, repeats=1, vocab=128)
    assert out["measured_on"].startswith("cpu ") and out["measured_on"].endswith(" threads")
    assert len(out["measured_at"]) == 19 and out["measured_at"][4] == "-"
