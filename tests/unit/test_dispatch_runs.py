"""Whole runs on a model dispatched by accelerate over CPU + disk (``model.device_map`` with a
tiny ``model.max_memory``, or an explicit map) give exactly the single-device run's results:
the same masks, the same saved weights, the same dense and pruned metrics. Disk offload runs
accelerate's offload hooks, the code path of a model split over GPUs and CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
from prunelab.paths import conf_dir
from prunelab.runner import run

# 3 MB of CPU for the 8 MB embedded model: the embeddings and a block stay, the rest on disk
AUTO = ["model.device_map=auto", "model.max_memory={cpu: 3MB}"]
EXPLICIT = [
    "model.device_map={model.embed_tokens: cpu, model.layers.0: cpu, model.layers.1: disk, "
    "model.layers.2: cpu, model.layers.3: disk, model.layers.4: disk, model.layers.5: cpu, "
    "model.layers.6: disk, model.layers.7: disk, model.norm: disk, model.rotary_emb: cpu, lm_head: cpu}"
]
# the input embedding (and the head tied to it) on disk: no real tensor where the inputs enter
EMBEDDING_ON_DISK = [
    "model.device_map={model.embed_tokens: disk, model.layers: cpu, model.norm: cpu, model.rotary_emb: cpu, "
    "lm_head: disk}"
]
CASES = {
    "magnitude": (["method=magnitude", "ratio=0.5"], AUTO),
    "wanda": (
        ["method=wanda", "ratio=0.5", "eval.zeroshot.tasks=[prunelab_order]", "eval.zeroshot.limit=8"],
        EMBEDDING_ON_DISK,
    ),
    "admm": (["method=admm", "ratio=0.5", "method.iterations=4", "method.mask_iterations=2"], AUTO),
    "sparsegpt": (["method=sparsegpt", "ratio=0.5", "method.sparsity_pattern=2:4"], EXPLICIT),
    "structured": (
        ["method=structured", "method.importance=random", "ratio=0.2"],
        EXPLICIT,
    ),
    "llm_pruner_layer": (
        ["method=llm_pruner", "method.importance=l1", "method.mode=layer", "ratio=0.2167"],
        EXPLICIT,
    ),
    "llm_pruner_channel": (
        ["method=llm_pruner", "method.importance=l2", "method.mode=channel", "ratio=0.1016"],
        AUTO,
    ),
}


def _run(tmp_path, name: str, overrides: list[str]) -> tuple[dict, object]:
    root = tmp_path / name  # its own cache: the dense evaluation runs on each placement
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["debug=fast", "recovery=none", "logger=none", f"output_root={root}", *overrides],
        )
    results = run(cfg, root / "run")
    return results, root / "run"


def _same_tensors(spread_dir, single_dir, part: str) -> dict:
    """The safetensors file ``part`` of both runs holds bit-identical tensors; the dispatched one."""
    got, ref = load_file(str(spread_dir / part)), load_file(str(single_dir / part))
    assert got.keys() == ref.keys() and got, part
    for k in got:
        assert torch.equal(got[k], ref[k]), (part, k)
    return got


def _same_metrics(a: dict, b: dict) -> None:
    assert a["perplexity"].keys() == b["perplexity"].keys()
    for k in a["perplexity"]:
        assert math.isclose(a["perplexity"][k], b["perplexity"][k], rel_tol=1e-6), k
    assert json.dumps(a.get("zeroshot"), sort_keys=True) == json.dumps(b.get("zeroshot"), sort_keys=True)


@pytest.mark.parametrize("case", list(CASES))
def test_dispatched_run_equals_single_device_run(case, tmp_path):
    method, placement = CASES[case]
    single, single_dir = _run(tmp_path, "single", method)
    spread, spread_dir = _run(tmp_path, "dispatched", [*method, *placement])
    assert spread["config"]["model"]["device_map"] is not None
    # both placements really ran every stage (nothing read from the other's cache)
    assert spread["resumed_stages"] == single["resumed_stages"] == []
    _same_tensors(spread_dir, single_dir, "masks.safetensors")
    _same_tensors(spread_dir, single_dir, "pruned/model.safetensors")
    _same_metrics(spread["dense"], single["dense"])
    _same_metrics(spread["pruned"], single["pruned"])
    assert spread["ratio"] == single["ratio"]
    # the model really was split over the CPU and the disk (the offload folder in the run dir)
    placed = json.loads((spread_dir / "stages" / "prune.json").read_text())["device_map"]
    assert set(placed.values()) == {"cpu", "disk"}, placed
    assert (spread_dir / "offload").is_dir()
    # a resumed run evaluates the pruned checkpoint loaded from disk straight into the device map
    # (a per-layer-shaped one is sliced out of its padding on the dispatched model)
    (spread_dir / "stages" / "eval.json").unlink()
    again, _ = _run(tmp_path, "dispatched", [*method, *placement])
    assert "prune" in again["resumed_stages"] and "eval" not in again["resumed_stages"]
    _same_metrics(again["pruned"], single["pruned"])
