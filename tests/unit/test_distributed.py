"""Several processes (``accelerate launch``): what is refused before anything loads, and that a
single process never builds a process group. The two-process training itself:
tests/integration/test_ddp.py.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

import prunelab.cli  # noqa: F401  (registers the run_dir_name resolver)
from prunelab import distributed
from prunelab.errors import ConfigError
from prunelab.paths import conf_dir
from prunelab.recovery.lora import LoraRecovery, group_losses
from prunelab.runner import validate


def cfg_of(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="config", overrides=[*overrides, "logger=none"])


@pytest.fixture
def two_processes(monkeypatch):
    """What accelerate launch --num_processes 2 sets, without a process group (none may be built)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_partial_state", lambda: pytest.fail("a process group was set up"))


@pytest.mark.parametrize("method", ["loraprune", "atp", "lorashear"])
def test_training_methods_refused_in_several_processes(method, two_processes):
    with pytest.raises(ConfigError, match=rf"method={method} cannot run in 2 processes .*recovery=lora"):
        validate(cfg_of(f"method={method}"), with_plan=False)


def test_device_map_refused_in_several_processes(two_processes):
    with pytest.raises(ConfigError, match=r"model.device_map='auto' cannot run in 2 processes"):
        validate(cfg_of("method=magnitude", "recovery=none", "model.device_map=auto"), with_plan=False)


def test_lora_recovery_accepted_in_several_processes(two_processes):
    _, recovery, _ = validate(cfg_of("method=llm_pruner", "recovery=lora_embedded"), with_plan=False)
    assert recovery.dropout_per_micro_batch  # null: seeds per micro-batch, as one process can too


def test_dropout_stream_refused_in_several_processes(two_processes):
    with pytest.raises(
        ConfigError, match=r"recovery.dropout_rng='stream' needs one process .*null, micro_batch"
    ):
        LoraRecovery(dropout_rng="stream")
    with pytest.raises(ConfigError, match=r"recovery.dropout_rng"):
        LoraRecovery(dropout_rng="per_rank")


def test_one_process_builds_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "_partial_state", lambda: pytest.fail("a process group was set up"))
    assert (distributed.rank(), distributed.num_processes(), distributed.is_main()) == (0, 1, True)
    assert not LoraRecovery().dropout_per_micro_batch  # the historical single stream
    t = torch.ones(3)
    assert distributed.all_sum(t) is t and distributed.broadcast({"a": 1}) == {"a": 1}
    distributed.barrier()


def test_sharded_validation_is_the_one_process_mean(monkeypatch):
    """Each process's share of the batches, all-reduced, is the token-weighted mean of all."""
    batches = [{"n": torch.tensor(k)} for k in (3, 5, 7)]  # loss_sum = n * 1.5, target_count = n
    monkeypatch.setattr("prunelab.recovery.lora.loss_sum", lambda m, b: b["n"] * 1.5)
    monkeypatch.setattr("prunelab.recovery.lora.target_count", lambda b: int(b["n"]))
    model = torch.nn.Linear(1, 1)
    one = group_losses(model, {"a": batches[:2], "b": batches[2:]})
    shares = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "all_sum", lambda t: shares.append(t.clone()) or t)
        group_losses(model, {"a": batches[:2], "b": batches[2:]}, shard=True)
    summed = shares[0] + shares[1]  # what the all-reduce returns to both
    assert summed.tolist() == [[12.0, 8.0], [10.5, 7.0]]
    assert one == (1.5, {"a": 1.5, "b": 1.5})
