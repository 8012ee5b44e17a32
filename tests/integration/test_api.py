"""The Python API on the embedded model: the README's example runs, and ``prunelab.prune`` on an
in-memory model gives exactly the CLI's masks and metrics for every method."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import prunelab
from prunelab.methods import base_method_configs
from prunelab.models.embedded import asset_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (asset_dir("tiny_llama") / "model.safetensors").exists(), reason="embedded weights not built"
    ),
]
README = Path(__file__).resolve().parents[2] / "README.md"


def base_methods() -> list[str]:
    """Every method of its own (budget variants excluded), derived from conf/method."""
    return base_method_configs()


def test_base_methods_cover_every_method_class():
    """Each method class (``_target_``) has a base config in the parity table below."""
    targets = {}
    for name in prunelab.options_of("method"):
        cfg = prunelab.compose([f"method={name}"])
        targets.setdefault(cfg.method._target_, []).append(name)
    bases = set(base_methods())
    assert all(bases & set(names) for names in targets.values()), targets
    assert len(bases) == 9  # structured, llm_pruner, loraprune, lorashear, atp + 4 layer-wise


def readme_python_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- python-example start -->\s*```python\n(.*?)```", text, flags=re.S)
    assert m, "README lost its Python example (between python-example markers)"
    return m.group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = readme_python_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 6  # "a five-line example"
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert "achieved" in out or re.search(r"0\.19\d+", out), out
    assert abs(scope["result"].ratio["achieved"] - 0.2) <= 0.01 * 0.2


def _data(method: str) -> list[str]:
    return ["data=embedded_domain"] if method == "atp" else []  # its domain, as documented


@pytest.mark.parametrize("method", base_methods())
def test_prune_in_memory_matches_cli(method, tmp_path):
    """Same config through ``prunelab.run`` (the CLI's recipe, model loaded from its config) and
    through ``prunelab.prune`` + ``prunelab.evaluate`` on a model already in memory."""
    overrides = ["debug=fast", *_data(method)]
    cli = prunelab.run(
        [f"method={method}", "recovery=none", "logger=none", f"output_root={tmp_path / 'cli'}", *overrides]
    )
    model, tok = prunelab.load_model("tiny_llama")
    data = "embedded_domain" if method == "atp" else None
    result = prunelab.prune(
        model, tok, method=method, ratio=0.2, data=data, overrides=["debug=fast"], output_dir=tmp_path / "api"
    )
    assert result.model is model  # in place
    expected = cli.masks()
    assert sorted(result.masks) == sorted(expected)
    for key, keep in expected.items():
        assert torch.equal(result.masks[key].bool().cpu(), keep), key
    assert result.ratio == pytest.approx(cli.ratio)
    assert result.layer_shapes == cli.results["layer_shapes"]
    metrics = prunelab.evaluate(model, tok, eval="embedded", data=data, overrides=["debug=fast"])
    assert metrics["perplexity"] == cli.metrics["pruned"]["perplexity"]  # exactly: same weights
    if method in ("loraprune", "lorashear", "atp"):
        assert result.training is not None and cli.results["training"] is not None


def test_api_recover_lowers_loss_and_keeps_sparsity(tmp_path):
    model, tok = prunelab.load_model("tiny_llama")
    pruned = prunelab.prune(model, tok, method="wanda", ratio=0.5, overrides=["debug=fast"])
    before = prunelab.evaluate(model, tok, overrides=["debug=fast"])["perplexity"]["embedded"]
    rec = prunelab.recover(model, tok, masks=pruned.masks, overrides=["debug=fast"], max_steps=10)
    after = prunelab.evaluate(model, tok, overrides=["debug=fast"])["perplexity"]["embedded"]
    assert rec.model is model and rec.history is not None
    assert after < before  # 10 LoRA steps on the corpus lower its perplexity after 50% Wanda
    for name, keep in pruned.masks.items():
        w = model.get_parameter(name)
        assert torch.count_nonzero(w[~keep.to(w.device)]) == 0, name  # zeros stay zero


def test_api_refuses_bad_input_with_the_cli_messages():
    model, tok = prunelab.load_model("tiny_llama")
    with pytest.raises(prunelab.ConfigError, match=r"method='wandaa' is not allowed; did you mean 'wanda'"):
        prunelab.prune(model, tok, method="wandaa")
    with pytest.raises(
        prunelab.ConfigError, match=r"method\.sparsity is not a key of method=wanda; allowed:"
    ):
        prunelab.prune(model, tok, method="wanda", sparsity=0.5)
    with pytest.raises(prunelab.ConfigError, match=r"ratio=1\.5 is outside the allowed range"):
        prunelab.prune(model, tok, ratio=1.5)
    with pytest.raises(prunelab.ConfigError, match=r"method\.importance='taylor' is not allowed"):
        prunelab.prune(model, tok, importance="taylor")
    with pytest.raises(prunelab.ConfigError, match=r"eval\.windows is not a key of eval=quick"):
        prunelab.evaluate(model, tok, eval="quick", windows=3)
    with pytest.raises(prunelab.ConfigError, match=r"calibration: token ids of shape"):
        prunelab.prune(model, tok, method="wanda", calibration=torch.zeros(4))
    # nothing was pruned by the refused calls
    assert sum(p.numel() for p in model.parameters()) == 1968256


def test_prune_with_token_calibration_is_used_as_given():
    """calibration= token ids: the method sees exactly those — the masks equal the library's
    own method call with that tensor in its context (and differ for other ids)."""
    from prunelab.methods import PruneContext, build_method
    from prunelab.runner import make_plan
    from prunelab.structure import arch_info

    a, _ = prunelab.load_model("tiny_llama")
    b, _ = prunelab.load_model("tiny_llama")
    c, _ = prunelab.load_model("tiny_llama")
    ids = torch.randint(0, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    ra = prunelab.prune(a, method="wanda", ratio=0.5, calibration=ids)
    method = build_method(prunelab.compose(["method=wanda"]).method)
    plan = make_plan(method, arch_info(b.config), 0.5)
    direct = method.prune(b, plan, PruneContext(None, ids, 0))
    assert all(torch.equal(ra.masks[k], direct[k]) for k in direct)
    rc = prunelab.prune(c, method="wanda", ratio=0.5, calibration=ids[:, :32].flip(0))
    assert any(not torch.equal(ra.masks[k], rc.masks[k]) for k in ra.masks)


def test_run_from_python_resumes_like_the_cli(tmp_path):
    overrides = ["method=magnitude", "debug=fast", "recovery=none", "logger=none", f"output_root={tmp_path}"]
    first = prunelab.run(overrides)
    again = prunelab.run(overrides)
    assert first.run_dir == again.run_dir
    assert first.run_dir.name == "debug=fast,method=magnitude,recovery=none"  # the CLI's dir name
    assert set(again.results["resumed_stages"]) >= {"prune", "eval"}
    assert again.metrics["pruned"] == first.metrics["pruned"]
    assert prunelab.run([*overrides, "dry_run=true"]) is None


def test_wandb_gets_summary_and_plan_tables_and_the_model_artifact(tmp_path, monkeypatch):
    """A real offline W&B run: the dense → pruned summary and the per-layer plan as tables,
    the final model as an artifact when logger.log_model=true."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    res = prunelab.run(
        [
            "method=wanda",
            "ratio=0.5",
            "debug=fast",
            "recovery=none",
            "logger.log_model=true",
            f"output_root={tmp_path}",
        ]
    )
    (log,) = res.run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = log.read_bytes()
    for needle in (b"summary.table", b"plan.table", b"model.safetensors"):
        assert needle in data, needle
    assert res.results["tracking"]["run_id"]


def python_blocks() -> list[tuple[str, str]]:
    out = []
    for doc in [README, *sorted((README.parent / "docs").rglob("*.md"))]:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)):
            out.append((f"{doc.relative_to(README.parent)}#{i}", code))
    return out


@pytest.mark.parametrize("where,code", python_blocks(), ids=[w for w, _ in python_blocks()])
def test_docs_python_examples_run(where, code, tmp_path, monkeypatch):
    """Every Python example in the README and docs/ runs as written (outputs under tmp_path)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {})
