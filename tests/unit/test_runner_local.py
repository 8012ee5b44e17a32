"""The hub code path on local files: a hub model config pointed at a local folder in the
hub's format, hub data configs with local_files, the paper eval protocol's perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
from prunelab.paths import conf_dir
from prunelab.runner import run
from tests.conftest import make_model

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"


@pytest.fixture(scope="module")
def local_hub_model(tmp_path_factory):
    """A tiny random LLaMA saved like a hub checkpoint (safetensors + config + tokenizer)."""
    from transformers import AutoTokenizer

    from prunelab.models.embedded import asset_dir

    tok = AutoTokenizer.from_pretrained(asset_dir("tiny_llama"))
    model = make_model("llama", kv=2, heads=4, layers=4, hidden=64, inter=96)
    model.resize_token_embeddings(len(tok))
    out = tmp_path_factory.mktemp("hub_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_hub_configs_run_on_local_files(local_hub_model, tmp_path):
    wiki = {
        "train": str(FIXTURES / "wikitext2-train-00000-of-00001.parquet"),
        "test": str(FIXTURES / "wikitext2-test-00000-of-00001.parquet"),
    }
    overrides = [
        "model=llama_7b",
        f"model.path={local_hub_model}",
        "model.dtype=float32",
        "data=wikitext2",
        f"data.local_files={{train: {wiki['train']}, test: {wiki['test']}}}",
        "eval=paper",
        "eval.perplexity.datasets=[wikitext2:test]",
        "eval.perplexity.seq_len=32",
        "eval.zeroshot.tasks=[]",
        "eval.cost.enabled=false",
        "recovery.cutoff_len=32",  # the tiny model has 64 positions (longer windows are refused up front)
        "logger=none",
        f"output_root={tmp_path}",
        "ratio=0.1",
        "ratio_tolerance=0.05",
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    r = run(cfg, tmp_path / "run")
    assert math.isfinite(r["dense"]["perplexity"]["wikitext2"]) and math.isfinite(
        r["pruned"]["perplexity"]["wikitext2"]
    )
    assert abs(r["ratio"]["achieved"] - 0.1) <= 0.05 * 0.1
    saved = json.loads((tmp_path / "run" / "pruned" / "config.json").read_text())
    assert saved["model_type"] == "llama"
