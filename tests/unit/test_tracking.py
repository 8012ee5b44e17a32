"""W&B wiring (one run per job, grouped per sweep, tags) and resumable run directories."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from prunelab.errors import ConfigError
from prunelab.runner import run_tags
from prunelab.tracking.rundir import RunDir
from prunelab.tracking.wandb_logger import WandbTracker, flatten


def test_wandb_init_arguments(monkeypatch, tmp_path):
    import wandb

    seen = {}

    class FakeRun:
        summary: dict = {}  # noqa: RUF012

        def finish(self, exit_code=0):
            seen["finished"] = exit_code

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or FakeRun())
    cfg = OmegaConf.create({"project": "p", "entity": None, "mode": "offline"})
    t = WandbTracker(
        cfg, tmp_path, {"ratio": 0.2}, name="ratio=0.2", group="sweep:ratio", tags=["method:structured"]
    )
    t.finish()
    assert (
        seen["mode"] == "offline" and seen["group"] == "sweep:ratio" and seen["tags"] == ["method:structured"]
    )
    assert seen["config"] == {"ratio": 0.2} and seen["resume"] == "allow" and seen["finished"] == 0


def test_wandb_run_id_is_stable_per_run_dir_and_config(monkeypatch, tmp_path):
    import wandb

    ids = []
    monkeypatch.setattr(wandb, "init", lambda **kw: ids.append(kw["id"]) or object())
    cfg = OmegaConf.create({"project": "p", "entity": None, "mode": "offline"})
    WandbTracker(cfg, tmp_path / "a", {}, "a", None, [], key="c1")
    WandbTracker(cfg, tmp_path / "a", {}, "a", None, [], key="c1")  # resumed: same run
    WandbTracker(cfg, tmp_path / "b", {}, "b", None, [], key="c1")
    WandbTracker(cfg, tmp_path / "a", {}, "a", None, [], key="c2")  # another config in a reused dir
    assert ids[0] == ids[1] and len({ids[0], ids[2], ids[3]}) == 3


def test_tags_name_method_model_ratio():
    cfg = OmegaConf.create(
        {
            "method": {"name": "structured", "importance": "random"},
            "model": {"name": "tiny_llama"},
            "ratio": 0.5,
            "data": {"name": "embedded"},
            "tags": ["x"],
        }
    )
    assert run_tags(cfg) == [
        "method:structured",
        "model:tiny_llama",
        "ratio:0.5",
        "data:embedded",
        "importance:random",
        "x",
    ]


def test_flatten_keeps_scalars():
    assert flatten({"a": {"b": 1, "c": [1]}, "d": "x"}) == {"a/b": 1, "d": "x"}


def test_rundir_refuses_a_different_config(tmp_path):
    rd = RunDir(tmp_path, {"ratio": 0.2})
    rd.finish("prune", {"time_s": 1})
    assert RunDir(tmp_path, {"ratio": 0.2}).done("prune")["time_s"] == 1
    with pytest.raises(ConfigError, match=r"different config.*ratio"):
        RunDir(tmp_path, {"ratio": 0.5})


def test_rundir_treats_a_key_added_later_with_a_null_default_as_the_same_config(tmp_path):
    rd = RunDir(tmp_path, {"ratio": 0.2, "recovery": {"lr": 1e-4}})
    rd.finish("prune", {"time_s": 1})
    # a newer prunelab adds recovery.patience: null — the old run still resumes
    assert RunDir(tmp_path, {"ratio": 0.2, "recovery": {"lr": 1e-4, "patience": None}}).done("prune")
    with pytest.raises(ConfigError, match=r"different config.*recovery"):
        RunDir(tmp_path, {"ratio": 0.2, "recovery": {"lr": 1e-4, "patience": 3}})


def test_model_fingerprint_follows_the_weights(tmp_path):
    import os

    from prunelab.runner import model_fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"a")
    cfg = OmegaConf.create({"path": str(tmp_path), "revision": None})
    first = model_fingerprint(cfg)
    assert model_fingerprint(cfg) == first
    (tmp_path / "model.safetensors").write_bytes(b"bb")  # retrained weights: the dense cache is stale
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(cfg) != first
    assert model_fingerprint(OmegaConf.create({"path": "org/model", "revision": "v1"})) == "org/model@v1"


def test_stage_steps_are_fields_not_wandb_steps(monkeypatch, tmp_path):
    import wandb

    logged = []

    class FakeRun:
        def log(self, data, **kw):
            logged.append((data, kw))

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    cfg = OmegaConf.create({"project": "p", "entity": None, "mode": "offline"})
    t = WandbTracker(cfg, tmp_path, {}, "a", None, [])
    t.log({"recovery": {"train_loss": 1.0}}, step=0)  # a redone stage restarts its own counter
    assert logged == [({"recovery/train_loss": 1.0, "stage_step": 0}, {})]
